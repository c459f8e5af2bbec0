"""Helpers shared by the op wrappers."""
from __future__ import annotations

import torch

from gradreg_fast._backend import EXTENSION_LOADED


def extension_op(name: str):
    """torch.ops.gradreg_fast.<name> when the extension is loaded, else None."""
    if not EXTENSION_LOADED:
        return None
    return getattr(torch.ops.gradreg_fast, name)


def check_floating_batched(x: torch.Tensor, op: str, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor (float16/bfloat16/float32/float64), "
                        f"got {x.dtype}; convert it with {name}.float()")
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} needs a batch dimension, shape (B, ...); got a 0-d tensor")


def optional_extension_op(name: str):
    """Like extension_op, but None also when a loaded extension lacks the op (built from older
    sources): the op's cpp/cuda backends then report that instead of ``import gradreg_fast`` failing."""
    try:
        return extension_op(name)
    except (AttributeError, RuntimeError):
        return None
