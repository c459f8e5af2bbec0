"""What the estimators share: the input gradients G (``input_vjps``), the per-sample penalty and its
reduction, the checks of what a method needs, and the forward-over-reverse products of hvp and jvp
(``directional_grads``). See the package docstring for the formulas."""
from __future__ import annotations

import torch

from gradreg_fast.ops import sq_norm
from gradreg_fast.penalties.core import Problem
from gradreg_fast.penalties.guards import compiled_region_in, graph_nodes

# hvp and jvp vmap their directions in chunks of up to this many rows (directions × batch): each
# direction carries its own tangents through the forward and backward (on LeNet FrobReg, batch 50,
# all 10 directions at once took 4.5x the naive step's peak memory, 5 at a time 2.7x, one 1.1x)
VMAP_ROWS = 256
REDUCTIONS = ("mean", "sum", "none")


def input_vjps(p: Problem, *, create_graph: bool, retain_graph: bool | None = None,
               stacked: bool = True) -> torch.Tensor:
    """G[j] = ∂(Σ_b R[j, b] · u_b)/∂x for every cotangent j at once: shape (n, B, ...). With
    ``stacked=False`` and one cotangent (n = 1), G[0] itself, shape (B, ...): no view node in the graph
    that a second-order backward would walk (``_sq_norms`` takes either).

    One batched reverse pass (is_grads_batched, i.e. vmap over the backward) for the n cotangents,
    except for models with convolution or pooling layers, where a loop of n reverse passes over the
    retained graph is faster on the CPU (the step benchmark's LeNet FrobReg; the batched pass wins on
    its tanh MLP). Raises a ValueError when the targets do not depend on x.
    """
    if not p.u.requires_grad:
        raise ValueError("the model output does not depend on x (no autograd graph from x to the "
                         "output): a gradient penalty would be a silent 0; check that the model uses x")
    n = p.R.shape[0]
    if n > 1 and (_prefers_loop(p.model) or compiled_region_in(p.u) or _custom_function_in(p.u)):
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
    return g if n > 1 or not stacked else g.unsqueeze(0)


_LOOP_LAYERS = (torch.nn.modules.conv._ConvNd, torch.nn.modules.pooling._MaxPoolNd,
                torch.nn.modules.pooling._AvgPoolNd, torch.nn.modules.pooling._AdaptiveAvgPoolNd,
                torch.nn.modules.pooling._AdaptiveMaxPoolNd)


def _custom_function_in(t: torch.Tensor) -> bool:
    """Whether t's graph holds a custom autograd.Function (not a torch.library op such as ours). Its
    backward may be once_differentiable, which under is_grads_batched (vmap) silently drops the
    second-order dependence instead of raising; the loop of reverse passes keeps the node that raises."""
    classes = (getattr(node, "_forward_cls", None) for node in graph_nodes(t))
    return any(cls is not None and not cls.__module__.startswith("torch._library") for cls in classes)


def _prefers_loop(model) -> bool:
    """Whether n reverse passes in a loop beat one vmapped pass (see input_vjps)."""
    return isinstance(model, torch.nn.Module) and any(isinstance(m, _LOOP_LAYERS) for m in model.modules())


def _sq_norms(p: Problem, g: torch.Tensor) -> torch.Tensor:
    """Per-sample s_b = scale · Σ_j ‖G[j, b]‖² (B,) from G (n, B, ...), or from G[0] (B, ...) for one
    cotangent (``input_vjps(stacked=False)``), through the fused sq_norm op. The sum over j is skipped
    for one cotangent (n = 1), the product for scale 1 (every kind but SpectReg with n_proj > 1 and
    subsample's rescaling): the same numbers, up to two ops fewer in the forward and in each backward."""
    if g.dim() == p.x.dim():   # G[0] for one cotangent, unstacked
        s = sq_norm(g)
    elif g.shape[0] == 1:
        s = sq_norm(g.squeeze(0))   # a view whose backward is a view (g[0]: zeros and a copy)
    else:
        n, batch = g.shape[0], g.shape[1]
        s = sq_norm(g.reshape((n * batch,) + tuple(g.shape[2:]))).reshape(n, batch).sum(0)
    return s if p.scale == 1 else p.scale * s


def _penalty_value(p: Problem, g: torch.Tensor) -> torch.Tensor:
    """Per-sample penalty P_b (B,): s_b = scale · Σ_j ‖G[j, b]‖², or φ(s_b) when the Problem has a
    per-sample outer function φ (WGAN-GP's (√s − c)²)."""
    s = _sq_norms(p, g)
    return s if p.outer is None else p.outer(s)


def _outer_factor(p: Problem, g: torch.Tensor) -> torch.Tensor | None:
    """φ′(s_b) (B,) for a Problem with an outer function, None without one: ∇_θ φ(s_b) = φ′(s_b) ∇_θ s_b,
    so the first-order estimators (hvp, fd) multiply their per-sample weights by it. Fixed at the call."""
    if p.outer is None:
        return None
    with torch.no_grad():
        return p.outer_grad(_sq_norms(p, g.detach()))


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


def _needs_model(p: Problem, method: str, alternatives: str) -> None:
    if p.model is None:
        raise ValueError(
            f"method={method!r} re-evaluates the model, which the crit(logits, y, inputs=x) form does not "
            f"give: call the loss as crit(model, x, y) (or gr.penalty(kind, model, x, y, method={method!r})), "
            f"or use {alternatives}")


def _needs_module(p: Problem, method: str) -> None:
    _needs_model(p, method, "method='exact'")
    if not isinstance(p.model, torch.nn.Module):
        raise ValueError(
            f"method={method!r} differentiates the model functionally (torch.func.functional_call over its "
            f"named parameters), so it needs the model as an nn.Module, got {type(p.model).__name__}: pass "
            "the module itself, or use method='exact' or method='fd', which take any callable")


def hooked(tensors) -> bool:
    """Whether a hook registered with Tensor.register_hook sits on any of ``tensors``. A gradient taken at
    the call with torch.autograd.grad has been through that hook already; handed to the caller's backward
    it would go through it again (a hook that scales would scale twice), so such gradients stay in the
    caller's graph."""
    return any(bool(getattr(t, "_backward_hooks", None)) for t in tensors)


def _differentiated(p: Problem) -> tuple[list[str], list[torch.Tensor]]:
    params = p.parameters()
    if not params and not p.attached:
        raise ValueError("the model has no trainable parameters (and x does not require grad): "
                         "the penalty has nothing to differentiate")
    return list(params), list(params.values()) + ([p.x] if p.attached else [])


def directional_grads(p: Problem, pairs) -> list[torch.Tensor]:
    """Σ over (r, d) in ``pairs`` of  d/dε ∇_{θ, x} ⟨r, u(x + ε d)⟩ |ε=0  (r (B, K'), d shaped like x),
    by torch.func.jvp over torch.func.vjp of a functional call of the model (forward-over-reverse).

    That is (∂G_r/∂θ)ᵀ d with G_r = ∇_x ⟨r, u⟩ (symmetry of mixed second derivatives), and
    (∂G_r/∂x)ᵀ d for x when x requires grad. Forward-over-reverse through torch.func is right for
    every op with a forward-mode rule for its backward, including LayerNorm, BatchNorm's batch
    statistics and softmax, where reverse-mode autograd through a forward-mode tangent is not.
    The pairs run under torch.func.vmap over (r, d), ``VMAP_ROWS`` rows at a time: the primal forward
    and backward once per chunk, the tangents batched (faster than a loop of jvp calls on the step
    benchmark's LeNet FrobReg; the chunks bound the memory the batched tangents take).
    Returns one gradient per entry of ``_differentiated(p)``.
    """
    names, _ = _differentiated(p)
    params = p.parameters()
    primals = {k: params[k].detach() for k in names}
    x0 = p.x.detach()
    one = torch.ones((), dtype=p.u.dtype, device=p.u.device)
    attached = p.attached

    def gradient(z: torch.Tensor, r: torch.Tensor):
        def scalar(prm, zz):
            return (p.target(zz, prm) * r).sum()
        if attached:
            _, pull = torch.func.vjp(scalar, primals, z)
            dprm, dz = pull(one)
            return [dprm[k] for k in names] + [dz]
        _, pull = torch.func.vjp(lambda prm: scalar(prm, z), primals)
        (dprm,) = pull(one)   # one reverse pass for all parameters
        return [dprm[k] for k in names]

    def directional(r: torch.Tensor, d: torch.Tensor):
        return torch.func.jvp(lambda z: gradient(z, r), (x0,), (d,))[1]

    if len(pairs) == 1:
        (r, d), = pairs
        return [t.detach() for t in directional(r.detach(), d.to(x0.dtype))]
    # the n directions vmapped: the primal forward and backward run once per chunk, unbatched, and
    # only the tangents carry the directions; randomness="same" replays the original forward's
    # dropout masks in every direction (Replay restores the RNG state first)
    rs = torch.stack([r.detach() for r, _ in pairs])
    ds = torch.stack([d.to(x0.dtype) for _, d in pairs])
    chunk = max(1, VMAP_ROWS // max(1, x0.shape[0]))   # directions per vmapped pass: bounds the memory
    out = torch.func.vmap(directional, randomness="same", chunk_size=chunk)(rs, ds)
    return [t.sum(0).detach() for t in out]


def _per_sample(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.to(like.dtype).reshape((w.shape[0],) + (1,) * (like.dim() - 1))
