"""The argument checks of the public op wrappers (gradreg_fast/ops/<family>.py): one function per check
and one message per problem, "<op>: <argument> <problem>; <fix>", raised before the op dispatches.

Each check does on valid input the comparisons the wrappers made inline before, in one call per
argument; the kernels check again in C++ (csrc/*.h) for callers of the raw torch.ops.
"""
from __future__ import annotations

import weakref

import torch


def check_floating(x: torch.Tensor, op: str, name: str = "x", *, batched: bool = False, ndim: int | None = None,
                   layout: str = "", fix: str = "") -> None:
    """TypeError unless ``x`` is a floating torch.Tensor. ValueError unless it has a batch dimension
    (``batched``), or exactly ``ndim`` dimensions, named by ``layout`` (e.g. "(B, K)") with ``fix``
    saying how to get there."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor (float16/bfloat16/float32/float64), "
                        f"got {x.dtype}; convert it with {name}.float()")
    if ndim is not None:
        if x.dim() != ndim:
            raise ValueError(f"{op}: {name} must have shape {layout}, got shape {tuple(x.shape)}; {fix}")
    elif batched and x.dim() < 1:
        raise ValueError(f"{op}: {name} needs a batch dimension, shape (B, ...); got a 0-d tensor")


def check_like(t: torch.Tensor, like: torch.Tensor, op: str, name: str, like_name: str, *,
               shape: bool = True, dtype: bool = True) -> None:
    """``t`` (argument ``name``) must have the shape (``shape=True``) and dtype (``dtype=True``) of
    ``like`` (argument ``like_name``), and be on its device: ValueError for the shape and device,
    TypeError for the dtype."""
    if shape and t.shape != like.shape:
        raise ValueError(f"{op}: {like_name} and {name} must have the same shape, got {tuple(like.shape)} and "
                         f"{tuple(t.shape)}")
    if dtype and t.dtype != like.dtype:
        raise TypeError(f"{op}: {like_name} and {name} must have the same dtype, got {like.dtype} and {t.dtype}; "
                        f"convert {name} with {name}.to({like_name}.dtype)")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {like_name} on {like.device}; move {name} to "
                         f"{like_name}.device")


# The last integer tensor whose extremes ``index_extremes`` read: (a weak reference to it, its version
# counter then, (min, max)). One call checks the same labels up to three times (GradRegLoss's base loss,
# the penalty's label rule, the cross-entropy op); the version counter moves with every in-place change.
_LAST_EXTREMES: tuple[weakref.ref, int, tuple[int, int]] | None = None


def index_extremes(y: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor with entries: one reduction (torch.aminmax) and one read of the
    two numbers (a host sync on a GPU), reused while the same tensor is checked again unchanged."""
    global _LAST_EXTREMES
    version = None if y.is_inference() else y._version   # inference tensors have no version counter
    last = _LAST_EXTREMES
    if version is not None and last is not None and last[0]() is y and last[1] == version:
        return last[2]
    lo, hi = torch.aminmax(y)
    if y.device.type == "cpu":
        found = (lo.item(), hi.item())
    else:
        found = tuple(torch.stack((lo, hi)).tolist())
    if version is not None:
        _LAST_EXTREMES = (weakref.ref(y), version, found)
    return found
