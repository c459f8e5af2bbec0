"""Which penalty kinds each estimator serves and how it behaves: read from the library's own method
table (gradreg_fast._methods.SPECS), so the tests and the library cannot disagree.

Shared by the robustness tests (test_ddp, test_mixed_precision, test_compile, test_properties,
test_long_run, test_nonfinite) so that every (kind, method) pair is either run or explicitly
expected to raise, never silently skipped.
"""
import gradreg_fast as gr
from gradreg_fast._methods import SPECS, serves

NEEDS_MODEL = tuple(n for n, s in SPECS.items() if s.needs_model)   # not in the crit(logits, y, inputs=x) form
STOCHASTIC_METHODS = tuple(n for n, s in SPECS.items() if s.stochastic)
# Methods whose result depends on the whole batch beyond the per-sample mean, with why.
BATCH_DEPENDENT_METHODS = {n: s.batch_dependent for n, s in SPECS.items() if s.batch_dependent}


def served_pairs(kinds=gr.KINDS):
    return [(k, m) for k in kinds for m in gr.METHODS if serves(k, m)]


def unserved_pairs(kinds=gr.KINDS):
    return [(k, m) for k in kinds for m in gr.METHODS if not serves(k, m)]


__all__ = ["NEEDS_MODEL", "STOCHASTIC_METHODS", "BATCH_DEPENDENT_METHODS", "serves", "served_pairs", "unserved_pairs"]
