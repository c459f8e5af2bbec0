"""Which penalty kinds each estimator serves and how it behaves, as the library documents it.

Shared by the robustness tests (test_ddp, test_mixed_precision, test_compile, test_properties,
test_long_run, test_nonfinite) so that every (kind, method) pair is either run or explicitly
expected to raise, never silently skipped. Methods not on main yet ("hvp", "fd", "jvp", issue 4)
are described here so the tests cover them as soon as they are merged.
"""
import gradreg_fast as gr

JVP_KINDS = ("frobreg", "jacreg")        # method="jvp" estimates ‖J‖_F² only
NEEDS_MODEL = ("hvp", "fd", "jvp")       # re-run the model: not in the crit(logits, y, inputs=x) form
STOCHASTIC_METHODS = ("jvp",)            # draws v ~ N(0, I_D) per sample
# Methods whose result depends on the whole batch beyond the per-sample mean, with why.
BATCH_DEPENDENT_METHODS = {"fd": "the step t = fd_h * rms(x) is taken over the (per-rank) batch"}


def serves(kind: str, method: str) -> bool:
    return method != "jvp" or kind in JVP_KINDS


def served_pairs(kinds=gr.KINDS):
    return [(k, m) for k in kinds for m in gr.METHODS if serves(k, m)]


def unserved_pairs(kinds=gr.KINDS):
    return [(k, m) for k in kinds for m in gr.METHODS if not serves(k, m)]
