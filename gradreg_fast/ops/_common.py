"""Helpers shared by the op wrappers."""
from __future__ import annotations

import torch


def check_floating_batched(x: torch.Tensor, op: str, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor (float16/bfloat16/float32/float64), "
                        f"got {x.dtype}; convert it with {name}.float()")
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} needs a batch dimension, shape (B, ...); got a 0-d tensor")
