"""method="fd": finite differences of the parameter gradient (first-order passes only), with its kink
detection (``FDKinkWarning``) and step check (``FDStepWarning``)."""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable

import torch

from gradreg_fast._bias_act_spec import ACTIVATIONS, KINKED
from gradreg_fast.penalties.core import Problem
from gradreg_fast.penalties.estimators._shared import (
    _needs_model,
    _outer_factor,
    _penalty_value,
    _reduction,
    _surrogate,
    hooked,
    input_vjps,
    reduce_samples,
)
from gradreg_fast.penalties.estimators.fold import _deferred
from gradreg_fast.penalties.guards import graph_nodes

FD_SCHEMES = ("central", "forward")
DEFAULT_FD_H = 1e-3
# fd evaluates its points in batches of up to this many rows when the model is a pure per-sample
# function (no batch statistics, no random numbers, no buffer updates)
FD_ROWS = 512


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
    # the gradients are taken at the call on a module, unless a Tensor.register_hook on a parameter (or
    # on x) would then run twice (``_shared.hooked``): then the passes stay in the caller's graph
    module = (isinstance(p.model, torch.nn.Module) and not p.sharded
              and not hooked(list(p.parameters().values()) + ([p.x] if p.attached else [])))
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
