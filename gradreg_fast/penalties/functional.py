"""The penalties as functions of a parameter dict, for torch.func users (functional_call style).

    loss = lambda params: F.cross_entropy(functional_call(model, params, (x,)), y) \
                          + lam * gr.functional_penalty("frobreg", model, params, x)
    grads = torch.func.grad(loss)(dict(model.named_parameters()))

``functional_penalty(kind, model, params, x, y)`` is the value of ``gr.penalty(kind, model, x, y)``
with the module's parameters (and buffers) replaced by ``params`` through
torch.func.functional_call. It is written with torch.func only — the input gradient is a
torch.func.vjp, never torch.autograd.grad — so it composes with torch.func.grad, grad of grad,
vmap (per-sample gradients) and jacrev. It runs on PyTorch's own ops, not on gradreg_fast's
custom kernels, and has no estimators: its gradient is the exact one (double backpropagation
through torch.func). For the kernels and the cheaper estimators use gr.penalty / GradRegLoss.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from gradreg_fast.penalties import kinds
from gradreg_fast.penalties._checks import (
    check_input,
    check_labels,
    check_output,
    check_projection,
    check_reduction,
)


def functional_penalty(kind: str, model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                       y: torch.Tensor | None = None, *, projection: torch.Tensor | None = None,
                       loss_fn: Callable | None = None, reduction: str = "mean") -> torch.Tensor:
    """P(θ) for θ = ``params``: the penalty of ``functional_call(model, params, x)`` at x.

    With f_θ = functional_call(model, params, ·), J_i = ∂f_θ(x_i)/∂x_i, p = softmax(f_θ):

    - "doubleback": P_i = ‖∂ℓ_i/∂x_i‖², ℓ_i = loss_fn(f_θ(x), y)_i (per-sample cross-entropy by default).
    - "spectreg":   P_i = mean_j ‖J_iᵀ r_j‖² for the given ``projection`` r, shaped (K,), (B, K) or
                    (n, B, K) (draw it yourself, e.g. torch.randn(K, generator=g): random draws
                    inside torch.func transforms are the caller's choice).
    - "frobreg":    P_i = ‖J_i‖_F².        - "jacreg": P_i = ‖∂p(x_i)/∂x_i‖_F².
    - "onehot":     P_i = ‖∂f_{y_i}(x_i)/∂x_i‖²  (for random_onehot pass random classes as y).

    Reduced as ``reduction`` says: mean_i P_i (default), Σ_i P_i, or the (B,) vector ("none").

    Args:
        kind: "doubleback", "spectreg", "frobreg", "jacreg" or "onehot".
        model: the nn.Module whose parameters ``params`` replaces (its own stay untouched).
        params: name -> tensor, as for torch.func.functional_call (parameters and, optionally,
            buffers; missing names keep the module's own).
        x: floating inputs (B, ...); not modified. y: integer labels (B,) for doubleback/onehot.

    Returns:
        A scalar (or (B,)) tensor, differentiable with respect to ``params`` by torch.func.grad
        (and by torch.autograd when ``params`` require grad).
    """
    spec = kinds.lookup(kind)
    kind = spec.name
    if spec.functional_refusal is not None:
        raise ValueError(spec.functional_refusal.format(kind=kind, kinds=", ".join(kinds.KINDS)))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (its parameters are replaced by params), got "
                        f"{type(model).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> tensor (e.g. dict(model.named_parameters())), got "
                        f"{type(params).__name__}")
    check_input(x)
    check_reduction(reduction)
    if projection is not None and "projection" not in spec.options:
        raise ValueError(f"projection applies to {kinds.owners('projection')} only, not {kind!r}")
    if "projection" in spec.options and projection is None:   # no random draws here: the caller's projection
        raise ValueError(f"functional_penalty({kind!r}, ...) needs projection= (shape (K,), (B, K) or "
                         "(n, B, K)), e.g. torch.randn(K, generator=g)")
    if loss_fn is not None and "loss_fn" not in spec.options:
        raise ValueError(f"loss_fn applies to {kinds.owners('loss_fn')} only, not {kind!r}")
    batch = x.shape[0]
    # labels under the rule of every entry point (_checks.check_labels): class indices for onehot and the
    # default cross-entropy, checked here (dtype, shape) and in target (range)
    indices = spec.label_indices(loss_fn)
    if spec.labels is not None:
        y = check_labels(y, batch, kind, indices=indices)
    args = kinds.KindArgs(batch=batch, device=x.device, y=y, loss_fn=loss_fn, projection=projection)

    def target(z: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, params, (z,))
        flat = check_output(out, batch, kind)
        if indices:   # the class range, now that K is known
            check_labels(y, batch, kind, num_classes=flat.shape[1])
        transform, composite = spec.target(args)   # PyTorch's own ops: the composite twin where there is one
        return (composite or transform)(out)

    u, pullback = torch.func.vjp(target, x.detach())
    if projection is not None:
        args = dataclasses.replace(args, projection=check_projection(projection, batch, u.shape[1]))
    R, scale = spec.cotangents(args, u)
    per_sample = 0
    for j in range(R.shape[0]):
        (g,) = pullback(R[j])
        per_sample = per_sample + g.reshape(batch, -1).pow(2).sum(1)
    per_sample = scale * per_sample
    if reduction == "mean":
        return per_sample.mean()
    return per_sample.sum() if reduction == "sum" else per_sample


__all__ = ["functional_penalty"]
