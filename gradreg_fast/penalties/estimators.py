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

The non-exact methods return a *surrogate*: its value is the penalty, its parameter gradient
is the estimate; they give no gradient with respect to x itself (nor to anything upstream of x).

Each estimator builds the per-sample terms P_b = scale · Σ_j ‖G[j, b]‖² (and per-sample surrogates
whose parameter gradient is ∇_θ P_b) and reduces them once, in ``reduce_samples``, as
``p.options["reduction"]`` says: "mean" (default, the batch mean), "sum", or "none" (the (B,)
vector itself, so that Σ_b w_b P_b has the gradient Σ_b w_b ∇_θ P_b).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from gradreg_fast._guards import compiled_region_in
from gradreg_fast.ops import draw_seed, gaussian_like, sq_norm
from gradreg_fast.penalties.core import Problem

FD_SCHEMES = ("central", "forward")
DEFAULT_FD_H = 1e-3
ESTIMATOR_OPTIONS = ("fd_h", "fd_scheme")
REDUCTIONS = ("mean", "sum", "none")


def input_vjps(p: Problem, *, create_graph: bool, retain_graph: bool | None = None) -> torch.Tensor:
    """G[j] = ∂(Σ_b R[j, b] · u_b)/∂x for every cotangent j at once: shape (n, B, ...).

    One batched reverse pass (is_grads_batched, i.e. vmap over the backward) for the n cotangents,
    except for models with convolution or pooling layers, where a loop of n reverse passes over the
    retained graph is faster (measured on CPU, one thread, FrobReg step incl. the final backward:
    LeNet batch 50 loop 241 ms vs batched 350 ms; the tanh MLP 784-512-512-10 batch 50 batched
    152 ms vs loop 188 ms). Raises a ValueError when the targets do not depend on x.
    """
    if not p.u.requires_grad:
        raise ValueError("the model output does not depend on x (no autograd graph from x to the "
                         "output): a gradient penalty would be a silent 0; check that the model uses x")
    n = p.R.shape[0]
    if n > 1 and (_prefers_loop(p.model) or compiled_region_in(p.u)):
        # a loop of n reverse passes: faster for some layers (see _prefers_loop), and the only way
        # through compiled (aot_autograd) regions, whose backward is_grads_batched cannot vmap
        gs = [torch.autograd.grad(p.u, p.x, grad_outputs=p.R[j], create_graph=create_graph, retain_graph=True,
                                  allow_unused=True)[0] for j in range(n)]
        if any(g is None for g in gs):
            raise ValueError("the model output does not depend on x: a gradient penalty would be a silent 0; "
                             "check that the model uses x")
        return torch.stack(gs)
    grad_outputs = p.R if n > 1 else p.R[0]
    (g,) = torch.autograd.grad(p.u, p.x, grad_outputs=grad_outputs, create_graph=create_graph,
                               retain_graph=retain_graph, allow_unused=True, is_grads_batched=n > 1)
    if g is None:
        raise ValueError("the model output does not depend on x: a gradient penalty would be a silent 0; "
                         "check that the model uses x")
    return g if n > 1 else g.unsqueeze(0)


_LOOP_LAYERS = (torch.nn.modules.conv._ConvNd, torch.nn.modules.pooling._MaxPoolNd,
                torch.nn.modules.pooling._AvgPoolNd, torch.nn.modules.pooling._AdaptiveAvgPoolNd,
                torch.nn.modules.pooling._AdaptiveMaxPoolNd)


def _prefers_loop(model) -> bool:
    """Whether n reverse passes in a loop beat one vmapped pass (see input_vjps)."""
    return isinstance(model, torch.nn.Module) and any(isinstance(m, _LOOP_LAYERS) for m in model.modules())


def _penalty_value(p: Problem, g: torch.Tensor) -> torch.Tensor:
    """Per-sample scale · Σ_j ‖G[j, b]‖² (B,) from G (n, B, ...), through the fused sq_norm op."""
    n, batch = g.shape[0], g.shape[1]
    norms = sq_norm(g.reshape((n * batch,) + tuple(g.shape[2:]))).reshape(n, batch)
    return p.scale * norms.sum(0)


def _reduction(p: Problem) -> str:
    reduction = p.options.get("reduction", "mean")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_samples(p: Problem, per_sample: torch.Tensor) -> torch.Tensor:
    """The per-sample terms (B,) reduced as ``p.options["reduction"]`` says (mean, sum or none)."""
    reduction = _reduction(p)
    if reduction == "mean":
        return per_sample.mean()
    return per_sample.sum() if reduction == "sum" else per_sample


def _surrogate(value: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """A scalar equal to ``value`` (detached) whose gradient is that of ``linear``."""
    return value.detach() + (linear - linear.detach()).to(value.dtype)


def exact(p: Problem) -> torch.Tensor:
    """Double backpropagation: the penalty with create_graph=True, differentiated by autograd.

    scale · mean_b Σ_j ‖G[j, b]‖², exact value and exact parameter gradient. One forward pass
    (the caller's), one batched create_graph backward for all n cotangents, and the caller's
    final backward through both graphs.
    """
    g = input_vjps(p, create_graph=True)
    if not g.requires_grad:
        raise ValueError("the input gradient does not depend on the parameters through a twice-"
                         "differentiable graph (an op in the model has no double backward, or the "
                         "model has no parameters on the path from x): method='exact' cannot train "
                         "with this penalty; method='fd' needs first derivatives only")
    return reduce_samples(p, _penalty_value(p, g))


def _needs_model(p: Problem, method: str, alternatives: str) -> None:
    if p.model is None:
        raise ValueError(
            f"method={method!r} re-evaluates the model, which the crit(logits, y, inputs=x) form does not "
            f"give: call the loss as crit(model, x, y) (or gr.penalty(kind, model, x, y, method={method!r})), "
            f"or use {alternatives}")


def _uses_batch_statistics(model) -> bool:
    return isinstance(model, torch.nn.Module) and any(
        isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.training for m in model.modules())


def hvp(p: Problem) -> torch.Tensor:
    """Exact second-order product without a second-order backward graph:

        ∇_θ P = (2·scale/B) Σ_j (∂G[j]/∂θ)ᵀ G[j] = (2·scale/B) Σ_j ∇_θ ⟨R[j], (∂u/∂x) · G[j]⟩ |G fixed

    G comes from one first-order reverse pass (no graph kept). (∂u/∂x)·G[j] is one forward-mode
    pass (torch.autograd.forward_ad, tangent G[j]) of the model, and the surrogate's gradient is
    taken by the caller's single backward together with the base loss: the directional derivative
    of the parameter gradient along G, i.e. forward-over-reverse evaluated in the order
    reverse-over-forward, which needs neither torch.func.vjp inside jvp nor a functional copy of
    the model, and works for any callable model whose ops have forward-mode AD. One forward-mode
    pass per cotangent (K for FrobReg/JacReg).

    Models with BatchNorm in training mode take the torch.func route instead (torch.func.jvp of
    torch.func.vjp of a functional_call, the cotangents one by one): reverse-mode autograd through
    batch norm's forward-mode formula misses the dependence through the batch statistics (they are
    non-differentiable outputs of the op), which would make the reverse-over-forward product wrong.
    """
    _needs_model(p, "hvp", "method='exact'")
    g = input_vjps(p, create_graph=False, retain_graph=True).detach()
    value = _penalty_value(p, g)
    if _uses_batch_statistics(p.model):
        # the batch statistics couple the samples: only the reduced penalty's gradient is one pass
        if _reduction(p) == "none":
            raise ValueError("method='hvp' with BatchNorm in training mode gives the gradient of the "
                             "reduced penalty only (the batch statistics couple the samples): use "
                             "reduction='mean' or 'sum', or method='exact' for per-sample penalties")
        coef = 2.0 * p.scale / (g.shape[1] if _reduction(p) == "mean" else 1)
        return _surrogate(reduce_samples(p, value), _hvp_functional(p, g, coef))
    x0 = p.x.detach()
    coef = 2.0 * p.scale
    linear = 0
    for j in range(g.shape[0]):
        ut = p.target_jvp(x0, g[j].to(x0.dtype))
        if not ut.requires_grad:
            raise ValueError("method='hvp': the model's input Jacobian does not depend on any parameter "
                             "that requires grad")
        linear = linear + coef * (p.R[j] * ut).sum(1)    # per sample: ∇_θ of it is ∇_θ P_b
    return reduce_samples(p, _surrogate(value, linear))


def _hvp_functional(p: Problem, g: torch.Tensor, coef: float) -> torch.Tensor:
    """Σ_p ⟨∇_θ P, θ_p⟩ with ∇_θ P by torch.func.jvp over torch.func.vjp (forward-over-reverse)."""
    params = p.parameters()
    if not params:
        raise ValueError("method='hvp': the model has no trainable parameters")
    x0 = p.x.detach()
    primals = {k: v.detach() for k, v in params.items()}

    def directional(r: torch.Tensor, gj: torch.Tensor) -> dict:
        def param_grad(z):
            _, pullback = torch.func.vjp(lambda prm: (p.target(z, prm) * r).sum(), primals)
            return pullback(torch.ones((), dtype=p.u.dtype, device=p.u.device))[0]
        return torch.func.jvp(param_grad, (x0,), (gj.to(x0.dtype),))[1]

    linear = 0
    for j in range(g.shape[0]):
        tangent = directional(p.R[j].detach(), g[j])
        linear = linear + sum((coef * tangent[k].detach() * params[k]).sum() for k in params)
    return linear


def _fd_options(p: Problem) -> tuple[float, str]:
    h = p.options.get("fd_h", DEFAULT_FD_H)
    scheme = p.options.get("fd_scheme", "central")
    if not isinstance(h, (int, float)) or not math.isfinite(h) or h <= 0:
        raise ValueError(f"fd_h must be a finite number > 0, got {h!r}")
    if scheme not in FD_SCHEMES:
        raise ValueError(f"fd_scheme must be one of {FD_SCHEMES}, got {scheme!r}")
    return float(h), scheme


def fd(p: Problem) -> torch.Tensor:
    """Finite differences of the parameter gradient along d = G[j, b]/‖G[j, b]‖ (per sample).

    With t = fd_h · rms(x) (the step is *relative to the input scale*: rms over the whole batch,
    so that fd_h = 1e-3 suits inputs in [0, 1] and in [0, 255] alike):

        central (default, O(t²)):  ∇_θ P ≈ (2·scale/B) Σ_j Σ_b ‖G[j,b]‖ (∇_θ⟨R[j],u⟩_b(x + t d) − ∇_θ⟨R[j],u⟩_b(x − t d)) / (2t)
        forward (O(t)):           same with (∇_θ⟨R[j],u⟩_b(x + t d) − ∇_θ⟨R[j],u⟩_b(x)) / t

    realized as a surrogate Σ_b w_b ⟨R[j, b], u_b(x ± t d)⟩ through ordinary forward passes, so
    the caller's single backward does the rest: first derivatives only, it works through ops
    without a double backward. Under autocast the perturbed passes run in fp32 (autocast off;
    the forward scheme then re-evaluates its base point in fp32 too); the step is computed in
    fp32 (fp64 for fp64 inputs). A sample with
    ‖G‖ = 0 is not perturbed and contributes 0. Each of the n cotangents costs one (forward) or
    two (central) extra forward passes of the model. Per-sample differences assume the samples
    do not interact in the model (with BatchNorm in training mode it is an approximation).
    """
    _needs_model(p, "fd", "method='exact'")
    h, scheme = _fd_options(p)
    g = input_vjps(p, create_graph=False, retain_graph=True).detach()
    value = _penalty_value(p, g)
    n, batch = g.shape[0], g.shape[1]
    work = torch.promote_types(p.x.dtype, torch.float32)
    x0 = p.x.detach().to(work)
    rms = x0.pow(2).mean().sqrt()
    step = h * torch.where(rms > 0, rms, torch.ones_like(rms))
    norms = g.to(work).reshape(n, batch, -1).norm(dim=2)                      # (n, B)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    d = g.to(work) / safe.reshape((n, batch) + (1,) * (g.dim() - 2))          # 0 where ‖G‖ = 0
    weights = 2.0 * p.scale * norms / step                                    # (n, B)
    autocast_on = torch.is_autocast_enabled(p.x.device.type)
    linear = torch.zeros((batch,), device=p.x.device, dtype=work)   # per sample

    def weighted(z: torch.Tensor, j: int) -> torch.Tensor:
        with torch.autocast(p.x.device.type, enabled=False):
            u = p.target(z)
        return (weights[j].reshape(batch, 1) * u.to(work) * p.R[j].to(work)).sum(1)

    zdtype = work if autocast_on else p.x.dtype   # the model's own dtype unless autocast decides
    for j in range(n):
        plus = weighted((x0 + step * d[j]).to(zdtype), j)
        if scheme == "central":
            minus = weighted((x0 - step * d[j]).to(zdtype), j)
            linear = linear + 0.5 * (plus - minus)
        else:
            if autocast_on:
                base = weighted(x0.to(zdtype), j)
            else:
                base = (weights[j].reshape(batch, 1) * p.u * p.R[j]).sum(1)
            linear = linear + (plus - base)
    return reduce_samples(p, _surrogate(value, linear))


def input_tangent(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """v ~ N(0, I) shaped like x, independent per sample, written by the counter-based Gaussian
    op (gradreg_fast.ops.gaussian_like, Philox 4x32-10 in the kernel) from a seed drawn from
    ``generator``: one seed per draw, so n draws in one call equal n calls in a row."""
    return gaussian_like(like, draw_seed(generator), 0, per_sample=True)


JVP_KINDS = ("frobreg", "jacreg")


def jvp(p: Problem) -> torch.Tensor:
    """Forward-mode Hutchinson estimate of ‖J‖_F² (FrobReg, JacReg): (1/n) Σ_j mean_b ‖J_b v_jb‖².

    v_j ~ N(0, I_D) per sample (n = n_proj draws from ``generator``); E_v ‖J v‖² = ‖J‖_F², so value
    and parameter gradient are unbiased. J v is one forward-mode pass (torch.autograd.forward_ad)
    per draw, recorded by reverse-mode autograd so that the caller's backward differentiates it
    (no create_graph, no K reverse passes).
    """
    if p.kind not in JVP_KINDS:
        raise ValueError(f"method='jvp' estimates ‖J‖_F² and serves {', '.join(JVP_KINDS)} only, not "
                         f"{p.kind!r}; for {p.kind!r} use method='exact', 'hvp' or 'fd'")
    _needs_model(p, "jvp", "method='exact'")
    import torch.autograd.forward_ad as fwAD
    x0 = p.x.detach()
    total = 0
    for _ in range(p.n_proj):
        v = input_tangent(x0, p.generator)
        with fwAD.dual_level():
            primal, jv = fwAD.unpack_dual(p.run_model(fwAD.make_dual(x0, v)))
        if jv is None:
            raise ValueError("the model output does not depend on x: a gradient penalty would be a silent 0")
        if p.kind == "jacreg":
            # tangent of softmax written out (forward AD through softmax is not reverse-differentiable
            # in every torch version): dp = p ⊙ (df − Σ_k p_k df_k)
            prob = torch.softmax(primal, dim=1)
            jv = prob * (jv - (prob * jv).sum(1, keepdim=True))
        total = total + sq_norm(jv)
    return reduce_samples(p, total / p.n_proj)


METHODS: dict[str, Callable[[Problem], torch.Tensor]] = {"exact": exact, "hvp": hvp, "fd": fd, "jvp": jvp}
