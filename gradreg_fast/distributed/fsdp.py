"""Gradient penalties on models sharded with FSDP2 (torch.distributed.fsdp.fully_shard), tested in
tests/distributed/test_fsdp.py with torchrun, 2 gloo processes.

exact, hvp and jvp run under an FSDPDeferral (parameters held unsharded and gradient reduction off
from the penalty call to the end of its backward, then one reduce-scatter); fd runs through FSDP's
own hooks and is refused in 16-bit compute. Written against FSDP2's private internals of torch
2.11-2.14; a torch whose internals differ gets a ValueError naming method='fd'
(_check_fsdp_internals).
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator

import torch

_FSDP_STATE_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_state"
_FSDP_POST_BACKWARD_NODE = "RegisterPostBackwardFunctionBackward"
# FSDPParamGroup attributes a deferral overrides, with the values it holds them at: no reduction, no
# resharding after backward, none after forward either (post_forward_mesh_info None: a second
# forward during the deferral, e.g. a second penalty's, must not free weights a first one's graph reads)
_FSDP_DEFERRED = {"reduce_grads": False, "all_reduce_grads": False, "reshard_after_backward": False,
                  "post_forward_mesh_info": None}
_FSDP_GROUP_SETTINGS = tuple(_FSDP_DEFERRED)
# methods that run under a deferral (see FSDPDeferral); "fd" needs none: its passes are first-order
# forwards and backwards through FSDP's own hooks, which FSDP handles as for any loss
FSDP_DEFERRED_METHODS = ("exact", "hvp", "jvp")


def _fsdp_internals_error(what: str) -> ValueError:
    return ValueError(
        f"gradreg_fast: this torch's FSDP2 (fully_shard) internals differ from those gradreg_fast was "
        f"written for ({what}), so the penalty's second-order pass cannot be run through the sharded "
        "model safely. Use method='fd' (first-order passes only, which FSDP handles as any loss)")


def _fsdp_states_of_modules(modules) -> list:
    """The FSDP states of the root contexts that ``modules`` belong to, in FSDP's pre-order."""
    states, seen = [], set()
    for module in modules:
        get = getattr(module, "_get_fsdp_state", None)
        if get is None:
            raise _fsdp_internals_error("FSDPModule._get_fsdp_state is missing")
        state = get()
        ctx = getattr(state, "_state_ctx", None)
        members = list(getattr(ctx, "all_states", None) or [state])
        for s in members:
            if id(s) not in seen:
                seen.add(id(s))
                states.append(s)
    return states


def _fsdp_modules_in_graph(out: torch.Tensor) -> list:
    """FSDP modules whose forward produced ``out`` (found by FSDP's post-backward nodes)."""
    modules, seen, stack = [], set(), [getattr(out, "grad_fn", None)]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == _FSDP_POST_BACKWARD_NODE:
            group = getattr(node, "param_group", None)
            modules.extend(getattr(group, "modules", ()) or ())
        stack.extend(fn for fn, _ in node.next_functions)
    return modules


def find_fsdp(model: Callable | None, out: torch.Tensor | None) -> list | None:
    """The FSDP2 states of the sharded model the penalty runs through, or None when the model is not
    sharded with fully_shard: the FSDPModules inside ``model`` (an nn.Module), or, when the model is
    a function or unknown (the ``inputs=`` form), those found in the autograd graph of ``out``."""
    if _FSDP_STATE_MODULE not in sys.modules:  # fully_shard was never imported: nothing is sharded
        return None
    from torch.distributed.fsdp import FSDPModule
    if not FSDPModule.__subclasses__():   # fully_shard makes a subclass per module class it shards
        return None
    if isinstance(model, torch.nn.Module):
        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    elif out is not None:
        modules = _fsdp_modules_in_graph(out)
    else:
        modules = []
    if not modules:
        return None
    return _fsdp_states_of_modules(modules)


def _queue_callback(fn: Callable[[], None]) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class FSDPDeferral:
    """Holds a sharded model's parameters unsharded, with FSDP's gradient reduction off, from the
    penalty call to the end of the backward pass that uses the penalty; then reduce-scatters every
    gradient once and reshards, as FSDP's own end-of-backward does.

    Why: the penalty's parameter gradient arrives at a parameter from several places in the graph
    (the forward graph, and the create_graph input-gradient graph for ``exact``, or the re-run
    graphs of ``hvp``/``jvp``), and FSDP's per-module post-backward hook may fire before the last of
    them: it would reshard (freeing the unsharded weights the later nodes still read: "setStorage
    ... storage of size 0") and reduce-scatter a partial gradient. With every group's
    ``reduce_grads``, ``reshard_after_backward`` and resharding after forward off (what
    ``set_requires_gradient_sync(False)``, ``set_reshard_after_backward(False)`` and
    ``set_reshard_after_forward(False)`` set), FSDP's hooks only accumulate unsharded gradients; a
    callback queued by the first backward that reaches a parameter (the penalty's, through
    _DeferredReduction, or any other) runs after FSDP's own end-of-backward callback,
    restores the user's settings and runs FSDP's post-backward on every group (reduce-scatter, then
    reshard as the user configured). One deferral per root context is shared by all penalties
    computed before the backward.
    """

    # id(root state context) -> the deferral, alive while a penalty token or a backward holds it
    _active: weakref.WeakValueDictionary[int, FSDPDeferral] = weakref.WeakValueDictionary()

    def __init__(self, states: list, key: object):
        self.states = states
        self.key = weakref.ref(key)
        self.groups = [g for s in states for g in getattr(s, "_fsdp_param_groups", ())]
        self.saved: list | None = None
        self.pending: set[int] = set()
        self.in_backward = False
        self.finish_queued = False
        self.hooks: list = []

    @classmethod
    def for_states(cls, states: list) -> FSDPDeferral:
        key = getattr(states[0], "_state_ctx", states[0])
        deferral = cls._active.get(id(key))
        if deferral is None or deferral.saved is None or deferral.key() is not key:
            deferral = cls(states, key)
            cls._active[id(key)] = deferral
        return deferral

    def begin(self) -> None:
        if self.saved is not None:
            return
        try:
            self.saved = [tuple(getattr(g, name) for name in _FSDP_GROUP_SETTINGS) for g in self.groups]
        except AttributeError as exc:
            raise _fsdp_internals_error(f"FSDPParamGroup has no {exc.name!r}") from exc
        for g in self.groups:
            for name, value in _FSDP_DEFERRED.items():
                setattr(g, name, value)
        for s in self.states:
            for module in getattr(s, "_modules", ()):
                module.unshard()   # all-gathers into the same storage the saved graphs reference
        self.finish_queued = False
        # any backward that reaches a parameter ends the deferral, the penalty's own or another
        # (e.g. the base loss's while a penalty computed for logging is still alive): no backward
        # can leave its gradients unreduced
        for s in self.states:
            for g in getattr(s, "_fsdp_param_groups", ()):
                for fsdp_param in getattr(g, "fsdp_params", ()):
                    param = getattr(fsdp_param, "_unsharded_param", None)
                    if isinstance(param, torch.Tensor) and param.requires_grad:
                        self.hooks.append(param.register_post_accumulate_grad_hook(self._reached))

    def _reached(self, _param: torch.Tensor) -> None:
        self.queue_finish()

    def queue_finish(self) -> None:
        """From inside a backward: end the deferral when that backward ends. Queued from a callback,
        the reduction runs after every callback the backward queued (FSDP's own end-of-backward)."""
        if self.finish_queued or self.saved is None:
            return
        self.finish_queued = True
        self.in_backward = True
        _queue_callback(lambda: _queue_callback(self.finish))

    def _restore(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        if self.saved is None:
            return
        for g, values in zip(self.groups, self.saved, strict=True):
            for name, value in zip(_FSDP_GROUP_SETTINGS, values, strict=True):
                setattr(g, name, value)
        self.saved = None

    def release(self) -> None:
        """End without a reduction (the penalty was never differentiated, or failed): restore the
        settings and reshard; gradients accumulated meanwhile stay for FSDP's next reduction."""
        self._restore()
        self.pending.clear()
        for s in self.states:
            for module in getattr(s, "_modules", ()):
                module.reshard()

    def finish(self) -> None:
        """End of the backward: restore the settings, then reduce-scatter and reshard every group."""
        self.in_backward = False
        if self.saved is None:
            return
        self._restore()
        self.pending.clear()
        for g in reversed(self.groups):
            g.post_backward()
        root = next((s for s in self.states if getattr(s, "_is_root", False)), None)
        final = getattr(root, "_root_post_backward_final_callback", None)
        if final is not None:
            final()

    def token(self) -> _Token:
        tok = _Token(self)
        self.pending.add(id(tok))
        return tok

    def dropped(self, tok_id: int) -> None:
        self.pending.discard(tok_id)
        if self.saved is not None and not self.pending and not self.in_backward:
            self.release()


class _Token:
    """One penalty's claim on a deferral, held by the penalty's autograd graph: freed without a
    backward having started through it, it lets the deferral go (FSDPDeferral.dropped)."""

    def __init__(self, deferral: FSDPDeferral):
        self.deferral = deferral
        self.started = False
        tok_id = id(self)
        weakref.finalize(self, _token_dropped, weakref.ref(deferral), tok_id, self.__dict__)


def _token_dropped(deferral_ref, tok_id: int, attrs: dict) -> None:
    deferral = deferral_ref()
    if deferral is not None and not attrs.get("started", False):
        deferral.dropped(tok_id)


class _DeferredReduction(torch.autograd.Function):
    """Identity on the penalty; its backward queues the deferral's end-of-backward reduction."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, tok: _Token) -> torch.Tensor:
        ctx.tok = tok
        return p.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tok = ctx.tok
        deferral = tok.deferral
        if tok.started or id(tok) not in deferral.pending:
            raise ValueError(
                "gradreg_fast: this penalty on a sharded (fully_shard) model is differentiated after a "
                "backward that already reduce-scattered the gradients and resharded the weights its graph "
                "reads (a second backward with retain_graph=True, or a penalty computed before another "
                "backward). Compute the penalty again for each backward, or sum the penalties into one loss")
        tok.started = True
        deferral.queue_finish()
        return grad, None


def defer_reduction(p: torch.Tensor, deferral: FSDPDeferral) -> torch.Tensor:
    """p, tied to ``deferral``: the backward through it ends the deferral with one reduction."""
    if not p.requires_grad:
        deferral.dropped(-1)
        return p
    return _DeferredReduction.apply(p, deferral.token())


@contextlib.contextmanager
def fsdp_rerun_passthrough(model: Callable, states: list) -> Iterator[None]:
    """While active, every forward of ``model`` (an nn.Module) runs with FSDP's forward hooks passed
    through: for the estimators that re-run the sharded model under forward-mode AD (hvp, jvp), its
    parameters held unsharded by an FSDPDeferral. FSDP's hooks would wrap every submodule's input in
    an autograd Function whose jvp rule fails ("A custom Function's forward is returning a view ...
    but the jvp is not returning a view"); in FSDP's PRE_BACKWARD state (the one activation-
    checkpointing recomputation runs in) they only unshard when needed and apply the mixed-precision
    casts. A forward pre-hook put before FSDP's sets that state on every FSDP state of the model, and
    a forward hook after FSDP's puts the previous states back; the model itself (its parameter and
    buffer names, which the torch.func estimators use) is untouched. The estimator's own backward
    passes are not forwards and see FSDP's hooks as usual."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    saved: list[list] = []

    def enter(_module, _args):
        saved.append([s._training_state for s in states])
        for s in states:
            s._training_state = TrainingState.PRE_BACKWARD

    def leave(_module, _args, _output):
        for s, value in zip(states, saved.pop(), strict=True):
            s._training_state = value

    handles = [model.register_forward_pre_hook(enter, prepend=True),
               model.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_fsdp_internals(states: list) -> None:
    """Raise the refusal naming method='fd' when this torch's FSDP2 lacks what FSDPDeferral and
    fsdp_rerun_passthrough use (written against torch 2.11-2.14, where all of it is present)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
        TrainingState.PRE_BACKWARD  # noqa: B018
    except (ImportError, AttributeError) as exc:
        raise _fsdp_internals_error("no TrainingState.PRE_BACKWARD") from exc
    for state in states:
        for name in ("_fsdp_param_groups", "_modules", "_training_state", "_is_root"):
            if not hasattr(state, name):
                raise _fsdp_internals_error(f"FSDPState has no {name!r}")
        for group in state._fsdp_param_groups:
            for name in _FSDP_GROUP_SETTINGS + ("post_backward",):
                if not hasattr(group, name):
                    raise _fsdp_internals_error(f"FSDPParamGroup has no {name!r}")
    if not any(getattr(s, "_is_root", False) and hasattr(s, "_root_post_backward_final_callback") for s in states):
        raise _fsdp_internals_error("no root state with _root_post_backward_final_callback (has the "
                                    "model run forward through its root?)")


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _fsdp_compute_dtype(states: list) -> torch.dtype | None:
    """The 16-bit dtype the sharded model computes in (MixedPrecisionPolicy.param_dtype, or the
    parameters' own dtype), or None when it computes in fp32/fp64."""
    for state in states:
        policy_dtype = getattr(getattr(state, "_mp_policy", None), "param_dtype", None)
        if policy_dtype in _LOW_PRECISION:
            return policy_dtype
        for module in getattr(state, "_modules", ()):
            for param in module.parameters(recurse=False):
                if param.dtype in _LOW_PRECISION:
                    return param.dtype
    return None


def fsdp_estimator(estimator: Callable, model: Callable | None, out: torch.Tensor | None,
                   method: str) -> Callable:
    """``estimator``, made to run through a model sharded with fully_shard (unchanged otherwise).

    exact, hvp, jvp: under an FSDPDeferral (parameters held unsharded, one reduce-scatter at the end
    of the backward), the re-runs of hvp/jvp with FSDP's forward hooks passed through
    (fsdp_rerun_passthrough), the returned penalty tied to the
    deferral. fd: unchanged (its passes are first-order, which FSDP's hooks serve as for any loss),
    but refused when the sharded model computes in bf16/fp16: its step (fd_h = 1e-3 of the input
    scale) is below 16-bit resolution, and the difference quotient is rounding noise (measured:
    gradient off by 3-135% with MixedPrecisionPolicy(param_dtype=bfloat16), tests/distributed/test_fsdp.py).
    """
    if method not in FSDP_DEFERRED_METHODS and method != "fd":
        return estimator
    states = find_fsdp(model, out)
    if states is None:
        return estimator
    if method == "fd":
        dtype = _fsdp_compute_dtype(states)
        if dtype is not None:
            raise ValueError(
                f"gradreg_fast: method='fd' on a sharded model that computes in {dtype} (FSDP "
                "MixedPrecisionPolicy param_dtype, or 16-bit parameters): its finite-difference step is "
                "below 16-bit resolution and the gradient would be rounding noise. Use method='exact' or "
                "method='hvp' (both exact under FSDP mixed precision), or keep param_dtype=float32")

        def run_fd(problem):
            problem.sharded = True   # fd keeps its passes in the caller's graph, for FSDP's backward hooks
            return estimator(problem)
        return run_fd
    _check_fsdp_internals(states)

    def run(problem):
        deferral = FSDPDeferral.for_states(states)
        deferral.begin()
        try:
            with fsdp_rerun_passthrough(problem.model, states):
                p = estimator(problem)
        except BaseException:
            if not deferral.pending:
                deferral.release()
            raise
        return defer_reduction(p, deferral)
    return run


__all__ = ["find_fsdp", "fsdp_estimator", "FSDPDeferral", "fsdp_rerun_passthrough",
           "FSDP_DEFERRED_METHODS"]
