"""Gradients taken at the call: ``_deferred`` (hvp, fd, jvp) returns the penalty's value with a backward
that applies gradients computed at the penalty call, and folds the caller's base loss into them
(``core.Fold``) so that the clean forward's graph is freed before the estimator's own passes;
``taken_at_call`` (exact) differentiates the double-backprop penalty and the folded base loss at the
call, with respect to the parameters only, which skips the input gradient that a caller's backward
would compute for x (its first layer's input gradient, on both graphs)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from gradreg_fast.penalties.core import Problem, serialized
from gradreg_fast.penalties.estimators._shared import _differentiated, _reduction, hooked
from gradreg_fast.penalties.guards import graph_leaves


class _Deferred(torch.autograd.Function):
    """value — the per-sample penalties (B,) (hvp, fd, jvp: ``_deferred``), or the penalty already
    reduced, a scalar (exact: ``taken_at_call``) — whose backward, given the caller's weights w (of
    value's shape), returns the gradients of Σ w · value with respect to ``inputs`` (the parameters, and
    x when it requires grad).

    ``pre`` holds those gradients for w = ``unit`` (computed at the penalty call, so that a model the method
    cannot serve is refused there, not in the caller's backward; with a folded base loss, ``pre``
    holds its gradients too, see ``_fold``). When the penalty is reduced (mean
    or sum) the caller's weights are equal across the batch and the backward scales ``pre`` by w/unit
    (not at all where that is 1: the tensors are handed over, and the backward can run once);
    with reduction="none" it calls ``grads_fn(w)`` for the weights the caller applied.
    """

    @staticmethod
    def forward(ctx, value, grads_fn, pre, uniform, unit, *inputs):
        ctx.grads_fn, ctx.pre, ctx.uniform, ctx.unit = grads_fn, pre, uniform, unit
        return value.detach().clone()

    @staticmethod
    def backward(ctx, w):
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradients taken at the call are constants, so a second
            # derivative through them would be silently 0
            raise RuntimeError(
                "gradreg_fast: GradRegLoss took this penalty's parameter gradients at the call (method "
                "'exact' with its base loss folded in, and methods 'hvp', 'fd', 'jvp'), so they cannot be "
                "differentiated again (backward(create_graph=True)). For a loss differentiated twice, build "
                "it with the functional form, which keeps the graph: base + lam * gr.penalty(kind, model, x, "
                "y, method='exact')")
        if ctx.uniform:
            if ctx.pre is None:
                raise RuntimeError(
                    "gradreg_fast: a second backward through a GradRegLoss loss whose gradients were taken at "
                    "the call: the first backward handed them to the parameters (without a copy). Compute "
                    "the loss again for another backward, or, to backward twice through one graph "
                    "(retain_graph=True), build the loss with the functional form: base + lam * "
                    "gr.penalty(kind, model, x, y)")
            pre, ctx.pre = ctx.pre, None
            first = w if w.dim() == 0 else w.reshape(-1)[0]
            if first.device.type == "cpu" and abs(first.item() / ctx.unit - 1) <= 4 * torch.finfo(w.dtype).eps:
                # the weight the gradients were taken for (GradRegLoss's λ): handed over as they are,
                # so that AccumulateGrad takes them without a copy
                grads = pre
            else:
                scale = first / ctx.unit
                grads = [None if g is None else scale.to(g.dtype) * g for g in pre]
        else:
            with torch.enable_grad(), serialized():   # re-runs and forward-mode AD: docs/threads.md
                grads = ctx.grads_fn(w.detach())
        return (None, None, None, None, None, *grads)


def _foldable(p: Problem, inputs: list[torch.Tensor]) -> bool:
    """Whether the caller's base loss (``p.fold``) may be differentiated at the call, with respect to
    ``inputs``: one is offered, the penalty is reduced (with reduction="none" the caller's weights are
    known only in its backward), the model is not sharded (FSDP reduces gradients in its own backward
    hooks), and no Tensor.register_hook sits on an input (it would run twice: ``_shared.hooked``)."""
    fold = p.fold
    return (fold is not None and _reduction(p) != "none" and not p.sharded and fold.loss.requires_grad
            and not hooked(inputs))


def _samples_per_unit(p: Problem) -> int:
    """B for the mean (pen = Σ_b P_b / B), 1 for the sum."""
    return p.x.shape[0] if _reduction(p) == "mean" else 1


def _fold(p: Problem, inputs: list[torch.Tensor], clean: torch.Tensor | None) -> list[torch.Tensor | None] | None:
    """The gradients, on the clean forward's graph, of the caller's base loss (``p.fold``) and of
    ``clean`` (a scalar on that graph that belongs to the penalty), scaled to the penalty's
    convention (gradients of Σ_b P_b): one backward that frees the clean graph. None when there is
    nothing to fold: no base loss offered, per-sample penalties (the caller's weights are known only
    in its backward), or a sharded model (FSDP reduces gradients in its own backward hooks)."""
    if not _foldable(p, inputs):
        return None
    fold = p.fold
    scalar = fold.loss * (fold.weight * _samples_per_unit(p))
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


def taken_at_call(p: Problem, per: torch.Tensor, leaves: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """The penalty reduced from ``per`` (B,), on exact's second-order graph, with its parameter gradients
    and those of the caller's folded base loss (``core.Fold``) taken now, in one backward over both
    graphs (the graphs are freed here), applied by the caller's backward (see _Deferred). ``leaves``:
    the leaf tensors of the graphs of ``per`` and the base loss when the caller walked them already
    (x not attached), else None.

    The backward the caller would run computes the gradient of everything with respect to x too (a leaf
    the penalty made to require grad): the first layer's input gradient, on the clean graph and on the
    second-order one. Asking autograd for the parameters' gradients alone prunes that work: on LeNet it
    is a quarter of the step. Same gradients, to rounding.

    None (the penalty stays on the caller's graph) when there is no base loss to fold, the caller's
    weights come in its backward (reduction="none"), the model is sharded or not an nn.Module, a
    parameter carries a Tensor.register_hook (it would run twice: ``_shared.hooked``), or the
    graphs reach a tensor that requires grad and is not a parameter (of the model, with an attached x;
    any nn.Parameter, such as a learnable base loss's, otherwise) nor x: a plain tensor the model closes
    over, a projection that requires grad. The caller's backward then reaches it."""
    if p.fold is None or not isinstance(p.model, torch.nn.Module) or p.R.requires_grad:
        return None
    fold = p.fold
    if leaves is None:
        _, inputs = _differentiated(p)
        known = {id(t) for t in inputs} | {id(p.x)}
        stop = p.x.grad_fn if p.attached else None   # upstream of an attached x: see _fold_inputs
        if any(id(t) not in known for t in graph_leaves((per, fold.loss), stop)):
            return None
    else:
        # the leaves the graphs reach, x aside: the parameters to differentiate (those of the model the
        # graphs do not reach get no gradient either way), without a walk of the model's modules
        inputs = [t for t in leaves if t is not p.x]
        if not all(isinstance(t, torch.nn.Parameter) for t in inputs):
            return None
    if not _foldable(p, inputs):
        return None
    # GradRegLoss's loss is λ·(pen + weight·base), so its backward gives pen the weight λ = 1/weight (λ·every
    # under a schedule): the gradients are taken for that weight, base + pen/weight, so that the backward
    # hands them over as they are
    pen = per.mean() if _reduction(p) == "mean" else per.sum()
    unit = 1.0 / fold.weight
    scalar = torch.add(fold.loss, pen, alpha=unit)   # base + unit·pen, one node
    keep = _fold_inputs(p, scalar, inputs)
    if keep is None:
        return None
    found = iter(torch.autograd.grad(scalar, [t for t, k in zip(inputs, keep, strict=True) if k], allow_unused=True))
    fold.taken = True
    pre = [next(found) if k else None for k in keep]
    return _Deferred.apply(pen.detach(), None, pre, True, unit, *inputs)


def _leaves(t: torch.Tensor, stop=None) -> set[int]:
    """ids of the leaf tensors (AccumulateGrad nodes) in t's graph, not walking past ``stop``."""
    return {id(v) for v in graph_leaves(t, stop)}


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
    out = _Deferred.apply(value, grads_fn, pre, _reduction(p) != "none", 1.0, *inputs)
    if clean is not None and folded is None:
        out = out + (clean - clean.detach()).to(out.dtype)
    return out
