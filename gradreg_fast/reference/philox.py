"""Counter-based Gaussian stream of gradreg_fast (Philox 4x32-10 + Box–Muller): the ground truth.

THE STREAM (every backend — this reference, C++ csrc/philox.h, CUDA, Triton — implements exactly this):

A stream is named by ``seed`` (an integer in [0, 2^64)) and ``offset`` (an integer in [0, 2^63)); it
is an endless sequence of standard normal float32 numbers z[0], z[1], ... Element e is computed as:

1. Philox 4x32-10 (Salmon et al., SC'11; the Random123 definition) with
       key     = (seed mod 2^32, seed >> 32)
       counter = (q mod 2^32, q >> 32, offset mod 2^32, offset >> 32),   q = e // 4
   gives four 32-bit words (w0, w1, w2, w3). One round maps counter c and key k to
       (hi(B·c2) ^ c1 ^ k0,  lo(B·c2),  hi(A·c0) ^ c3 ^ k1,  lo(A·c0)),
   A = 0xD2511F53, B = 0xCD9E8D57 (hi/lo: upper/lower 32 bits of the 64-bit product); after each
   round the key is bumped by the Weyl constants k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32).
   Ten rounds.
2. Box–Muller on the pairs (w0, w1) and (w2, w3), in float64:
       u_a = (w_a + 1) · 2^-32 ∈ (0, 1]        (radius word: never 0, so log is finite)
       u_b =  w_b      · 2^-32 ∈ [0, 1)        (angle word)
       ρ = sqrt(-2 · log(u_a)),  θ = 2π · u_b  (2π the float64 nearest 6.283185307179586)
       z[4q + 0] = ρ · cos θ,  z[4q + 1] = ρ · sin θ   from (w0, w1)
       z[4q + 2] = ρ · cos θ,  z[4q + 3] = ρ · sin θ   from (w2, w3)
   and each product is rounded once, float64 → float32. (So |z| ≤ sqrt(64 ln 2) ≈ 6.66.)
3. Other dtypes are the float32 value converted: exactly for float64, round-to-nearest for
   float16/bfloat16 (float32 → low precision, never float64 → low precision directly).

All the integer steps and the uniforms are exact, so every backend computes the same float64
arguments; they differ only in their float64 log/sqrt/cos/sin (libm, SLEEF, CUDA libdevice: all
within a few float64 ulp), which changes the float32 result only when the exact value lies within
~1e-16 (relative) of a float32 rounding boundary: about one element in 10^8, and then by 1 ulp.

Uses of the stream (gradreg_fast.ops.philox):
    gaussian_like(x, per_sample=True)   v.flatten()[e] = z[e]            (x-shaped, row-major)
    gaussian_like(x, per_sample=False)  v[i].flatten()[j] = z[j]         (one row shared by the batch)
    project(out, per_sample=False)      s_i = Σ_k z[k] · out[i, k]        (one r shared by the batch)
    project(out, per_sample=True)       s_i = Σ_k z[i·K + k] · out[i, k]  (r_i = row i of gaussian_like(out))

Streams with different (seed, offset) are different Philox counters/keys, i.e. independent for
all practical purposes; using the same (seed, offset) twice gives the same numbers twice.

This module computes Philox with int64 tensor arithmetic masked to 32 bits (vectorized, any
device) and is written independently of the kernels it validates.
"""
from __future__ import annotations

import math

import torch

from gradreg_fast.reference.ops import acc_dtype

PHILOX_M0 = 0xD2511F53       # multiplies counter word 0
PHILOX_M1 = 0xCD9E8D57       # multiplies counter word 2
PHILOX_W0 = 0x9E3779B9       # key bump of key word 0 (golden ratio)
PHILOX_W1 = 0xBB67AE85       # key bump of key word 1 (sqrt(3) - 1)
PHILOX_ROUNDS = 10
TWO_PI = 6.283185307179586   # float64(2π), the same constant in every backend
MASK32 = 0xFFFFFFFF
SEED_LIMIT = 1 << 64
OFFSET_LIMIT = 1 << 63


def check_seed_offset(seed: int, offset: int, op: str) -> None:
    """seed ∈ [0, 2^64) and offset ∈ [0, 2^63), Python integers (not bool, not tensors)."""
    for name, value, limit in (("seed", seed, SEED_LIMIT), ("offset", offset, OFFSET_LIMIT)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{op}: {name} must be a Python int, got {type(value).__name__}; "
                            f"pass int({name}) (e.g. int(torch.randint(2**62, ())))")
        if not 0 <= value < limit:
            raise ValueError(f"{op}: {name} must be in [0, 2^{limit.bit_length() - 1}), got {value}")


def seed_to_int64(seed: int) -> int:
    """The uint64 seed as the int64 with the same bits (how the ops' schemas carry it)."""
    return seed - SEED_LIMIT if seed >= SEED_LIMIT // 2 else seed


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m · c for a constant m < 2^32 and c ∈ [0, 2^32) (int64 tensors).

    m · c can reach 2^64, beyond int64: split c into 16-bit halves, each partial product < 2^48.
    """
    top = m * (c >> 16)           # < 2^48
    bottom = m * (c & 0xFFFF)     # < 2^48
    t = top + (bottom >> 16)      # m·c = t·2^16 + (bottom mod 2^16), t < 2^49
    lo = ((t & 0xFFFF) << 16) | (bottom & 0xFFFF)
    hi = t >> 16
    return hi, lo


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox 4x32-10 of the counter words (four int64 tensors with values in [0, 2^32)) under the
    key (k0, k1); returns the four output words as int64 tensors in [0, 2^32)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(PHILOX_ROUNDS):
        if round_ > 0:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_words(seed: int, offset: int, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox words of the stream (seed, offset) at the block indices q (int64 tensor)."""
    check_seed_offset(seed, offset, "philox_words")
    q = blocks.to(torch.int64)
    counter = (q & MASK32, q >> 32, torch.full_like(q, offset & MASK32), torch.full_like(q, offset >> 32))
    return philox4x32_10(counter, (seed & MASK32, seed >> 32))


def _box_muller(w_radius: torch.Tensor, w_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u_a = (w_radius.double() + 1.0) * 2.0 ** -32
    u_b = w_angle.double() * 2.0 ** -32
    rho = torch.sqrt(-2.0 * torch.log(u_a))
    theta = TWO_PI * u_b
    return (rho * torch.cos(theta)).float(), (rho * torch.sin(theta)).float()


def normal_stream(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """z[0 : numel] of the stream (seed, offset) as a float32 tensor on ``device``."""
    check_seed_offset(seed, offset, "normal_stream")
    blocks = torch.arange(math.ceil(numel / 4), dtype=torch.int64, device=device)
    w0, w1, w2, w3 = philox_words(seed, offset, blocks)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    return torch.stack((z0, z1, z2, z3), dim=1).reshape(-1)[:numel]


def gaussian_like(x: torch.Tensor, seed: int, offset: int, *, per_sample: bool = True) -> torch.Tensor:
    """x-shaped v ~ N(0, I) in x's dtype (contiguous): v.flatten()[e] = z[e] (per_sample=True) or
    v[i].flatten()[j] = z[j] for every sample i (per_sample=False: one tangent shared by the batch)."""
    if per_sample or x.dim() == 0:
        return normal_stream(seed, offset, x.numel(), x.device).reshape(x.shape).to(x.dtype)
    row = normal_stream(seed, offset, math.prod(x.shape[1:]), x.device).reshape(x.shape[1:])
    return row.to(x.dtype).expand(x.shape).contiguous()


def projection_vectors(batch: int, num_outputs: int, seed: int, offset: int, *, per_sample: bool,
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The r of ``project``: shape (K,) shared (per_sample=False) or (B, K) per sample, in ``dtype``."""
    if per_sample:
        return normal_stream(seed, offset, batch * num_outputs, device).reshape(batch, num_outputs).to(dtype)
    return normal_stream(seed, offset, num_outputs, device).to(dtype)


def project(out: torch.Tensor, seed: int, offset: int, *, per_sample: bool = False) -> torch.Tensor:
    """s_i = Σ_k r_ik · out_ik with r from the stream, in the accumulation dtype (float32 for
    float16/bfloat16/float32, float64 for float64). Differentiable (r is a constant)."""
    acc = acc_dtype(out.dtype)
    r = projection_vectors(out.shape[0], out.shape[1], seed, offset, per_sample=per_sample, dtype=acc,
                           device=out.device)
    return (out.to(acc) * r).sum(dim=1)


def project_backward(grad: torch.Tensor, seed: int, offset: int, per_sample: bool, num_outputs: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Gradient of ``project`` with respect to out: grad_out_ik = grad_i · r_ik, in ``dtype``."""
    acc = acc_dtype(dtype)
    r = projection_vectors(grad.shape[0], num_outputs, seed, offset, per_sample=per_sample, dtype=acc,
                           device=grad.device)
    return (grad.to(acc).unsqueeze(1) * r).to(dtype)
