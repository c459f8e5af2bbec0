"""The gradient penalties of docs/method.md as one computation: squared norms of input-space VJPs.

Every penalty kind reduces to

    P = scale · mean_i Σ_j ‖ ∂( Σ_b R[j, b] · u(x_b) ) / ∂x_i ‖²

with a per-sample target u (B, K') and cotangents R (n, B, K'), each kind's given by its row of
the table in kinds.py (``build_problem`` reads it).

The GAN kinds take a discriminator D with one score per sample. R1 is the plain ‖∇ₓD(x)‖² (R2: the
same called on generated data). WGAN-GP evaluates D at interpolates x̂ = x_fake + ε (x_real − x_fake),
ε ~ U(0, 1) per sample, and applies a per-sample *outer function* φ to s_b = scale · Σ_j ‖G[j, b]‖²:
P_b = φ(s_b) (``Problem.outer``, with its derivative ``Problem.outer_grad``), so that
∇_θ P_b = φ′(s_b) · ∇_θ s_b, which every estimator gets from its own ∇_θ s_b (see the estimators package).

(the per-sample reading assumes samples do not interact inside the model: with BatchNorm in
training mode the "per-sample" gradient is that of the batch statistic). An estimator (``method``)
turns a Problem into a scalar whose gradient with respect to the parameters is the penalty's.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from gradreg_fast import _twins
from gradreg_fast.penalties import _checks, kinds
from gradreg_fast.penalties.guards import graph_nodes


def math_attention():
    """A context in which scaled_dot_product_attention (and nn.MultiheadAttention, which calls it) runs
    its math kernel: the fused flash/efficient kernels have neither a double backward nor a forward-mode
    derivative, the math kernel has both. Used around the forwards whose second derivatives the
    library takes itself (method="exact"'s forward, hvp's and jvp's functional re-runs)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def second_order(twins: bool = True) -> Iterator[None]:
    """The context of a forward the library differentiates twice: attention on the math kernel
    (``math_attention``) and, with ``twins``, the ops without a double backward or forward-mode rule
    replaced by their twice-differentiable twins (gradreg_fast._twins: hardsigmoid); outputs unchanged."""
    with math_attention(), (_twins.twice_differentiable() if twins else contextlib.nullcontext()):
        yield


def twin_ops_in(t: torch.Tensor) -> bool:
    """Whether t's autograd graph holds an op that the twins replace (gradreg_fast._twins)."""
    return any(node.name() in _twins.NO_DOUBLE_BACKWARD for node in graph_nodes(t))


# autograd nodes of the fused attention kernels (flash, memory-efficient, cuDNN, the CPU flash kernel):
# none has a double backward; ``math_attention`` runs scaled_dot_product_attention without them
FUSED_ATTENTION_NODES = frozenset((
    "ScaledDotProductFlashAttentionBackward0", "ScaledDotProductFlashAttentionForCpuBackward0",
    "ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0",
    "ScaledDotProductFusedAttentionOverrideableBackward0", "FlashAttentionBackward0",
    "EfficientAttentionBackward0", "CudnnAttentionBackward0"))

# models whose forward called a fused attention kernel (seen in its graph by run_forward): their
# second-order forwards run on the math kernel from the start
_MATH_ATTENTION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _known(table: weakref.WeakKeyDictionary, model) -> bool:
    try:
        return model in table
    except TypeError:   # not weakly referenceable: never remembered
        return False


def _second_order_needs(t: torch.Tensor) -> tuple[bool, bool]:
    """(twins, math attention): whether t's graph holds an op the twins replace, and a fused attention
    kernel (one walk)."""
    twins = attention = False
    for node in graph_nodes(t):
        name = node.name()
        twins = twins or name in _twins.NO_DOUBLE_BACKWARD
        attention = attention or name in FUSED_ATTENTION_NODES
    return twins, attention


def run_forward(model: Callable, x: torch.Tensor, method: str | None,
                model_kwargs: dict | None = None) -> torch.Tensor:
    """``model(x, **model_kwargs)`` for a penalty the library computes itself: in ``second_order()`` when
    the method differentiates this forward twice (method="exact") and the model needs it, on the
    model's own kernels otherwise.

    Entering ``second_order`` costs Python work on every call (the twins' mode, on every torch call of
    the forward), so exact enters it only for a model known to need it: one holding a module the twins
    replace (``_twins.needed``), or one whose forward was seen to call an op the twins replace (a
    functional F.hardsigmoid) or a fused attention kernel (``FUSED_ATTENTION_NODES``). Any other model
    runs on its own kernels (on the math attention kernel once seen calling a fused one); when the graph
    of that forward holds such an op, the model is remembered and the forward run again in
    ``second_order``, as the first ran (same random numbers, same buffers: ``Replay``)."""
    kwargs = model_kwargs or {}
    if method != "exact":
        return model(x, **kwargs)
    if _twins.needed(model):
        with second_order():
            return model(x, **kwargs)
    replay = Replay(model, x.device)
    # a model seen calling a fused attention kernel runs on the math kernel from the start, and its graph
    # is still searched for the twins' ops
    with math_attention() if _known(_MATH_ATTENTION, model) else contextlib.nullcontext():
        out = model(x, **kwargs)
    if not isinstance(out, torch.Tensor):
        return out
    twins, attention = _second_order_needs(out)
    if not (twins or attention):
        return out
    if twins:
        _twins.remember(model)
    if attention:
        with contextlib.suppress(TypeError):
            _MATH_ATTENTION[model] = True
    del out
    with replay.context(), second_order(twins=twins):
        return model(x, **kwargs)


def check_model_kwargs(model_kwargs) -> dict:
    """``model_kwargs`` as a dict (None: {}), or a TypeError naming the argument."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError("model_kwargs must be a dict of keyword arguments for the model (e.g. "
                        f"{{'attention_mask': mask}}), got {type(model_kwargs).__name__}")
    return model_kwargs


def _per_sample_arg(v, batch: int) -> bool:
    """Whether a model keyword argument is per sample: a tensor whose first dimension is the batch."""
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch


def select_kwargs(model_kwargs: dict, batch: int, idx: torch.Tensor) -> dict:
    """The model keyword arguments of the samples ``idx`` (a sub-batch): per-sample tensors (first
    dimension = the batch) indexed, everything else as it is."""
    return {k: v[idx.to(v.device)] if _per_sample_arg(v, batch) else v for k, v in model_kwargs.items()}


def repeat_kwargs(model_kwargs: dict, batch: int, rows: int) -> dict:
    """The model keyword arguments for an input of ``rows`` = m·batch rows (m copies of the batch, as
    fd's batched passes stack them): per-sample tensors repeated m times along dim 0."""
    if rows == batch:
        return model_kwargs
    return {k: v.repeat((rows // batch,) + (1,) * (v.dim() - 1)) if _per_sample_arg(v, batch) else v
            for k, v in model_kwargs.items()}


def batch_coupled(model) -> bool:
    """True when the model normalizes with batch statistics (BatchNorm in training mode, or with
    track_running_stats=False): its samples interact, so a per-sample input gradient is that of the
    batch. InstanceNorm, GroupNorm and LayerNorm normalize within a sample and do not couple."""
    return isinstance(model, nn.Module) and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
        for m in model.modules())


# The library's calls hold this lock from the model's first forward to the end of the penalty (and
# around the re-runs a deferred backward makes): torch's CPU random number generator and its
# forward-mode AD levels are process-wide, so two threads running penalties at once would replay
# each other's dropout masks or nest each other's dual levels. Re-entrant: a call may nest another.
_CALL_LOCK = threading.RLock()


def serialized() -> contextlib.AbstractContextManager:
    """The lock every gr.penalty / GradRegLoss call holds (see docs/threads.md): calls from several
    threads run one at a time."""
    return _CALL_LOCK


def forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """torch's global RNG (the CPU generator, and ``device``'s when it is a CUDA device) as it was on
    entry, again on exit."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda")


def serialized_call(fn: Callable) -> Callable:
    """``fn`` holding the call lock (see ``serialized``)."""
    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with _CALL_LOCK:
            return fn(*args, **kwargs)
    return locked


class ReplayError(RuntimeError):
    """A re-run of the model did not draw the random numbers its original forward drew."""


class Replay:
    """Re-runs the model on new inputs as the original forward ran: same random numbers (dropout
    masks), same buffers as before that forward (BatchNorm running statistics, spectral norm's power
    iteration vectors), and no side effects: after a re-run the RNG and the buffers are as the
    original forward left them, so a call updates buffers and advances the RNG exactly as one plain
    forward does.

    Capture it *before* the original forward pass (``Replay(model, x.device)``): it snapshots the RNG
    state and the buffers then. The first use (``needed``) records the RNG state the original forward
    ended at; each ``context`` restores the snapshot for its duration and checks on exit that the
    re-run ended at that same state: another thread drawing from torch's process-wide generator
    meanwhile would have changed the masks, and the re-run then raises ``ReplayError`` rather than
    give a silently wrong gradient.
    """

    def __init__(self, model: Callable, device: torch.device):
        self.model = model
        self.device = torch.device(device)
        self.start = self._rng_state()
        self.buffers_before = ({k: b.detach().clone() for k, b in model.named_buffers()}
                               if isinstance(model, nn.Module) else {})
        self.end: tuple | None = None        # the RNG state the original forward ended at
        self._needed: bool | None = None

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        return all((s is None and t is None) or (s is not None and t is not None and torch.equal(s, t))
                   for s, t in zip(a, b, strict=True))

    @property
    def needed(self) -> bool:
        """Whether re-runs must be replayed: the original forward drew random numbers (the RNG state
        moved since the snapshot) or changed a buffer. Decided once, at the first use (the penalty
        call, right after the original forward, before anything else draws from the RNG). When False
        the model is a pure function of its input and parameters, so a re-run needs no context and
        may take several inputs in one batch."""
        if self._needed is None:
            self.end = self._rng_state()
            current = dict(self.model.named_buffers()) if isinstance(self.model, nn.Module) else {}
            changed = any(k not in current or not torch.equal(current[k], b)
                          for k, b in self.buffers_before.items())
            self._needed = not self._same(self.end, self.start) or changed
        return self._needed

    def original(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Replay]:
        """``forward()`` (the model on other inputs, e.g. subsample's sub-batch) run as a re-run of the
        original forward: from the snapshot's RNG state and buffers, with no side effects. Returns its
        output and the Replay whose original forward it is (its re-runs replay this forward)."""
        sub = copy.copy(self)
        sub.end, sub._needed = None, None
        with self._swapped(restore_buffers=True):
            out = forward()
            _ = sub.needed   # decided on this forward's own draws and buffer updates
        return out, sub

    def buffer_copies(self) -> dict[str, torch.Tensor]:
        """Fresh copies of the buffers as they were before the original forward (for functional calls,
        whose in-place buffer updates must touch neither the module nor the snapshot)."""
        return {k: b.clone() for k, b in self.buffers_before.items()}

    @contextlib.contextmanager
    def _swapped(self, restore_buffers: bool) -> Iterator[None]:
        buffers = (dict(self.model.named_buffers()) if isinstance(self.model, nn.Module) and restore_buffers
                   else {})
        after = {k: b.detach().clone() for k, b in buffers.items()}
        with _CALL_LOCK, forked_rng(self.device):
            self._set_rng_state(self.start)
            try:
                # through .data: the original forward's graph may have saved these buffers (BatchNorm
                # keeps its running statistics as inputs of its backward, which in training mode does
                # not read them), and swapping them must not trip autograd's version check
                with torch.no_grad():
                    for k, b in buffers.items():
                        if k in self.buffers_before:
                            b.data.copy_(self.buffers_before[k])
                yield
            finally:
                with torch.no_grad():
                    for k, b in buffers.items():
                        b.data.copy_(after[k])

    @contextlib.contextmanager
    def context(self, restore_buffers: bool = True) -> Iterator[None]:
        """A re-run of the model: the snapshot's RNG state and buffers inside, everything as before
        on exit; raises ReplayError when the re-run did not end at the original forward's RNG state."""
        with self._swapped(restore_buffers):
            yield
            if self.end is not None and not self._same(self._rng_state(), self.end):
                raise ReplayError(
                    "gradreg_fast: a re-run of the model for the penalty drew other random numbers than its "
                    "original forward (the dropout masks would differ, a silently wrong gradient): something "
                    "drew from torch's process-wide random number generator between the model's forward and "
                    "the penalty (another thread?), or the model draws a number of random values that depends "
                    "on its input. Run the steps of models with dropout from one thread at a time (see "
                    "docs/threads.md), or use method='exact', which does not re-run the model")


@dataclass
class Fold:
    """The rest of the caller's loss, for an estimator that takes the penalty's parameter gradients at
    the call (hvp, fd, jvp on an nn.Module) to differentiate there too.

    GradRegLoss's loss is λ·(P + weight·loss): ``loss`` is its base loss (a scalar on the clean
    forward's graph) and ``weight`` = 1/λ (1/(λ·every) under a schedule). Differentiated at the call,
    in one backward over the clean graph right after the input gradient G, the clean graph is freed
    before the estimator's own passes build theirs (the peak then holds one graph, not two), and the
    caller's backward does not walk the model again. The estimator sets ``taken``; the caller then
    detaches its base loss (its gradient rides the penalty's, and like it carries no graph: a caller
    who differentiates the loss twice needs method='exact')."""
    loss: torch.Tensor
    weight: float
    taken: bool = False


@dataclass
class Problem:
    """A penalty instance: everything an estimator needs.

    ``target(z)`` re-evaluates z -> u with the model (same dropout masks and buffers as the original
    forward, no buffer side effects); ``target(z, params)`` does so with the parameters replaced
    (torch.func.functional_call) and composite ops only (``transform_func``), which the torch.func
    estimators need. Both are unavailable (``model is None``) when only the logits were given
    (GradRegLoss's ``crit(logits, y, inputs=x)`` form).
    """

    kind: str
    x: torch.Tensor            # the input as seen by the graph (requires grad)
    u: torch.Tensor            # (B, K') targets, computed from x
    R: torch.Tensor            # (n, B, K') cotangents
    scale: float
    model: Callable | None = None                 # the model (None if unknown)
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # model output -> u
    # the same map written with composite torch ops, for torch.func transforms (None: ``transform``,
    # which is composite already); the fused custom ops have no forward-mode rule
    transform_func: Callable[[torch.Tensor], torch.Tensor] | None = None
    replay: Replay | None = None
    n_proj: int = 1
    generator: torch.Generator | None = None
    options: dict = field(default_factory=dict)    # estimator options (fd_h, fd_scheme, ...)
    # per-sample outer function: P_b = outer(s_b), s_b = scale · Σ_j ‖G[j, b]‖² (None: P_b = s_b);
    # ``outer`` is differentiable by autograd, ``outer_grad`` its derivative φ′ (both elementwise on (B,))
    outer: Callable[[torch.Tensor], torch.Tensor] | None = None
    outer_grad: Callable[[torch.Tensor], torch.Tensor] | None = None
    sharded: bool = False   # the model is sharded with FSDP2 (set by gradreg_fast.distributed.fsdp_estimator)
    fold: Fold | None = None   # the caller's base loss, to differentiate at the call (see Fold)
    # keyword arguments of every model call (an attention mask): per-sample tensors (first dimension =
    # the batch) follow the rows of each re-run's input (``repeat_kwargs``)
    model_kwargs: dict = field(default_factory=dict)

    @property
    def attached(self) -> bool:
        """Whether the caller's x requires grad (a leaf they marked, or the output of upstream layers such
        as an embedding): then the penalty's gradient flows into x too, for every method."""
        return not self.x.is_leaf

    @property
    def depends_on_x(self) -> bool:
        """Whether u's autograd graph reaches x (an output that only broadcasts a parameter, e.g. a bias
        expanded to (B, K), requires grad without depending on x)."""
        if not self.u.requires_grad:
            return False
        if self.x.grad_fn is not None:
            return any(node is self.x.grad_fn for node in graph_nodes(self.u))
        return any(getattr(node, "variable", None) is self.x for node in graph_nodes(self.u))

    @property
    def coupled(self) -> bool:
        """Whether the samples interact inside the model (batch statistics; see ``batch_coupled``)."""
        return batch_coupled(self.model)

    @property
    def replay_needed(self) -> bool:
        """Whether re-runs of the model must replay the original forward (see ``Replay.needed``)."""
        return self.replay is not None and self.replay.needed

    def target(self, z: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        if params is None:
            return self.transform(self.run_model(z))
        return (self.transform_func or self.transform)(self.run_model(z, params))

    def run_model(self, z: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """The model's raw output at z (flattened to (B, K)), replayed as the original forward."""
        if self.model is None:
            raise ValueError("this estimator re-evaluates the model, which is unknown here")
        # a functional call gets copies of the buffers (below), so there is nothing to restore
        ctx = (self.replay.context(restore_buffers=params is None) if self.replay_needed
               else contextlib.nullcontext())
        kwargs = repeat_kwargs(self.model_kwargs, self.x.shape[0], z.shape[0])
        with ctx:
            if params is None:
                out = self.model(z, **kwargs)
            else:
                # buffers as the original forward saw them, passed as copies so that in-place updates
                # (BatchNorm statistics, spectral norm's power iteration) never touch the module's own
                module = self.functional_module()
                buffers = (self.replay.buffer_copies() if self.replay is not None
                           else {k: b.clone() for k, b in module.named_buffers()})
                with second_order(twins=self.twins_needed()):
                    out = torch.func.functional_call(module, (params, buffers), (z,), kwargs)
        return out.reshape(out.shape[0], -1)

    def twins_needed(self) -> bool:
        """Whether the functional re-runs need the twins' mode (gradreg_fast._twins): the model is known
        to, or the caller's forward (u's graph) holds an op they replace (then the model is remembered)."""
        if _twins.needed(self.model):
            return True
        if twin_ops_in(self.u):
            _twins.remember(self.model)
            return True
        return False

    def functional_module(self) -> nn.Module:
        """The module the torch.func estimators call (a torch.compile'd module's original: the compiled
        region has no forward-mode rule, and the two compute the same function)."""
        if not isinstance(self.model, nn.Module):
            raise ValueError("this estimator needs the model as an nn.Module to reach its parameters")
        return getattr(self.model, "_orig_mod", self.model)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The model's trainable parameters by name (needs an nn.Module)."""
        return {k: p for k, p in self.functional_module().named_parameters() if p.requires_grad}


def differentiable_input(x: torch.Tensor) -> torch.Tensor:
    """x as a graph input that requires grad, without touching the caller's tensor.

    A leaf x that does not require grad is detached and marked; an x that already requires grad
    (possibly produced by upstream layers) is viewed, so gradients still flow upstream. An x whose
    elements share memory (expanded, stride 0) is copied first: the estimators' in-place
    accumulations on tensors shaped like x cannot write to it.
    """
    if torch._debug_has_internal_overlap(x) == 1:
        x = x.contiguous()   # differentiable: an attached x keeps its graph
    if x.requires_grad:
        return x.view_as(x)
    leaf = x.detach().requires_grad_(True)
    key = id(leaf)
    _MADE_INPUTS[key] = weakref.ref(leaf, lambda _, key=key: _MADE_INPUTS.pop(key, None))
    return leaf


# The leaves differentiable_input made (the library's own copy of an x that did not require grad), by
# id (a tensor's == is elementwise, so no WeakSet): a gradient for them reaches nobody
_MADE_INPUTS: dict[int, weakref.ref] = {}


def made_input(t: torch.Tensor) -> bool:
    """Whether t is a leaf differentiable_input made (see _MADE_INPUTS)."""
    ref = _MADE_INPUTS.get(id(t))
    return ref is not None and ref() is t


def interpolates(real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """WGAN-GP's x̂ = fake + ε (real − fake), ε ~ U(0, 1) per sample: ε = torch.rand(B) from ``generator``
    on x's device, in x's dtype (float32 for 16-bit x, then cast). Differentiable in real and fake."""
    work = real.dtype if real.dtype in (torch.float32, torch.float64) else torch.float32
    eps = torch.rand((real.shape[0],), generator=generator, device=real.device, dtype=work).to(real.dtype)
    eps = eps.reshape((real.shape[0],) + (1,) * (real.dim() - 1))
    return fake + eps * (real - fake)


def build_problem(kind: str, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, *,
                  model: Callable | None = None, projection: torch.Tensor | None = None, n_proj: int = 1,
                  per_sample: bool = False, generator: torch.Generator | None = None,
                  loss_fn: Callable | None = None, replay: Replay | None = None,
                  options: dict | None = None, target_norm: float | None = None,
                  one_sided: bool | None = None, model_kwargs: dict | None = None) -> Problem:
    """The Problem of ``kind`` (its row of kinds.TABLE) for the model output ``out`` computed from x."""
    spec = kinds.lookup(kind)
    kind = spec.name
    if replay is not None:
        _ = replay.needed   # decided now, before this call draws from the RNG (projections, random classes)
    batch = x.shape[0]
    flat = _checks.check_output(out, batch, kind)
    num = flat.shape[1]
    if not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj must be a positive integer, got {n_proj!r}")
    if projection is not None and "projection" not in spec.options:
        raise ValueError(f"projection applies to {kinds.owners('projection')} only, not {kind!r}")
    if (target_norm is not None or one_sided is not None) and "target_norm" not in spec.options:
        raise ValueError(f"target_norm and one_sided apply to kind={kinds.owners('target_norm')} only, not {kind!r}")
    if spec.labels is not None:
        y = _checks.check_labels(y, batch, kind, num_classes=num, indices=spec.label_indices(loss_fn))
    if projection is not None:
        projection = _checks.check_projection(projection, batch, num).to(device=flat.device, dtype=flat.dtype)
    args = kinds.KindArgs(batch=batch, device=x.device, y=y, loss_fn=loss_fn, projection=projection,
                          n_proj=n_proj, per_sample=per_sample, generator=generator)
    transform, transform_func = spec.target(args)   # transform_func: composite twin where transform uses a fused op
    R, scale = spec.cotangents(args, flat)
    outer, outer_grad = spec.outer(target_norm, one_sided) if spec.outer is not None else (None, None)
    u = transform(out)
    if R.dtype != u.dtype:
        R = R.to(u.dtype)   # the fused cross-entropy returns float32 losses for fp16/bf16 logits
    return Problem(kind=kind, x=x, u=u, R=R, scale=scale, model=model, transform=transform,
                   transform_func=transform_func, replay=replay,
                   n_proj=n_proj, generator=generator, options=dict(options or {}),
                   outer=outer, outer_grad=outer_grad, model_kwargs=check_model_kwargs(model_kwargs))
