"""Triton kernels of the finite-difference direction: n_b = ‖g_b‖, out_b = x_b + h · g_b / n_b.

Two launch shapes, chosen by the launcher:
- one program per row (the usual case: batch ≥ a few programs per SM): the program first reduces
  Σ g² over the row, then streams x and g once more (g from cache) and writes out — one kernel;
- a small batch of long rows (GPU only): the split reduction of sq_norm (several programs per row,
  atomic add) followed by one elementwise kernel over all of x, g — two kernels, full occupancy.
Where n_b = 0 the scale h / n_b is replaced by 0, so the sample is returned unperturbed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradreg_fast import reference
from gradreg_fast.triton._cast import cast_for_store
from gradreg_fast.triton._launch import launch_kernel
from gradreg_fast.triton.sq_norm import BLOCK, default_split, rows, sq_norm_into


@triton.jit
def _scale(sumsq, h_ptr):
    h = tl.load(h_ptr)
    n = tl.sqrt(sumsq)
    return n, tl.where(n > 0, h / tl.where(n > 0, n, 1.0), 0.0)


@triton.jit
def fd_direction_row_kernel(x_ptr, g_ptr, out_ptr, norm_ptr, N, h_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = norm_ptr.dtype.element_ty
    xb = x_ptr + row * N
    gb = g_ptr + row * N
    ob = out_ptr + row * N
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(gb + offs, mask=offs < N, other=0.0).to(acc_ty)
        acc += v * v
    n, scale = _scale(tl.sum(acc, axis=0), h_ptr)
    tl.store(norm_ptr + row, n)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(xb + offs, mask=mask, other=0.0).to(acc_ty)
        g = tl.load(gb + offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(ob + offs, cast_for_store(x + scale * g, out_ptr), mask=mask)


@triton.jit
def fd_direction_apply_kernel(x_ptr, g_ptr, out_ptr, norm_ptr, N, h_ptr, BLOCK: tl.constexpr):
    """Program (row, block) writes its block of out. norm_ptr holds Σ g² (read only here; _sqrt_kernel
    turns it into the norm after this kernel)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    acc_ty = norm_ptr.dtype.element_ty
    n, scale = _scale(tl.load(norm_ptr + row), h_ptr)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(acc_ty)
    g = tl.load(g_ptr + row * N + offs, mask=mask, other=0.0).to(acc_ty)
    tl.store(out_ptr + row * N + offs, cast_for_store(x + scale * g, out_ptr), mask=mask)


@triton.jit
def _sqrt_kernel(norm_ptr, B, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    tl.store(norm_ptr + offs, tl.sqrt(tl.load(norm_ptr + offs, mask=mask, other=0.0)), mask=mask)


def fd_direction(x: torch.Tensor, g: torch.Tensor, h: float,
                 split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x2, g2 = rows(x), rows(g)
    B, N = x2.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    norms = torch.empty(B, device=x.device, dtype=reference.acc_dtype(x.dtype))
    if B == 0:
        return out, norms
    # h travels as a one-element tensor: Triton would pass a Python float as fp32, not fp64
    h_t = torch.full((1,), h, device=x.device, dtype=norms.dtype)
    split = default_split(B, N, x.device) if split is None else split
    if split <= 1:
        launch_kernel(fd_direction_row_kernel, (B,), x2, g2, out, norms, N, h_t, BLOCK=BLOCK)
        return out, norms
    sq_norm_into(g2, norms, split)
    # blocks along the row on grid axis 1 (limit 65535 blocks of BLOCK elements per row)
    launch_kernel(fd_direction_apply_kernel, (B, triton.cdiv(N, BLOCK)), x2, g2, out, norms, N, h_t, BLOCK=BLOCK)
    launch_kernel(_sqrt_kernel, (triton.cdiv(B, BLOCK),), norms, B, BLOCK=BLOCK)
    return out, norms
