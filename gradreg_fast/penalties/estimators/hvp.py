"""method="hvp": forward-over-reverse products of the parameter gradient (torch.func)."""
from __future__ import annotations

import torch

from gradreg_fast.penalties.core import Problem
from gradreg_fast.penalties.estimators._shared import (
    _needs_module,
    _outer_factor,
    _penalty_value,
    _per_sample,
    directional_grads,
    input_vjps,
    reduce_samples,
)
from gradreg_fast.penalties.estimators.fold import _deferred


def hvp(p: Problem) -> torch.Tensor:
    """Exact second-order product without a second-order backward graph (forward-over-reverse):

        ∇_θ Σ_b w_b P_b = 2·scale Σ_j (∂G[j]/∂θ)ᵀ (w ⊙ G[j]) = 2·scale Σ_j d/dε ∇_θ ⟨R[j], u(x + ε w ⊙ G[j])⟩

    G comes from one first-order reverse pass (no graph kept); the value is exact. The parameter
    gradient is computed at the call for w = 1 and scaled by the weight the caller's backward applies
    (1/B for the mean; reduction="none" recomputes it for the caller's per-sample weights), by
    torch.func.jvp over torch.func.vjp of a functional call of the model, the K cotangents of
    FrobReg/JacReg in one vmapped pass, on composite ops and the math attention kernel. No
    second-order graph outlives the call. It
    holds with BatchNorm's batch statistics too (G[j] is then the batch's input gradient).
    With a per-sample outer function (WGAN-GP: P_b = φ(s_b)) the weights become w_b · φ′(s_b),
    φ′ evaluated at the call from the same G: ∇_θ Σ_b w_b φ(s_b) = Σ_b w_b φ′(s_b) ∇_θ s_b, exact.
    """
    _needs_module(p, "hvp")
    g = input_vjps(p, create_graph=False, retain_graph=True).detach()
    value = _penalty_value(p, g)
    coef = 2.0 * p.scale
    factor = _outer_factor(p, g)   # φ′(s_b) with an outer function (WGAN-GP), else None

    def grads(w: torch.Tensor) -> list[torch.Tensor]:
        ws = coef * _per_sample(w if factor is None else w * factor.to(w.dtype), g[0])
        return directional_grads(p, [(p.R[j], ws * g[j]) for j in range(g.shape[0])])
    return reduce_samples(p, _deferred(p, value, grads))
