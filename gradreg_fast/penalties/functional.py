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

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gradreg_fast.penalties._checks import (
    GAN_KINDS,
    KINDS,
    check_input,
    check_kind,
    check_labels,
    check_output,
    check_projection,
    check_reduction,
)


def _cotangents(kind: str, flat: torch.Tensor, y, projection) -> tuple[torch.Tensor, float]:
    """R (n, B, K') and the scale of gradreg_fast.penalties.core's table, for u of shape (B, K')."""
    batch, num = flat.shape
    if kind == "doubleback":
        return flat.new_ones(1, batch, 1), 1.0
    if kind == "spectreg":
        r = check_projection(projection, batch, num).to(flat.dtype)
        return r, 1.0 / r.shape[0]
    if kind in ("frobreg", "jacreg"):
        return torch.eye(num, dtype=flat.dtype, device=flat.device).unsqueeze(1).expand(num, batch, num), 1.0
    return F.one_hot(y, num).to(flat.dtype).unsqueeze(0), 1.0    # onehot: e_{y_i}


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
    kind = check_kind(kind)
    if kind in GAN_KINDS:
        raise ValueError(f"functional_penalty serves the classifier kinds ({', '.join(KINDS)}), not the GAN "
                         f"kind {kind!r}: use gr.penalty({kind!r}, D, x, ...)")
    if kind == "random_onehot":
        raise ValueError("functional_penalty has no random draws: for 'random_onehot' pass kind='onehot' "
                         "with y = your random classes (e.g. torch.randint(K, (B,), generator=g))")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (its parameters are replaced by params), got "
                        f"{type(model).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> tensor (e.g. dict(model.named_parameters())), got "
                        f"{type(params).__name__}")
    check_input(x)
    check_reduction(reduction)
    if projection is not None and kind != "spectreg":
        raise ValueError(f"projection applies to 'spectreg' only, not {kind!r}")
    if kind == "spectreg" and projection is None:
        raise ValueError("functional_penalty('spectreg', ...) needs projection= (shape (K,), (B, K) or "
                         "(n, B, K)), e.g. torch.randn(K, generator=g)")
    if loss_fn is not None and kind != "doubleback":
        raise ValueError(f"loss_fn applies to 'doubleback' only, not {kind!r}")
    batch = x.shape[0]

    def target(z: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, params, (z,))
        flat = check_output(out, batch, kind)
        if indices:   # the class range, now that K is known
            check_labels(y, batch, kind, num_classes=flat.shape[1])
        if kind == "doubleback":
            losses = loss_fn(out, y) if loss_fn is not None else F.cross_entropy(out, y, reduction="none")
            if losses.shape not in ((batch,), (batch, 1)):
                raise ValueError(f"loss_fn must return per-sample losses of shape ({batch},) "
                                 f"(e.g. reduction='none'), got shape {tuple(losses.shape)}")
            return losses.reshape(batch, 1)
        return torch.softmax(flat, dim=1) if kind == "jacreg" else flat

    # labels under the rule of every entry point (_checks.check_labels): class indices for onehot and the
    # default cross-entropy, checked here (dtype, shape) and in target (range)
    indices = kind == "onehot" or (kind == "doubleback" and loss_fn is None)
    if kind in ("doubleback", "onehot"):
        y = check_labels(y, batch, kind, indices=indices)
    u, pullback = torch.func.vjp(target, x.detach())
    R, scale = _cotangents(kind, u, y, projection)
    per_sample = 0
    for j in range(R.shape[0]):
        (g,) = pullback(R[j])
        per_sample = per_sample + g.reshape(batch, -1).pow(2).sum(1)
    per_sample = scale * per_sample
    if reduction == "mean":
        return per_sample.mean()
    return per_sample.sum() if reduction == "sum" else per_sample


__all__ = ["functional_penalty"]
