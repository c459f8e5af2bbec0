"""Reference implementations of the finite-difference direction and the softmax cross-entropy.

Plain PyTorch, twice differentiable by autograd; shares no code with the kernels it validates.
"""
from __future__ import annotations

import math

import torch

from gradreg_fast.reference.ops import acc_dtype


def fd_direction(x: torch.Tensor, g: torch.Tensor, h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite-difference step along the normalized direction, per sample.

        n_b = ‖g_b‖,   out_b = x_b + h · g_b / n_b   (out_b = x_b where n_b = 0)

    Computed in acc_dtype; ``out`` in x's dtype and shape, ``n`` of shape (B,) in acc_dtype.
    """
    acc = acc_dtype(x.dtype)
    rows = g.reshape(g.shape[0], math.prod(g.shape[1:])).to(acc)
    n = torch.linalg.vector_norm(rows, dim=1)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    step = torch.where(n.unsqueeze(1) > 0, rows / safe.unsqueeze(1), torch.zeros_like(rows))
    out = x.reshape(rows.shape).to(acc) + h * step
    return out.to(x.dtype).reshape(x.shape), n


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax cross-entropy ℓ_b = logsumexp(z_b) − z_{b, y_b} = −log softmax(z_b)_{y_b},
    in acc_dtype (through log_softmax, whose (z − max) − log Σ form keeps the derivatives accurate
    when |logsumexp| is large)."""
    z = logits.to(acc_dtype(logits.dtype))
    return torch.nn.functional.nll_loss(torch.log_softmax(z, dim=1), y, reduction="none")


def cross_entropy_grad(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂ℓ_b/∂z_b = softmax(z_b) − onehot(y_b), in acc_dtype."""
    z = logits.to(acc_dtype(logits.dtype))
    onehot = torch.zeros_like(z).scatter_(1, y.reshape(-1, 1), 1.0)
    return torch.softmax(z, dim=1) - onehot


def cross_entropy_hvp(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Hessian-vector product of ℓ_b in z_b: (diag(p_b) − p_b p_bᵀ) u_b, p = softmax(z), in acc_dtype."""
    acc = acc_dtype(logits.dtype)
    p = torch.softmax(logits.to(acc), dim=1)
    pu = p * u.to(acc)
    return pu - p * pu.sum(dim=1, keepdim=True)
