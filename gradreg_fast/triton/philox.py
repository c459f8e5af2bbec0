"""Triton kernels of the Philox Gaussian stream (gaussian_like, project, project_backward).

The stream is the one defined in gradreg_fast/reference/philox.py: Philox 4x32-10 with key
(seed_lo, seed_hi) and counter (q_lo, q_hi, offset_lo, offset_hi), q = e // 4, then Box–Muller in
float64 on the word pairs (w0, w1) and (w2, w3), rounded to float32.

Triton's own ``tl.philox_impl`` has the same Philox 4x32-10 round (multipliers 0xD2511F53,
0xCD9E8D57, Weyl key bumps 0x9E3779B9, 0xBB67AE85) and ``tl.philox(seed, c0..c3)`` the same key
split; but ``tl.randint4x``/``tl.randn`` use the counter (offset_lo, offset_hi, 0, 0), their own
uint → uniform map (a sign fold and scale 4.6566127342e-10, clamped at 1e-7) and float32
Box–Muller using two of the four words: a different stream. The round is therefore written here
(ten lines, uint32 arithmetic with tl.umulhi), so that only documented primitives are relied on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradreg_fast.reference.ops import acc_dtype
from gradreg_fast.reference.philox import MASK32, TWO_PI
from gradreg_fast.triton._launch import launch_kernel

_M0: tl.constexpr = tl.constexpr(0xD2511F53)
_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
_TWO_PI: tl.constexpr = tl.constexpr(TWO_PI)
_INV_2_32: tl.constexpr = tl.constexpr(2.0 ** -32)


@triton.jit
def _philox_words(q, k0, k1, o0, o1):
    """Philox 4x32-10 at block indices q (int64 tensor) of the stream with key (k0, k1) and offset
    words (o0, o1) (uint32 scalars)."""
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = c0 * 0 + o0
    c3 = c0 * 0 + o1
    for round_ in tl.static_range(10):
        if round_ > 0:
            k0 = k0 + _W0
            k1 = k1 + _W1
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _radius_angle(w_radius, w_angle):
    """ρ = sqrt(-2 log u_a), θ = 2π u_b in float64, u_a = (w + 1) 2^-32, u_b = w 2^-32."""
    u_a = (w_radius.to(tl.float64) + 1.0) * _INV_2_32
    u_b = w_angle.to(tl.float64) * _INV_2_32
    return tl.sqrt(-2.0 * tl.log(u_a)), u_b * _TWO_PI  # tensor first: constexpr * tensor stays constexpr


@triton.jit
def _normal_at(e, k0, k1, o0, o1):
    """z[e] (float32) for a tensor of stream indices e (int64)."""
    w0, w1, w2, w3 = _philox_words(e >> 2, k0, k1, o0, o1)
    lane = e & 3
    rho, theta = _radius_angle(tl.where(lane < 2, w0, w2), tl.where(lane < 2, w1, w3))
    trig = tl.where((lane & 1) == 1, tl.sin(theta), tl.cos(theta))
    return (rho * trig).to(tl.float32)


@triton.jit
def _cast(z, dtype: tl.constexpr):
    """float32 -> dtype, round to nearest even. bfloat16 is rounded on the bits (z is finite),
    because the interpreter's float32 -> bfloat16 conversion truncates."""
    if dtype == tl.bfloat16:
        bits = z.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return z.to(dtype)


@triton.jit(do_not_specialize=["n", "k0", "k1", "o0", "o1"])
def _gaussian_kernel(out_ptr, n, k0, k1, o0, o1, BLOCK_Q: tl.constexpr):
    """out[e] = z[e] for e < n; each program computes 4·BLOCK_Q consecutive elements."""
    pid = tl.program_id(0).to(tl.int64)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    w0, w1, w2, w3 = _philox_words(q, k0.to(tl.uint32), k1.to(tl.uint32), o0.to(tl.uint32), o1.to(tl.uint32))
    rho01, th01 = _radius_angle(w0, w1)
    rho23, th23 = _radius_angle(w2, w3)
    z0 = (rho01 * tl.cos(th01)).to(tl.float32)
    z1 = (rho01 * tl.sin(th01)).to(tl.float32)
    z2 = (rho23 * tl.cos(th23)).to(tl.float32)
    z3 = (rho23 * tl.sin(th23)).to(tl.float32)
    # z[n, i, j] = element 4n + 2i + j  ->  row-major (4·BLOCK_Q,)
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (4 * BLOCK_Q,))
    offs = pid * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q).to(tl.int64)
    tl.store(out_ptr + offs, _cast(z, out_ptr.dtype.element_ty), mask=offs < n)


@triton.jit(do_not_specialize=["B", "K", "k0", "k1", "o0", "o1"])
def _project_kernel(x_ptr, s_ptr, B, K, k0, k1, o0, o1, PER_SAMPLE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """s[i] = Σ_k z[e(i, k)] · x[i, k], e = i·K + k (PER_SAMPLE) or k; BLOCK_B rows per program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    acc = tl.zeros([BLOCK_B], dtype=ACC)
    for k_start in range(0, K, BLOCK_K):
        cols = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = row_ok[:, None] & (cols < K)[None, :]
        flat = rows[:, None] * K + cols[None, :]
        if PER_SAMPLE:
            e = flat
        else:
            e = rows[:, None] * 0 + cols[None, :]
        r = _normal_at(e, k0.to(tl.uint32), k1.to(tl.uint32), o0.to(tl.uint32), o1.to(tl.uint32))
        x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(ACC)
        acc += tl.sum(tl.where(mask, r.to(ACC) * x, 0.0), axis=1)
    tl.store(s_ptr + rows, acc.to(s_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["total", "K", "k0", "k1", "o0", "o1"])
def _project_backward_kernel(g_ptr, out_ptr, total, K, k0, k1, o0, o1, PER_SAMPLE: tl.constexpr,
                             ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[i, k] = g[i] · z[e(i, k)] over the flat (B·K,) output."""
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = flat < total
    rows = flat // K
    if PER_SAMPLE:
        e = flat
    else:
        e = flat - rows * K
    r = _normal_at(e, k0.to(tl.uint32), k1.to(tl.uint32), o0.to(tl.uint32), o1.to(tl.uint32))
    g = tl.load(g_ptr + rows, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + flat, _cast(g * r.to(ACC), out_ptr.dtype.element_ty), mask=mask)


def _stream_words(seed: int, offset: int) -> tuple[int, int, int, int]:
    """(key0, key1, offset0, offset1) from the int64-coded seed and the offset."""
    s = seed & ((1 << 64) - 1)
    return s & MASK32, s >> 32, offset & MASK32, offset >> 32


def _acc(dtype: torch.dtype):
    """The Triton type of acc_dtype(dtype)."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def gaussian_like(x: torch.Tensor, seed: int, offset: int, per_sample: bool) -> torch.Tensor:
    """Launcher: x-shaped contiguous normals in x's dtype (seed as int64 bits, offset >= 0)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel = out.numel()
    if numel == 0:
        return out
    row = numel if (per_sample or x.dim() == 0) else numel // x.shape[0]
    target = out.view(-1)[:row] if row == numel else torch.empty(row, dtype=x.dtype, device=x.device)
    block_q = 256
    grid = (triton.cdiv(row, 4 * block_q),)
    launch_kernel(_gaussian_kernel, grid, target, row, *_stream_words(seed, offset), BLOCK_Q=block_q)
    if row != numel:
        out.copy_(target.reshape(x.shape[1:]).expand(x.shape))
    return out


def project(out: torch.Tensor, seed: int, offset: int, per_sample: bool) -> torch.Tensor:
    """Launcher: s (B,) in the accumulation dtype."""
    x = out.contiguous()
    B, K = x.shape
    s = torch.empty(B, dtype=acc_dtype(x.dtype), device=x.device)
    if B == 0:
        return s
    if K == 0:
        return s.zero_()
    block_k = min(64, triton.next_power_of_2(K))
    block_b = max(1, min(64, 1024 // block_k, triton.next_power_of_2(B)))
    grid = (triton.cdiv(B, block_b),)
    launch_kernel(_project_kernel, grid, x, s, B, K, *_stream_words(seed, offset), PER_SAMPLE=per_sample,
                  ACC=_acc(x.dtype), BLOCK_B=block_b, BLOCK_K=block_k)
    return s


def project_backward(grad: torch.Tensor, seed: int, offset: int, per_sample: bool, num_outputs: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Launcher: grad_out (B, K) = grad[:, None] · r, in ``dtype``."""
    g = grad.to(acc_dtype(dtype)).contiguous()
    out = torch.empty((g.shape[0], num_outputs), dtype=dtype, device=g.device)
    total = out.numel()
    if total == 0:
        return out
    block = 1024
    launch_kernel(_project_backward_kernel, (triton.cdiv(total, block),),
                  g, out, total, num_outputs, *_stream_words(seed, offset), PER_SAMPLE=per_sample,
                  ACC=_acc(dtype), BLOCK=block)
    return out
