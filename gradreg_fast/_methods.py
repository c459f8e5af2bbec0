"""The estimators (``method=``) in one table: what each needs and serves. The penalty code, the
guards, the tests and the benchmarks read it; ``gradreg_fast.penalties.estimators.METHODS`` maps the
same names to the functions (and docs/method.md explains each).

A leaf module (no gradreg_fast imports), so that the guards can read it too.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kinds: tuple[str, ...] | None   # the penalty kinds it serves (None: every kind)
    needs_model: bool               # re-runs the model: not in the crit(logits, y, inputs=x) form
    needs_module: bool              # calls the model functionally (torch.func): an nn.Module, not any callable
    double_backward: bool           # differentiates the model's backward in reverse mode (create_graph)
    trains_compiled: bool           # trains a torch.compile'd (aot_autograd) model
    stochastic: bool                # a random estimate (unbiased), not a deterministic value
    batch_dependent: str | None = None   # why its result depends on the batch beyond the per-sample mean


SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("exact", kinds=None, needs_model=False, needs_module=False, double_backward=True,
               trains_compiled=False, stochastic=False),
    MethodSpec("hvp", kinds=None, needs_model=True, needs_module=True, double_backward=False,
               trains_compiled=True, stochastic=False),
    MethodSpec("fd", kinds=None, needs_model=True, needs_module=False, double_backward=False,
               trains_compiled=True, stochastic=False,
               batch_dependent="the step t = fd_h * rms(x) is taken over the (per-rank) batch"),
    MethodSpec("jvp", kinds=("frobreg", "jacreg"), needs_model=True, needs_module=True, double_backward=False,
               trains_compiled=True, stochastic=True),
)}

NAMES = tuple(SPECS)
COMPILED_MODEL_METHODS = tuple(n for n, s in SPECS.items() if s.trains_compiled)
JVP_KINDS = SPECS["jvp"].kinds


def serves(kind: str, method: str) -> bool:
    """Whether ``method`` serves penalty ``kind`` (an unknown method serves nothing)."""
    spec = SPECS.get(method)
    return spec is not None and (spec.kinds is None or kind in spec.kinds)
