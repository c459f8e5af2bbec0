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
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable

import torch

from gradreg_fast import _methods
from gradreg_fast._bias_act_spec import ACTIVATIONS, KINKED
from gradreg_fast._guards import compiled_region_in, graph_nodes
from gradreg_fast._twins import NO_DOUBLE_BACKWARD
from gradreg_fast.ops import draw_seed, gaussian_like, sq_norm
from gradreg_fast.penalties.core import Problem, serialized

FD_SCHEMES = ("central", "forward")
DEFAULT_FD_H = 1e-3
# hvp and jvp vmap their directions in chunks of up to this many rows (directions × batch): each
# direction carries its own tangents through the forward and backward (on LeNet FrobReg, batch 50,
# all 10 directions at once took 4.5x the naive step's peak memory, 5 at a time 2.7x, one 1.1x)
VMAP_ROWS = 256
# fd evaluates its points in batches of up to this many rows when the model is a pure per-sample
# function (no batch statistics, no random numbers, no buffer updates)
FD_ROWS = 512
ESTIMATOR_OPTIONS = ("fd_h", "fd_scheme")
REDUCTIONS = ("mean", "sum", "none")


def input_vjps(p: Problem, *, create_graph: bool, retain_graph: bool | None = None) -> torch.Tensor:
    """G[j] = ∂(Σ_b R[j, b] · u_b)/∂x for every cotangent j at once: shape (n, B, ...).

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
    return g if n > 1 else g.unsqueeze(0)


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
    """Per-sample s_b = scale · Σ_j ‖G[j, b]‖² (B,) from G (n, B, ...), through the fused sq_norm op."""
    n, batch = g.shape[0], g.shape[1]
    norms = sq_norm(g.reshape((n * batch,) + tuple(g.shape[2:]))).reshape(n, batch)
    return p.scale * norms.sum(0)


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


# autograd nodes that raise when differentiated: ops without a double backward (NotImplemented, e.g.
# the flash attention kernels) and custom Functions whose backward is once_differentiable (Error)
_NOT_TWICE_DIFFERENTIABLE = ("torch::autograd::NotImplemented", "torch::autograd::Error",
                             "torch::autograd::DelayedError")


def _not_twice_differentiable(g: torch.Tensor) -> str | None:
    """The name of a node in g's graph that cannot be differentiated (None when there is none)."""
    return next((node.name() for node in graph_nodes(g) if node.name() in _NOT_TWICE_DIFFERENTIABLE), None)


class FDKinkWarning(UserWarning):
    """method='fd' on a model with piecewise-linear layers (ReLU, max-pooling, ...): fd's gradient is
    that of a finite-difference penalty there, not double backprop's (see ``fd``)."""


# autograd nodes of ops whose derivative jumps (piecewise-linear activations, max-pooling, abs, clamp,
# max/min): a finite-difference step across a jump sees it, double backprop does not
_KINK_NODES = frozenset((
    "ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1", "LeakyReluBackward0",
    "LeakyReluBackward1", "HardtanhBackward0", "HardtanhBackward1", "PreluKernelBackward0",
    "RreluWithNoiseBackward0", "RreluWithNoiseBackward1", "HardswishBackward0", "HardsigmoidBackward0",
    "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0",
    "AdaptiveMaxPool3DBackward0", "FractionalMaxPool2DBackward0", "FractionalMaxPool3DBackward0",
    "AbsBackward0", "ClampBackward0", "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0",
    "MaximumBackward0", "MinimumBackward0", "MaxBackward0", "MaxBackward1", "MinBackward0", "MinBackward1",
    "AmaxBackward0", "AminBackward0"))
_FUSED_ACT_NODE = "GeneratedBackwardFor_gradreg_fast_bias_act"   # gr.fuse's bias_act: args[0] is the act code
# the same ops as modules, for graphs that hide them (a torch.compile'd region is one node)
_KINK_MODULES = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.Hardtanh, torch.nn.PReLU,
                 torch.nn.RReLU, torch.nn.Threshold, torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.Hardshrink,
                 torch.nn.Softshrink, torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AdaptiveMaxPoolNd,
                 torch.nn.FractionalMaxPool2d, torch.nn.FractionalMaxPool3d)
_KINK_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> warned or found smooth


def _kink_in(out: torch.Tensor, model) -> str | None:
    """The first op in out's autograd graph, or module of the model, whose derivative jumps (None when
    there is none). Kinks in plain function calls inside a compiled region are out of sight."""
    if isinstance(model, torch.nn.Module):
        for m in model.modules():
            fused_act = getattr(m, "act", None) if type(m).__module__.startswith("gradreg_fast.nn") else None
            if isinstance(m, _KINK_MODULES) or fused_act in KINKED:
                return type(m).__name__ if fused_act is None else f"fused {fused_act}"
    for node in graph_nodes(out):
        name = node.name()
        if name in _KINK_NODES:
            return name
        if name.startswith(_FUSED_ACT_NODE):
            args = getattr(node, "args", None)
            act = args[0] if args else None
            if isinstance(act, int) and 0 <= act < len(ACTIVATIONS) and ACTIVATIONS[act] in KINKED:
                return f"fused {ACTIVATIONS[act]}"
    return None


def _warn_kinks(p: Problem) -> None:
    """Warn, once per model, when fd runs on a model with kinks (see FDKinkWarning)."""
    try:
        if p.model in _KINK_CHECKED:
            return
        _KINK_CHECKED[p.model] = True
    except TypeError:   # a model that cannot be weakly referenced: checked on every call
        pass
    kink = _kink_in(p.u, p.model)
    if kink is not None:
        warnings.warn(
            f"method='fd' on a model with piecewise-linear layers ({kink}): a finite-difference step that "
            "crosses their kinks makes fd's parameter gradient that of a finite-difference penalty, not an "
            "estimate of double backprop's (cosine 0.05-0.5 to exact on LeNet and a ResNet; LeNet on MNIST "
            "trained with fd ended 1.6-3.4 points below exact with DoubleBack and SpectReg). For the penalty "
            "itself use method='exact' or method='hvp'; to train the finite-difference penalty on purpose, "
            "silence this with warnings.filterwarnings('ignore', category=gradreg_fast.FDKinkWarning)",
            FDKinkWarning, stacklevel=2)


def exact(p: Problem) -> torch.Tensor:
    """Double backpropagation: the penalty with create_graph=True, differentiated by autograd.

    P_b = scale · Σ_j ‖G[j, b]‖², exact value and exact parameter gradient. One forward pass
    (the caller's), one batched create_graph backward for all n cotangents, and the caller's
    final backward through both graphs. The input gradient's graph is searched for ops that cannot
    be differentiated again (an op without a double backward, a once_differentiable custom
    Function): with one, the gradient would be wrong or fail far from here, so the call refuses.
    """
    g = input_vjps(p, create_graph=True)
    if not g.requires_grad:
        raise ValueError("the input gradient does not depend on the parameters through a twice-"
                         "differentiable graph (an op in the model has no double backward, or the "
                         "model has no parameters on the path from x): method='exact' cannot train "
                         "with this penalty; method='fd' needs first derivatives only")
    blocker = _not_twice_differentiable(g)
    if blocker is not None:
        known = next((NO_DOUBLE_BACKWARD[n.name()] for n in graph_nodes(p.u)
                      if n.name() in NO_DOUBLE_BACKWARD), None)
        op = (f"{known}, whose backward torch cannot differentiate; the library swaps in a twice-differentiable "
              "twin when it runs the forward itself, as crit(model, x, y) and gr.penalty(kind, model, x) do"
              if known else f"autograd node {blocker}: an op whose backward is not differentiable, such as a "
              "custom autograd.Function marked once_differentiable or a fused attention kernel")
        raise ValueError(
            f"method='exact' needs the model's double backward, and an op in the model has none "
            f"({op}). Use method='fd' "
            "(first derivatives only). For attention, call the penalty as crit(model, x, y) or "
            "gr.penalty(kind, model, x): the library then runs the forward on the twice-differentiable "
            "math kernel; with precomputed logits, run the forward under "
            "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)")
    return reduce_samples(p, _penalty_value(p, g))


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


class _Deferred(torch.autograd.Function):
    """value (B,) whose backward, given the caller's per-sample weights w (B,), returns the gradients
    of Σ_b w_b P_b with respect to ``inputs`` (the parameters, and x when it requires grad).

    ``pre`` holds those gradients for w = 1 (computed at the penalty call, so that a model the method
    cannot serve is refused there, not in the caller's backward; with a folded base loss, ``pre``
    holds its gradients too, see ``_fold``). When the penalty is reduced (mean
    or sum) the caller's weights are equal across the batch and the backward scales ``pre``;
    with reduction="none" it calls ``grads_fn(w)`` for the weights the caller applied.
    """

    @staticmethod
    def forward(ctx, value, grads_fn, pre, uniform, *inputs):
        ctx.grads_fn, ctx.pre, ctx.uniform = grads_fn, pre, uniform
        return value.detach().clone()

    @staticmethod
    def backward(ctx, w):
        if ctx.uniform:
            c = w.reshape(-1)[0]
            grads = [None if g is None else c.to(g.dtype) * g for g in ctx.pre]
        else:
            with torch.enable_grad(), serialized():   # re-runs and forward-mode AD: docs/threads.md
                grads = ctx.grads_fn(w.detach())
        return (None, None, None, None, *grads)


def _differentiated(p: Problem) -> tuple[list[str], list[torch.Tensor]]:
    params = p.parameters()
    if not params and not p.attached:
        raise ValueError("the model has no trainable parameters (and x does not require grad): "
                         "the penalty has nothing to differentiate")
    return list(params), list(params.values()) + ([p.x] if p.attached else [])


def _fold(p: Problem, inputs: list[torch.Tensor], clean: torch.Tensor | None) -> list[torch.Tensor | None] | None:
    """The gradients, on the clean forward's graph, of the caller's base loss (``p.fold``) and of
    ``clean`` (a scalar on that graph that belongs to the penalty), scaled to the penalty's
    convention (gradients of Σ_b P_b): one backward that frees the clean graph. None when there is
    nothing to fold: no base loss offered, per-sample penalties (the caller's weights are known only
    in its backward), or a sharded model (FSDP reduces gradients in its own backward hooks)."""
    fold = p.fold
    if fold is None or _reduction(p) == "none" or p.sharded or not fold.loss.requires_grad:
        return None
    per_sample = p.x.shape[0] if _reduction(p) == "mean" else 1   # pen = Σ_b P_b / per_sample
    scalar = fold.loss * (fold.weight * per_sample)
    if clean is not None:
        scalar = scalar + clean.to(scalar.dtype)
    keep = _fold_inputs(p, scalar, inputs)
    if keep is None:
        return None
    found = iter(torch.autograd.grad(scalar, [t for t, k in zip(inputs, keep, strict=True) if k], allow_unused=True))
    fold.taken = True
    return [next(found) if k else None for k in keep]


def _fold_inputs(p: Problem, scalar: torch.Tensor, inputs: list[torch.Tensor]) -> list[bool] | None:
    """Which ``inputs`` the fold differentiates (all of them, unless x is attached to parameters of the
    model, e.g. x = the model's own embedding lookup), or None: no fold.

    The fold's gradient for x reaches the layers upstream of x through the caller's backward (the
    penalty's x gradient rides there too), so the fold must not also differentiate the parameters
    upstream of x through x: that would count their base-loss gradient twice and free the graph the
    caller's backward still needs. Those parameters are left out of the fold (autograd then stops at
    x); a parameter used both upstream of x and past it (tied weights) would lose its direct term,
    so then the base loss is not folded at all (it stays on the caller's graph)."""
    if not p.attached:
        return [True] * len(inputs)
    upstream = _leaves(p.x)
    if not upstream:
        return [True] * len(inputs)
    if upstream & _leaves(scalar, stop=p.x.grad_fn):
        return None
    return [t is p.x or id(t) not in upstream for t in inputs]


def _leaves(t: torch.Tensor, stop=None) -> set[int]:
    """ids of the leaf tensors (AccumulateGrad nodes) in t's graph, not walking past ``stop``."""
    return {id(node.variable) for node in graph_nodes(t, stop) if hasattr(node, "variable")}


def _deferred(p: Problem, value: torch.Tensor, grads_fn: Callable, clean: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` (B,) with the gradients ``grads_fn`` gives, taken at the call (see _Deferred).
    ``clean`` (B,): per-sample terms on the clean forward's graph whose gradients belong to P_b too (their
    values do not); folded with the caller's base loss (``_fold``) when there is one, else left in the
    caller's graph."""
    _, inputs = _differentiated(p)
    with torch.enable_grad():
        # first: the clean graph is freed before grads_fn's passes build theirs
        folded = _fold(p, inputs, None if clean is None else clean.sum())
        pre = grads_fn(torch.ones_like(value))
    if folded is not None:
        pre = [a if b is None else (b if a is None else a + b) for a, b in zip(pre, folded, strict=True)]
    out = _Deferred.apply(value, grads_fn, pre, _reduction(p) != "none", *inputs)
    if clean is not None and folded is None:
        out = out + (clean - clean.detach()).to(out.dtype)
    return out


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

        central (default, O(t²)):  ∇_θ P ≈ (2·scale/B) Σ_j Σ_b ‖G[j,b]‖
                                          · (∇_θ⟨R[j],u⟩_b(x + t d) − ∇_θ⟨R[j],u⟩_b(x − t d)) / (2t)
        forward (O(t)):           same with (∇_θ⟨R[j],u⟩_b(x + t d) − ∇_θ⟨R[j],u⟩_b(x)) / t

    realized as a surrogate Σ_b w_b ⟨R[j, b], u_b(x ± t d)⟩ through ordinary forward passes, so
    the caller's single backward does the rest: first derivatives only, it works through ops
    without a double backward. With a per-sample outer function (WGAN-GP: P_b = φ(s_b)), G[j, b] is
    replaced by φ′(s_b) · G[j, b] in the direction and the weight (φ′ fixed at the call; a negative
    φ′ flips the direction), so the same difference quotient estimates Σ_b φ′(s_b) ∇_θ s_b.
    Under autocast the perturbed passes run in fp32 (autocast off;
    the forward scheme then re-evaluates its base point in fp32 too); the step is computed in
    fp32 (fp64 for fp64 inputs). A sample with
    ‖G‖ = 0 is not perturbed and contributes 0. Each of the n cotangents costs one (forward) or
    two (central) extra forward passes of the model. With batch statistics (BatchNorm in training
    mode) the samples interact and G[j] is the batch's input gradient: the whole batch is then
    perturbed along d = G[j]/‖G[j]‖ (one norm over the batch) with weight ‖G[j]‖, which is the same
    formula for the batch as a whole. When x requires grad the perturbed passes start from x itself,
    so the layers upstream of x receive their (finite-difference) gradient too.

    What it computes: the *exact* parameter gradient of a finite-difference penalty, with G and d
    held fixed, P_t = (2·scale/B) Σ_j Σ_b ‖G[j,b]‖ (⟨R[j],u⟩_b(x + t d) − ⟨R[j],u⟩_b(x − t d)) / (2t)
    (the kind of regularizer of Finlay & Oberman 2019). On a twice continuously differentiable model
    P_t → P and its gradient → double backprop's as t → 0 (measured in fp32 at the default step:
    cosine ≥ 0.9999 to exact on a tanh MLP and a ViT). On a ReLU/max-pool model a step that crosses
    an activation kink changes the activation pattern, and the gradient is that of P_t, a smoothed
    penalty, not an estimate of double backprop's (measured at the default step: cosine 0.05–0.5 to
    exact on LeNet and a ResNet; ``benchmarks/fd_accuracy.py``); no step serves both regimes in fp32.
    A smaller step does not remove the difference: across a batch the samples whose step crosses a
    kink are about ∝ t in number, each contributing a jump ∝ 1/t, so the kinks' share of the gradient
    stays O(1) until t is below every sample's distance to its nearest kink (where fp32 rounding
    dominates). It matters for training: LeNet on MNIST trained with fd ended below exact's accuracy
    (``benchmarks/paper_estimators.py``). So fd warns (``FDKinkWarning``, once per model) when the
    model holds a layer, or its graph an op, whose derivative jumps (ReLU family, max-pooling, abs,
    clamp, max/min, gr.fuse's fused ReLU/LeakyReLU; inside a torch.compile'd region only the layers
    are visible).

    Memory and time: the evaluation points' gradients are computed at the call, one pass at a time
    (each pass's graph freed before the next), for an nn.Module; when the model is a pure per-sample
    function (no batch statistics, no random numbers drawn, no buffer changed in its forward) up to
    ``FD_ROWS`` rows of points share one batch (per-sample ``model_kwargs`` repeated to match); a model
    that fails on such a stacked batch (one that holds batch-sized state, such as a (B, T) attention
    mask) is run one point per pass, at the caller's batch size, from then on. The forward scheme's
    base point is the caller's own forward: under GradRegLoss its term and the base loss are
    differentiated at the call, in one
    backward that frees the clean graph before the perturbed passes run (``core.Fold``); otherwise
    its term rides the caller's backward. A plain callable (whose parameters are out of reach here)
    and an FSDP2-sharded model (whose gradients FSDP reduces in its own backward hooks) keep the
    passes in the caller's graph.
    """
    _needs_model(p, "fd", "method='exact'")
    h, scheme = _fd_options(p)
    _warn_kinks(p)
    if p.x.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(p.x.device.type):
        # a difference of two half-precision forwards at a small step is mostly rounding (measured:
        # gradients 150% off on a bf16 MLP); under autocast the perturbed passes run in fp32 instead
        raise ValueError(f"method='fd' differences two forward passes of a {p.x.dtype} model, which cancel "
                         "to rounding noise: use method='exact' or method='hvp', or keep the model in fp32 "
                         "and run it under torch.autocast (fd then takes its differences in fp32)")
    coupled = p.coupled
    if coupled and _reduction(p) == "none":
        raise ValueError("method='fd' on a model with batch statistics (BatchNorm in training mode) "
                         "perturbs the batch as a whole, so it gives the gradient of the reduced penalty "
                         "only: use reduction='mean' or 'sum', or method='exact' or 'hvp' for per-sample "
                         "penalties")
    g = input_vjps(p, create_graph=False, retain_graph=True).detach()
    value = _penalty_value(p, g)
    factor = _outer_factor(p, g)   # φ′(s_b) with an outer function (WGAN-GP), else None
    n, batch = g.shape[0], g.shape[1]
    work = torch.promote_types(p.x.dtype, torch.float32)
    x0 = p.x.detach().to(work)
    if h < 100 * torch.finfo(work).eps:
        raise ValueError(f"fd_h={h:g} is below what {work} resolves (x + t·d rounds to x, the differences to "
                         f"0): use fd_h >= {100 * torch.finfo(work).eps:.1e} for {p.x.dtype} inputs (default 1e-3)")
    # in fp64: x² of fp32 inputs near the float range overflows (|x| ~ 1e37 gave an inf step, NaN gradients)
    rms = (torch.linalg.vector_norm(x0, dtype=torch.float64) / math.sqrt(max(1, x0.numel()))).to(work)
    step = h * torch.where(rms > 0, rms, torch.ones_like(rms))
    gw = g.to(work)
    if factor is not None:
        # ∇_θ Σ_b φ(s_b) = Σ_b φ′(s_b) ∇_θ s_b: difference along φ′(s_b)·G[j, b] instead of G[j, b]
        gw = gw * factor.to(work).reshape((1, batch) + (1,) * (g.dim() - 2))
    if coupled:   # one direction for the whole batch: G[j] is the batch's input gradient
        norms = gw.reshape(n, -1).norm(dim=1).reshape(n, 1).expand(n, batch)
    else:
        norms = gw.reshape(n, batch, -1).norm(dim=2)                          # (n, B)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    d = gw / safe.reshape((n, batch) + (1,) * (g.dim() - 2))                  # 0 where ‖G‖ = 0
    weights = 2.0 * p.scale * norms / step                                    # (n, B)
    autocast_on = torch.is_autocast_enabled(p.x.device.type)
    zdtype = work if autocast_on else p.x.dtype   # the model's own dtype unless autocast decides
    # the evaluation points: (coefficient, j, sign) for x + sign·t·d[j]
    if scheme == "central":
        points = [(0.5 * sign, j, sign) for j in range(n) for sign in (1.0, -1.0)]
    else:
        points = [(1.0, j, 1.0) for j in range(n)]
        if autocast_on:   # the base point in fp32 too (the caller's forward ran in low precision)
            points += [(-1.0, j, 0.0) for j in range(n)]
    # gradients at the call need the parameters; a plain callable hides them, and FSDP2 reduces
    # gradients in its own backward hooks: both keep the passes in the caller's graph
    module = isinstance(p.model, torch.nn.Module) and not p.sharded
    batched = not coupled and not p.replay_needed and len(points) > 1 and not _fixed_batch(p.model)
    per_pass = max(1, FD_ROWS // batch) if batched else 1
    chunks = [points[i:i + per_pass] for i in range(0, len(points), per_pass)]

    def over_chunks(each: Callable) -> list:
        """[each(chunk) for each chunk]; when a stacked pass fails (a model that takes only the caller's
        batch size, e.g. one holding a (B, T) attention mask), again with one point (B rows) per pass,
        and that model is remembered (``_fixed_batch``)."""
        try:
            return [each(chunk) for chunk in chunks]
        except Exception:
            if per_pass == 1:
                raise
            with contextlib.suppress(TypeError):   # a model that cannot be weakly referenced
                _FIXED_BATCH[p.model] = True
        return [each([point]) for point in points]

    def terms(chunk, x_start: torch.Tensor, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-sample Σ_points c · weights[j, b] ⟨R[j, b], u_b(x + sign·t·d[j])⟩ (B,) of one chunk of
        points, its inputs in one batch; and that batch (the step t·shrink with ``shrink``: the step
        check). Autocast is off here (and must stay off for a backward of it: autograd.grad runs the
        backward ops in this thread)."""
        z = torch.cat([x_start + sign * shrink * step * d[j] for _, j, sign in chunk]).to(zdtype)
        if p.attached and not z.requires_grad:   # from the detached x: a leaf whose gradient is x's
            z.requires_grad_()
        out = p.run_model(z)
        if out.shape[0] != z.shape[0]:
            raise ValueError(f"method='fd': the model returned {out.shape[0]} rows for an input of {z.shape[0]}: "
                             "its forward must keep the batch (one output row per input row)")
        # the map to u per block of B rows: it may hold per-sample labels or projections
        us = [p.transform(out[k * batch:(k + 1) * batch]).to(work) for k in range(len(chunk))]
        return sum(c * (weights[j] / shrink) * (us[k] * p.R[j].to(work)).sum(1)
                   for k, (c, j, _) in enumerate(chunk)), z

    def base_point() -> torch.Tensor:
        """Σ_j weights[j, b] ⟨R[j, b], u_b(x)⟩ (B,) on the caller's forward: the forward scheme's base point."""
        return sum(weights[j].reshape(batch, 1).to(p.u.dtype) * p.u * p.R[j] for j in range(n)).sum(1)

    if module:
        params = list(p.parameters().values())

        def grads(w: torch.Tensor, shrink: float = 1.0) -> list[torch.Tensor | None]:
            """∇_{θ, x} Σ_b w_b terms_b, one forward and backward per chunk: each pass's graph is freed
            before the next."""
            total: list[torch.Tensor | None] = [None] * (len(params) + int(p.attached))
            wk = w.to(work).reshape(batch)

            def each(chunk) -> list[torch.Tensor | None]:
                with torch.autocast(p.x.device.type, enabled=False):
                    t, z = terms(chunk, x0, shrink)
                    found = torch.autograd.grad((wk * t).sum(), params + ([z] if p.attached else []),
                                                allow_unused=True)
                if p.attached:   # z = x + constant: its gradient is x's, summed over the chunk's blocks
                    found = list(found[:-1]) + [found[-1].reshape((len(chunk),) + tuple(x0.shape)).sum(0)
                                                .to(p.x.dtype)]
                return list(found)
            for found in over_chunks(each):
                total = [a if b is None else (b if a is None else a + b) for a, b in zip(total, found, strict=True)]
            return total
        if scheme == "central" or autocast_on:   # the forward scheme's base term is outside grads
            _check_step(p, h, scheme, grads, torch.ones_like(value))
        # the forward scheme's base point is the caller's own forward: its term is on the clean graph
        out = _deferred(p, value, grads, clean=-base_point() if scheme == "forward" and not autocast_on else None)
    else:
        # the passes stay in the caller's graph (starting from x itself when x requires grad) and the
        # caller's backward differentiates them
        xs = p.x.to(work) if p.attached else x0
        with torch.autocast(p.x.device.type, enabled=False):
            linear = sum(over_chunks(lambda chunk: terms(chunk, xs)[0]))
        out = _surrogate(value, linear)
        if scheme == "forward" and not autocast_on:   # the base point's term rides the caller's backward
            base = base_point()
            out = out - (base - base.detach()).to(out.dtype)
    return reduce_samples(p, out)


_FIXED_BATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # models fd runs one point per pass

FD_STATED_RTOL = 3e-3   # the relative gradient error the README states for fd on smooth models


class FDStepWarning(UserWarning):
    """method='fd' on a smooth model whose curvature makes the default step too coarse: the step-halving
    estimate of fd's relative gradient error exceeds ``FD_STATED_RTOL`` (see ``_check_step``)."""


_STEP_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> penalty kinds checked


def _check_step(p: Problem, h: float, scheme: str, grads: Callable, ones: torch.Tensor) -> None:
    """Estimate fd's truncation error at step h by halving it (Richardson), once per (model, penalty
    kind), and warn (``FDStepWarning``) when it exceeds FD_STATED_RTOL. Models with kinks are skipped
    (FDKinkWarning says more there).

    fd's parameter gradient g_t has error c·t^q + o(t^q) (q = 2 central, 1 forward), so
    g_t − g_{t/2} = (1 − 2^-q)·c·t^q and the error at t is estimated as ‖g_t − g_{t/2}‖ / (1 − 2^-q),
    relative to ‖g_{t/2}‖. Costs two more sets of fd passes on the first call."""
    if not isinstance(p.model, torch.nn.Module):
        return
    try:
        kinds = _STEP_CHECKED.setdefault(p.model, set())
    except TypeError:
        return   # not weakly referenceable: never checked (it would cost three fd evaluations per call)
    if p.kind in kinds:
        return
    kinds.add(p.kind)
    if _kink_in(p.u, p.model) is not None:
        return
    coarse, fine = grads(ones), grads(ones, 0.5)
    pairs = [(a, b) for a, b in zip(coarse, fine, strict=True) if a is not None and b is not None]
    ref = math.sqrt(sum(float(b.double().pow(2).sum()) for _, b in pairs))
    if not pairs or ref == 0.0:
        return
    diff = math.sqrt(sum(float((a.double() - b.double()).pow(2).sum()) for a, b in pairs))
    est = diff / ref / (1.0 - 2.0 ** -(2 if scheme == "central" else 1))
    if est > FD_STATED_RTOL:
        warnings.warn(
            f"method='fd' at fd_h={h:g} ({scheme}): the step-halving estimate of the parameter gradient's "
            f"relative error is {est:.1e}, above the {FD_STATED_RTOL:g} stated for smooth models (the model's "
            "curvature makes the step coarse: the error falls as the step's square). Use method='exact' or "
            f"method='hvp' for double backprop's gradient, or a smaller step (fd_h={h / 10:g}: about "
            f"{est / (100 if scheme == 'central' else 10):.0e} expected, until fp32 rounding dominates). "
            "Checked once per model and penalty kind", FDStepWarning, stacklevel=2)


def _fixed_batch(model) -> bool:
    """Whether fd has seen ``model`` fail on its stacked points (see fd's ``over_chunks``)."""
    try:
        return model in _FIXED_BATCH
    except TypeError:   # a model that cannot be weakly referenced: tried stacked on every call
        return False


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


METHODS: dict[str, Callable[[Problem], torch.Tensor]] = {"exact": exact, "hvp": hvp, "fd": fd, "jvp": jvp}
assert tuple(METHODS) == _methods.NAMES, "estimators.METHODS and gradreg_fast._methods.SPECS must name the same methods"
