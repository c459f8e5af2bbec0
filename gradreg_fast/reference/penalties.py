"""Reference penalties (docs/method.md), each averaged over the batch.

Written independently of gradreg_fast.penalties: one create_graph=True gradient per class or
projection, in a Python loop. ``model`` maps x of shape (B, ...) to outputs of shape (B, K)
(a discriminator's (B,) or (B, 1) scores for ``r1`` and ``wgan_gp``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _input(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _mean_sq_grad(scalar: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(scalar, x, create_graph=True)
    return g.pow(2).reshape(g.shape[0], -1).sum(1).mean()


def doubleback(model: Callable, x: torch.Tensor, y: torch.Tensor,
               loss_fn: Callable | None = None) -> torch.Tensor:
    """mean_i ‖∂ℓ_i/∂x_i‖², ℓ_i the per-sample loss (cross-entropy by default)."""
    x = _input(x)
    out = model(x)
    losses = loss_fn(out, y) if loss_fn is not None else F.cross_entropy(out, y, reduction="none")
    return _mean_sq_grad(losses.sum(), x)


def spectreg(model: Callable, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """mean_i mean_j ‖J_iᵀ r_j‖²; r of shape (K,) shared, (B, K) per sample, or (n, B, K)."""
    x = _input(x)
    out = model(x).reshape(x.shape[0], -1)
    projections = list(r) if r.dim() == 3 else [r]
    total = 0
    for rj in projections:
        total = total + _mean_sq_grad((out * rj).sum(), x)
    return total / len(projections)


def frobreg(model: Callable, x: torch.Tensor) -> torch.Tensor:
    """mean_i ‖J_i‖_F² = mean_i Σ_k ‖∂f_k(x_i)/∂x_i‖²: one gradient per output, in a loop."""
    x = _input(x)
    out = model(x).reshape(x.shape[0], -1)
    return sum(_mean_sq_grad(out[:, k].sum(), x) for k in range(out.shape[1]))


def jacreg(model: Callable, x: torch.Tensor) -> torch.Tensor:
    """mean_i ‖∂p(x_i)/∂x_i‖_F², p = softmax(f): one gradient per class, in a loop."""
    x = _input(x)
    p = torch.softmax(model(x), dim=1)
    return sum(_mean_sq_grad(p[:, k].sum(), x) for k in range(p.shape[1]))


def onehot(model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i ‖∂f_{y_i}(x_i)/∂x_i‖²."""
    x = _input(x)
    out = model(x)
    return _mean_sq_grad(out.gather(1, y.view(-1, 1)).sum(), x)


def random_onehot(model: Callable, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """mean_i ‖∂f_{c_i}(x_i)/∂x_i‖² for given classes c (drawn uniformly by the caller)."""
    return onehot(model, x, classes)


def r1(model: Callable, x: torch.Tensor) -> torch.Tensor:
    """mean_i ‖∇ₓD(x_i)‖², D = ``model`` with one score per sample ((B,) or (B, 1)). R1 on real data
    (Mescheder et al. 2018 weight it by γ/2); R2 is the same on generated data."""
    x = _input(x)
    return _mean_sq_grad(model(x).sum(), x)


def wgan_gp(model: Callable, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor,
            target_norm: float = 1.0, one_sided: bool = False) -> torch.Tensor:
    """mean_i (‖∇ₓD(x̂_i)‖ − c)² at x̂_i = fake_i + ε_i (real_i − fake_i) for the given ε (B,)
    (Gulrajani et al. 2017, c = ``target_norm``); one-sided: mean_i max(0, ‖∇ₓD(x̂_i)‖ − c)²."""
    e = eps.reshape((real.shape[0],) + (1,) * (real.dim() - 1)).to(real.dtype)
    x = _input(fake.detach() + e * (real.detach() - fake.detach()))
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    d = g.reshape(g.shape[0], -1).pow(2).sum(1).sqrt() - target_norm
    if one_sided:
        d = torch.relu(d)
    return d.pow(2).mean()


def confidence_penalty(logits: torch.Tensor) -> torch.Tensor:
    """mean_i Σ_k p_ik log p_ik (the negative entropy of the softmax)."""
    logp = torch.log_softmax(logits, dim=1)
    return (logp.exp() * logp).sum(1).mean()


def weight_decay(model: nn.Module) -> torch.Tensor:
    """½ Σ ‖W‖² over the weights of Linear and Conv layers (biases excluded)."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total = total + 0.5 * m.weight.pow(2).sum()
    return total
