"""Reference implementations of the elementwise and reduction ops."""
from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows(x: torch.Tensor) -> torch.Tensor:
    """x as (B, F) rows: a 2-D x as it is (a reshape to its own shape would add a view node that every
    backward through the result walks), others flattened."""
    return x if x.dim() == 2 else x.reshape(x.shape[0], math.prod(x.shape[1:]))


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 norm: out[b] = Σ_j x[b, j]², over all non-batch dims, in acc_dtype."""
    return rows(x).to(acc_dtype(x.dtype)).pow(2).sum(dim=1)


def sq_norm_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of sq_norm: grad_x[b, j] = 2 · grad[b] · x[b, j], in x's dtype."""
    g = grad.to(acc_dtype(x.dtype)).reshape((-1,) + (1,) * (x.dim() - 1))
    return (2 * g * x.to(acc_dtype(x.dtype))).to(x.dtype)
