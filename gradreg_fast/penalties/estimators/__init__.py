"""Estimators (``method=``): each maps a Problem to a scalar whose value is the penalty and whose
gradient with respect to the model's parameters is the penalty's gradient (exactly or in
expectation, as each docstring says).

With G[j] = ∂(Σ_b R[j, b] · u_b)/∂x (n, B, ...) the penalty is P = scale · mean_b Σ_j ‖G[j, b]‖² and

    ∇_θ P = (2 · scale / B) Σ_j (∂G[j]/∂θ)ᵀ G[j] = (2 · scale / B) Σ_j  d/dε ∇_θ ⟨R[j], u(x + ε G[j])⟩ |ε=0

(symmetry of mixed second derivatives). The methods differ in how they get that last term:

    exact  reverse-over-reverse: autograd with create_graph=True (double backpropagation)
    hvp    forward-over-reverse: a Jacobian-vector product of the parameter gradient (torch.func)
    fd     finite differences of the parameter gradient along G[j]/‖G[j]‖ (first-order passes only)
    jvp    forward-mode Hutchinson for FrobReg/JacReg: ‖J‖_F² = E_v ‖J v‖², v ~ N(0, I_D)

The non-exact methods return a *surrogate*: its value is the penalty, its gradient the estimate
(fd: a scalar built from ordinary forward passes; hvp and jvp: a value whose backward runs the
forward-over-reverse products). When the caller's x requires grad (an input they marked, or the
output of upstream layers such as an embedding), every method also differentiates with respect to x,
so the layers upstream of x are trained by the penalty too.

A Problem may carry a per-sample outer function φ (WGAN-GP: P_b = φ(s_b) = (√s_b − c)²,
s_b = scale · Σ_j ‖G[j, b]‖²). Then ∇_θ P_b = φ′(s_b) · ∇_θ s_b: exact differentiates through φ by
autograd; hvp and fd multiply their per-sample weights by φ′(s_b), evaluated at the call (a
per-sample constant, so _Deferred's precomputed gradients stay valid); jvp does not serve these kinds.

Each estimator builds the per-sample terms P_b = scale · Σ_j ‖G[j, b]‖² (and per-sample surrogates
whose parameter gradient is ∇_θ P_b) and reduces them once, in ``reduce_samples``, as
``p.options["reduction"]`` says: "mean" (default, the batch mean), "sum", or "none" (the (B,)
vector itself, so that Σ_b w_b P_b has the gradient Σ_b w_b ∇_θ P_b).

One module per method (exact.py, hvp.py, fd.py with its kink detection and step check, jvp.py), on
the shared machinery of _shared.py (the input gradients, the reduction, the forward-over-reverse
products) and fold.py (gradients taken at the call, with the caller's base loss folded in);
``METHODS`` maps the names of the method table (gradreg_fast/_methods.py) to them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from gradreg_fast import _methods
from gradreg_fast.penalties.core import Problem
from gradreg_fast.penalties.estimators._shared import (
    REDUCTIONS,
    VMAP_ROWS,
    directional_grads,
    input_vjps,
    reduce_samples,
)
from gradreg_fast.penalties.estimators.exact import exact
from gradreg_fast.penalties.estimators.fd import (
    _STEP_CHECKED,
    DEFAULT_FD_H,
    FD_ROWS,
    FD_SCHEMES,
    FD_STATED_RTOL,
    FDKinkWarning,
    FDStepWarning,
    fd,
)
from gradreg_fast.penalties.estimators.hvp import hvp
from gradreg_fast.penalties.estimators.jvp import JVP_KINDS, input_tangent, jvp

ESTIMATOR_OPTIONS = ("fd_h", "fd_scheme")
METHODS: dict[str, Callable[[Problem], torch.Tensor]] = {"exact": exact, "hvp": hvp, "fd": fd, "jvp": jvp}
assert tuple(METHODS) == _methods.NAMES, "estimators.METHODS and gradreg_fast._methods.SPECS must name the same methods"

__all__ = ["DEFAULT_FD_H", "ESTIMATOR_OPTIONS", "FDKinkWarning", "FDStepWarning", "FD_ROWS", "FD_SCHEMES",
           "FD_STATED_RTOL", "JVP_KINDS", "METHODS", "REDUCTIONS", "VMAP_ROWS", "_STEP_CHECKED", "directional_grads",
           "exact", "fd", "hvp", "input_tangent", "input_vjps", "jvp", "reduce_samples"]
