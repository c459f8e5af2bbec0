"""Triton kernels of the softmax cross-entropy, its backward and its Hessian-vector product.

Each program handles a tile of ROWS rows × BLOCK_K classes (several rows per program when K is
small, e.g. 10 classes), looping over the classes in chunks of BLOCK_K when K is larger:

    forward:   online max / Σ exp over the chunks → lse, loss = lse − z[y]      (1 pass over z)
    backward:  grad_z = grad · (exp(z − lse) − onehot(y))                      (1 pass)
    hvp:       s = Σ p u, then hvp = c · p (u − s), dot = s − u[y]             (2 passes; 1 load
               each when K ≤ BLOCK_K, the second pass re-reads from cache otherwise)
Math in fp32 (fp64 for fp64 logits); p is recomputed from the saved lse, which is kept in fp64
for every dtype: z − lse is formed in fp64 and then rounded, so exp keeps fp32 accuracy when |lse|
is large (an fp32 lse near 100 is off by up to 4e-6, and p by as much relatively).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradreg_fast import reference
from gradreg_fast.triton._cast import cast_for_store
from gradreg_fast.triton._launch import launch_kernel

MAX_BLOCK_K = 1024
TILE = 2048  # elements per program when several rows share one


def _tile(B: int, K: int) -> tuple[int, int]:
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(max(K, 1)))
    rows = max(1, min(TILE // block_k, triton.next_power_of_2(max(B, 1))))
    return rows, block_k


@triton.jit
def ce_forward_kernel(z_ptr, y_ptr, loss_ptr, lse_ptr, B, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    acc_ty = loss_ptr.dtype.element_ty
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < B
    m = tl.full([ROWS], float("-inf"), acc_ty)
    s = tl.zeros([ROWS], acc_ty)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (k < K)[None, :]
        v = tl.load(z_ptr + r[:, None] * K + k[None, :], mask=mask, other=float("-inf")).to(acc_ty)
        m_new = tl.maximum(m, tl.max(v, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep the sum at 0
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(v - shift[:, None]), axis=1)
        m = m_new
    empty = m == float("-inf")
    md = m.to(tl.float64)  # lse in float64 (see the module docstring)
    lse = tl.where(empty, md, md + tl.log(tl.where(empty, 1.0, s).to(tl.float64)))
    label = tl.load(y_ptr + r, mask=rmask, other=0)
    zy = tl.load(z_ptr + r * K + label, mask=rmask, other=0.0).to(tl.float64)
    tl.store(lse_ptr + r, lse, mask=rmask)
    tl.store(loss_ptr + r, (lse - zy).to(acc_ty), mask=rmask)


@triton.jit
def _rows(lse_ptr, y_ptr, B, ROWS: tl.constexpr):
    # this program's rows r (int64) and their mask, saved lse and labels
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < B
    return r, rmask, tl.load(lse_ptr + r, mask=rmask, other=0.0), tl.load(y_ptr + r, mask=rmask, other=0)


@triton.jit
def _softmax_chunk(z_ptr, r, rmask, lse, k0, K, BLOCK_K: tl.constexpr, acc_ty: tl.constexpr):
    # classes k0 .. k0 + BLOCK_K of rows r: k, the offsets, the mask, and p = exp(z − lse) in acc_ty
    k = k0 + tl.arange(0, BLOCK_K)
    mask = rmask[:, None] & (k < K)[None, :]
    offs = r[:, None] * K + k[None, :]
    zd = tl.load(z_ptr + offs, mask=mask, other=float("-inf")).to(tl.float64)
    return k, offs, mask, tl.exp((zd - lse[:, None]).to(acc_ty))


@triton.jit
def ce_backward_kernel(g_ptr, z_ptr, y_ptr, lse_ptr, out_ptr, B, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    acc_ty = g_ptr.dtype.element_ty
    r, rmask, lse, label = _rows(lse_ptr, y_ptr, B, ROWS)
    grad = tl.load(g_ptr + r, mask=rmask, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        k, offs, mask, p = _softmax_chunk(z_ptr, r, rmask, lse, k0, K, BLOCK_K, acc_ty)
        p = p - tl.where(k[None, :] == label[:, None], 1.0, 0.0)
        tl.store(out_ptr + offs, cast_for_store(grad[:, None] * p, out_ptr), mask=mask)


@triton.jit
def ce_hvp_kernel(u_ptr, c_ptr, z_ptr, y_ptr, lse_ptr, hvp_ptr, dot_ptr, B, K,
                  ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    acc_ty = c_ptr.dtype.element_ty
    r, rmask, lse, label = _rows(lse_ptr, y_ptr, B, ROWS)
    c = tl.load(c_ptr + r, mask=rmask, other=0.0)
    s = tl.zeros([ROWS], acc_ty)
    for k0 in range(0, K, BLOCK_K):
        k, offs, mask, p = _softmax_chunk(z_ptr, r, rmask, lse, k0, K, BLOCK_K, acc_ty)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        s += tl.sum(p * u, axis=1)
    for k0 in range(0, K, BLOCK_K):
        k, offs, mask, p = _softmax_chunk(z_ptr, r, rmask, lse, k0, K, BLOCK_K, acc_ty)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(hvp_ptr + offs, cast_for_store(c[:, None] * p * (u - s[:, None]), hvp_ptr), mask=mask)
    uy = tl.load(u_ptr + r * K + label, mask=rmask, other=0.0).to(acc_ty)
    tl.store(dot_ptr + r, s - uy, mask=rmask)


def _per_sample(v: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return v.to(reference.acc_dtype(logits.dtype)).contiguous()


def _lse(lse: torch.Tensor) -> torch.Tensor:
    return lse.to(torch.float64).contiguous()


def cross_entropy_forward(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.contiguous()
    B, K = z.shape
    acc = reference.acc_dtype(z.dtype)
    loss = torch.empty(B, device=z.device, dtype=acc)
    lse = torch.empty(B, device=z.device, dtype=torch.float64)
    if B:
        rows, block_k = _tile(B, K)
        launch_kernel(ce_forward_kernel, (triton.cdiv(B, rows),), z, y.contiguous(), loss, lse, B, K,
                      ROWS=rows, BLOCK_K=block_k)
    return loss, lse


def cross_entropy_backward(grad: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                           lse: torch.Tensor) -> torch.Tensor:
    z = logits.contiguous()
    B, K = z.shape
    out = torch.empty_like(z)
    if B:
        rows, block_k = _tile(B, K)
        launch_kernel(ce_backward_kernel, (triton.cdiv(B, rows),), _per_sample(grad, z), z, y.contiguous(),
                      _lse(lse), out, B, K, ROWS=rows, BLOCK_K=block_k)
    return out


def cross_entropy_hvp(u: torch.Tensor, scale: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                      lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.contiguous()
    uc = u.contiguous()
    B, K = z.shape
    hvp = torch.empty_like(uc)
    dot = torch.empty(B, device=z.device, dtype=reference.acc_dtype(z.dtype))
    if B:
        rows, block_k = _tile(B, K)
        launch_kernel(ce_hvp_kernel, (triton.cdiv(B, rows),), uc, _per_sample(scale, z), z, y.contiguous(),
                      _lse(lse), hvp, dot, B, K, ROWS=rows, BLOCK_K=block_k)
    return hvp, dot
