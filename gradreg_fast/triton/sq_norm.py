"""Triton kernels of the per-sample squared norm and its backward.

    sq_norm:           out[b] = Σ_j x[b, j]²   (accumulated in out's dtype: fp32, fp64 for fp64)
    sq_norm_backward:  grad_x[b, j] = 2 · grad[b] · x[b, j]

Launchers view inputs as contiguous (B, N). The reduction runs one program per (row, split):
``split`` > 1 programs share a long row and combine with an atomic add (small batches on GPUs).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gradreg_fast import reference
from gradreg_fast.triton._cast import cast_for_store
from gradreg_fast.triton._launch import launch_kernel

BLOCK = 1024


@triton.jit
def sq_norm_rows_kernel(x_ptr, out_ptr, N, chunk, BLOCK: tl.constexpr, ATOMIC: tl.constexpr):
    """out[row] (+)= Σ x[row, j]² over j in [split·chunk, (split+1)·chunk) ∩ [0, N)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = out_ptr.dtype.element_ty
    base = x_ptr + row * N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(base + offs, mask=offs < hi, other=0.0).to(acc_ty)
        acc += v * v
    total = tl.sum(acc, axis=0)
    if ATOMIC:
        tl.atomic_add(out_ptr + row, total)
    else:
        tl.store(out_ptr + row, total)


@triton.jit
def sq_norm_backward_kernel(g_ptr, x_ptr, out_ptr, N, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc_ty = g_ptr.dtype.element_ty
    g = tl.load(g_ptr + offs // N, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    tl.store(out_ptr + offs, cast_for_store(2.0 * g * x, out_ptr), mask=mask)


def rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous (B, N) matrix."""
    return x.contiguous().reshape(x.shape[0], math.prod(x.shape[1:]))


def default_split(B: int, N: int, device: torch.device) -> int:
    """Programs per row: enough to fill a GPU when the batch is small, one on the CPU interpreter."""
    if device.type != "cuda" or B == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(N, 4 * BLOCK), triton.cdiv(4 * sms, B)))


def sq_norm_into(x2: torch.Tensor, out: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """Per-row squared norms of the contiguous (B, N) matrix ``x2`` into ``out`` (B,)."""
    B, N = x2.shape
    if B == 0:
        return out
    if N == 0:
        return out.zero_()
    split = default_split(B, N, x2.device) if split is None else max(1, min(split, triton.cdiv(N, BLOCK)))
    chunk = triton.cdiv(triton.cdiv(N, split), BLOCK) * BLOCK
    split = triton.cdiv(N, chunk)
    if split > 1:
        out.zero_()
    launch_kernel(sq_norm_rows_kernel, (B, split), x2, out, N, chunk, BLOCK=BLOCK, ATOMIC=split > 1)
    return out


def sq_norm(x: torch.Tensor, split: int | None = None) -> torch.Tensor:
    x2 = rows(x)
    out = torch.empty(x.shape[0], device=x.device, dtype=reference.acc_dtype(x.dtype))
    return sq_norm_into(x2, out, split)


def sq_norm_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x2 = rows(x)
    g = grad.to(reference.acc_dtype(x.dtype)).contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = x2.numel()
    if total:
        launch_kernel(sq_norm_backward_kernel, (triton.cdiv(total, BLOCK),), g, x2, out, x2.shape[1], total,
                      BLOCK=BLOCK)
    return out
