"""method="jvp": the forward-mode Hutchinson estimate of ‖J‖_F² (FrobReg, JacReg)."""
from __future__ import annotations

import torch

from gradreg_fast import _methods
from gradreg_fast.ops import draw_seed, gaussian_like, sq_norm
from gradreg_fast.penalties.core import Problem
from gradreg_fast.penalties.estimators._shared import (
    _needs_module,
    _per_sample,
    directional_grads,
    reduce_samples,
)
from gradreg_fast.penalties.estimators.fold import _deferred


def input_tangent(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """v ~ N(0, I) shaped like x, independent per sample, written by the counter-based Gaussian
    op (gradreg_fast.ops.gaussian_like, Philox 4x32-10 in the kernel) from a seed drawn from
    ``generator``: one seed per draw, so n draws in one call equal n calls in a row."""
    return gaussian_like(like, draw_seed(generator), 0, per_sample=True)


JVP_KINDS = _methods.JVP_KINDS


def jvp(p: Problem) -> torch.Tensor:
    """Forward-mode Hutchinson estimate of ‖J‖_F² (FrobReg, JacReg): P_b = (1/n) Σ_j ‖J_b v_jb‖².

    v_j ~ N(0, I_D) per sample (n = n_proj draws from ``generator``). Unbiased: the entries of v are
    independent standard normals, E[v vᵀ] = I, so E_v ‖J v‖² = tr(J E[v vᵀ] Jᵀ) = ‖J‖_F²; and
    ∇_θ ‖J v‖² = ∇_θ tr(Jᵀ J v vᵀ) is linear in v vᵀ (θ enters through J only), so its expectation is
    ∇_θ ‖J‖_F². Given the draws, value and gradient are a deterministic function of them.

    The draws (a contract, so that they can be reproduced from the same generator: the conformance
    matrix checks the estimate at them against plain double backprop): for j = 0, …, n−1 in turn,
    seed_j = ``draw_seed(generator)`` (one ``torch.randint(0, 2**63 - 1, (1,), generator=generator)``)
    and v_j = ``gaussian_like(x, seed_j, 0, per_sample=True)``, the x-shaped first x.numel() numbers
    of the counter-based Gaussian stream (seed_j, offset 0) (gradreg_fast.reference.philox defines it)
    in x's dtype. FrobReg and JacReg draw nothing else from ``generator``.

    J v is one forward-mode pass (torch.func.jvp) per draw; the
    parameter gradient, ∇_θ ‖J v‖² = 2 (∂(J v)/∂θ)ᵀ (J v) = 2 d/dε ∇_θ ⟨J v, u(x + ε v)⟩, is a
    forward-over-reverse product computed inside the caller's backward (``directional_grads``), so
    it is right on LayerNorm, softmax and attention too. No create_graph, no K reverse passes.
    Models with batch statistics (BatchNorm in training mode) are refused: there the samples
    interact and the per-sample ‖J_b‖_F² is not the quantity method='exact' computes.
    """
    if p.kind not in JVP_KINDS:
        raise ValueError(f"method='jvp' estimates ‖J‖_F² and serves {', '.join(JVP_KINDS)} only, not "
                         f"{p.kind!r}; for {p.kind!r} use method='exact', 'hvp' or 'fd'")
    _needs_module(p, "jvp")
    if p.coupled:
        raise ValueError("method='jvp' estimates per-sample Jacobian norms, and this model normalizes with "
                         "batch statistics (BatchNorm in training mode), which couple the samples: use "
                         "method='exact' or method='hvp' (or put the BatchNorm layers in eval mode)")
    if not p.depends_on_x:
        raise ValueError("the model output does not depend on x (no autograd graph from x to the "
                         "output): a gradient penalty would be a silent 0; check that the model uses x")
    x0 = p.x.detach()
    # parameters that require grad, under grad mode: nn.MultiheadAttention otherwise takes its fused
    # inference path, which has no forward-mode derivative
    primals = {k: v.detach().requires_grad_(True) for k, v in p.parameters().items()}
    draws, total = [], 0
    with torch.enable_grad():
        for _ in range(p.n_proj):
            v = input_tangent(x0, p.generator)
            _, jv = torch.func.jvp(lambda z: p.target(z, primals), (x0,), (v,))
            jv = jv.detach()
            draws.append((jv, v))
            total = total + sq_norm(jv)
    value = total / p.n_proj

    def grads(w: torch.Tensor) -> list[torch.Tensor]:
        ws = (2.0 / p.n_proj) * _per_sample(w, draws[0][0])
        return directional_grads(p, [(ws * jv, v) for jv, v in draws])
    return reduce_samples(p, _deferred(p, value, grads))
