"""Triton kernels of the fused bias + activation and its two derivative ops, with their launcher.

One elementwise kernel, specialised at compile time on the activation and the pass:

    MODE 0  out = act(z)                        z = x + b
    MODE 1  out = grad · act'(r)                r = y (output-based activations) or z
    MODE 2  out = gg · grad · (d act'/d r)(r)

Everything is computed in fp32 (fp64 for fp64 tensors) and cast on store. tanh, erf and the
sigmoid are written from tl.exp (libdevice functions do not run in the interpreter); erf uses the
project's own least-squares fits (absolute error 1.5e-7 in fp32, 3e-15 in fp64):

    |z| < 1:  erf(z) = z · P(z²)                        (P of degree 10)
    |z| ≥ 1:  erf(z) = 1 − exp(−z²) · Q(1 / (1 + z/2))  (Q of degree 14; z clamped to 6)

The formulas are those of csrc/bias_act.h.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from gradreg_fast._bias_act_spec import ACT_CODE, ACTIVATIONS, NO_SECOND, geometry, memory_format
from gradreg_fast.reference.ops import acc_dtype
from gradreg_fast.triton._launch import launch_kernel

# Coefficients of P and Q, lowest degree first (fitted with numpy at Chebyshev nodes; the same in
# csrc/bias_act.h's erf_).
_ERF_P = tl.constexpr((
    1.128379167095513, -0.37612638903177553, 0.11283791670652926, -0.026866170594406182, 0.005223977199712658,
    -0.0008548306409616672, 0.0001205471382158921, -1.4913713278303188e-05, 1.6313591021541446e-06,
    -1.5202359983515584e-07, 9.454661204489945e-09,
))
_ERF_Q = tl.constexpr((
    1.5124761049145619e-07, 0.2820889548126756, 0.282199139702075, 0.24568726759219245, 0.18494109962974437,
    0.036543864143163345, 0.18866482200407475, -0.6557860486825482, 1.3581453418521985, -2.499320097816156,
    3.258800206005376, -2.7635733687378057, 1.474510770936276, -0.4557770177589461, 0.06287574985514549,
))

_SQRT1_2 = tl.constexpr(math.sqrt(0.5))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_GELU_K = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_C = tl.constexpr(0.044715)
_SOFTPLUS_THRESHOLD = tl.constexpr(20.0)

LINEAR, RELU, LEAKY_RELU, TANH, SIGMOID, SOFTPLUS, GELU, GELU_TANH, SILU, ELU = (
    tl.constexpr(ACT_CODE[a]) for a in ("linear", "relu", "leaky_relu", "tanh", "sigmoid", "softplus",
                                        "gelu", "gelu_tanh", "silu", "elu"))


@triton.jit
def _c(value: tl.constexpr, like):
    # A constant in the compute dtype (fp64 constants keep their full precision).
    return tl.full([], value, like.dtype)


@triton.jit
def _horner(coeffs: tl.constexpr, n: tl.constexpr, x):
    # Σ_i coeffs[i] x^i (n coefficients, lowest degree first) by Horner's rule, in x's dtype
    acc = _c(coeffs[n - 1], x)
    for j in tl.static_range(2, n + 1):
        acc = acc * x + _c(coeffs[n - j], x)
    return acc


@triton.jit
def _tanh(u):
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.jit
def _tanh_sech2(u):
    # tanh(u) and 1 - tanh(u)² = 4e / (1 + e)², e = exp(-2|u|): no cancellation when |tanh| -> 1
    e = tl.exp(-2.0 * tl.abs(u))
    d = 1.0 + e
    t = (1.0 - e) / d
    return tl.where(u >= 0, t, -t), 4.0 * e / (d * d)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _erf(z):
    a = tl.minimum(tl.abs(z), 6.0)
    u = a * a
    p = _horner(_ERF_P, 11, u)
    small = a * p
    t = 1.0 / (1.0 + 0.5 * a)
    q = _horner(_ERF_Q, 15, t)
    large = 1.0 - tl.exp(-u) * q
    r = tl.where(a < 1.0, small, large)
    return tl.where(z < 0, -r, r)


@triton.jit
def _gelu_parts(r):
    # tanh-form GELU: t = tanh(k (r + c r³)), q = 1 - t², du = d(inner)/dr, ddu = d²(inner)/dr²
    k = _c(_GELU_K, r)
    c = _c(_GELU_C, r)
    t, q = _tanh_sech2(k * (r + c * r * r * r))
    du = k * (1.0 + 3.0 * c * r * r)
    ddu = 6.0 * k * c * r
    return t, q, du, ddu


@triton.jit
def _forward(z, alpha, ACT: tl.constexpr):
    if ACT == LINEAR:
        out = z
    elif ACT == RELU:
        out = tl.where(z > 0, z, 0.0)
    elif ACT == LEAKY_RELU:
        out = tl.where(z > 0, z, alpha * z)
    elif ACT == TANH:
        out = _tanh(z)
    elif ACT == SIGMOID:
        out = _sigmoid(z)
    elif ACT == SOFTPLUS:
        out = tl.where(z > _SOFTPLUS_THRESHOLD, z,
                       tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z))))
    elif ACT == GELU:
        out = 0.5 * z * (1.0 + _erf(z * _c(_SQRT1_2, z)))
    elif ACT == GELU_TANH:
        t, q, du, ddu = _gelu_parts(z)
        out = 0.5 * z * (1.0 + t)
    elif ACT == SILU:
        out = z * _sigmoid(z)
    else:  # ELU: alpha (e^z - 1), written to keep precision near 0
        e = tl.exp(tl.minimum(z, 0.0))
        em1 = tl.where(tl.abs(z) < 1e-5, z + 0.5 * z * z, e - 1.0)
        out = tl.where(z > 0, z, alpha * em1)
    return out


@triton.jit
def _first(r, alpha, ACT: tl.constexpr):
    if ACT == LINEAR:
        out = tl.full(r.shape, 1.0, r.dtype)
    elif ACT == RELU:
        out = tl.where(r > 0, 1.0, 0.0).to(r.dtype)
    elif ACT == LEAKY_RELU:
        out = tl.where(r > 0, 1.0, alpha).to(r.dtype)
    elif ACT == TANH:
        out = 1.0 - r * r
    elif ACT == SIGMOID:
        out = r * (1.0 - r)
    elif ACT == SOFTPLUS:
        out = tl.where(r > _SOFTPLUS_THRESHOLD, 1.0, _sigmoid(r))
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + _erf(r * _c(_SQRT1_2, r)))
        pdf = tl.exp(-0.5 * r * r) * _c(_INV_SQRT_2PI, r)
        out = cdf + r * pdf
    elif ACT == GELU_TANH:
        t, q, du, ddu = _gelu_parts(r)
        out = 0.5 * (1.0 + t) + 0.5 * r * q * du
    elif ACT == SILU:
        s = _sigmoid(r)
        out = s * (1.0 + r * (1.0 - s))
    else:  # ELU
        out = tl.where(r > 0, 1.0, alpha * tl.exp(tl.minimum(r, 0.0)))
    return out


@triton.jit
def _second(r, alpha, ACT: tl.constexpr):
    if ACT == TANH:
        out = -2.0 * r
    elif ACT == SIGMOID:
        out = 1.0 - 2.0 * r
    elif ACT == SOFTPLUS:
        s = _sigmoid(r)
        out = tl.where(r > _SOFTPLUS_THRESHOLD, 0.0, s * (1.0 - s))
    elif ACT == GELU:
        pdf = tl.exp(-0.5 * r * r) * _c(_INV_SQRT_2PI, r)
        out = pdf * (2.0 - r * r)
    elif ACT == GELU_TANH:
        t, q, du, ddu = _gelu_parts(r)
        out = q * (du + 0.5 * r * (ddu - 2.0 * t * du * du))
    elif ACT == SILU:
        s = _sigmoid(r)
        out = s * (1.0 - s) * (2.0 + r * (1.0 - 2.0 * s))
    elif ACT == ELU:
        out = tl.where(r > 0, 0.0, alpha * tl.exp(tl.minimum(r, 0.0)))
    else:  # linear, relu, leaky_relu: act'' = 0
        out = tl.zeros(r.shape, r.dtype)
    return out


@triton.jit
def bias_act_kernel(out_ptr, ref_ptr, a_ptr, g_ptr, b_ptr, n, C, inner, alpha,
                    ACT: tl.constexpr, MODE: tl.constexpr, HAS_REF: tl.constexpr, HAS_BIAS: tl.constexpr,
                    F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    cdt = tl.float64 if F64 else tl.float32
    alpha_c = tl.zeros([BLOCK], cdt) + alpha
    if HAS_REF:
        r = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(cdt)
        if HAS_BIAS:
            ch = (offs // inner) % C
            r = r + tl.load(b_ptr + ch, mask=mask, other=0.0).to(cdt)
    else:
        r = tl.zeros([BLOCK], cdt)
    if MODE == 0:
        out = _forward(r, alpha_c, ACT)
    elif MODE == 1:
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(cdt)
        out = a * _first(r, alpha_c, ACT)
    else:
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(cdt)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(cdt)
        out = a * g * _second(r, alpha_c, ACT)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _memory_order(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """t in format ``fmt``, viewed so that its elements are in memory order (a contiguous view)."""
    t = t.contiguous(memory_format=fmt)
    return t.permute(0, 2, 3, 1) if fmt == torch.channels_last else t


def _launch(mode: int, main: torch.Tensor, ref: torch.Tensor | None, a: torch.Tensor | None,
            g: torch.Tensor | None, b: torch.Tensor | None, act: int, dim: int, alpha: float) -> torch.Tensor:
    """Runs the kernel; the output has ``main``'s shape, dtype and layout (contiguous/channels_last).

    mode 0: main = x, ref = x.   mode 1: main = a = grad.   mode 2: main = a = gg, g = grad.
    """
    fmt = memory_format(main)
    out = torch.empty_like(main, memory_format=fmt)
    n = main.numel()
    if n == 0:
        return out
    C, inner = geometry(main, dim, fmt, b is not None)
    views = [_memory_order(t, fmt) if t is not None else None for t in (ref, a, g)]
    dummy = _memory_order(out, fmt)
    ref_v, a_v, g_v = (v if v is not None else dummy for v in views)
    b_v = b.contiguous() if b is not None else dummy
    BLOCK = 1024
    grid = (triton.cdiv(n, BLOCK),)
    with torch.cuda.device(main.device) if main.is_cuda else contextlib.nullcontext():
        launch_kernel(bias_act_kernel, grid, dummy, ref_v, a_v, g_v, b_v, n, C, inner, alpha,
                      ACT=act, MODE=mode, HAS_REF=ref is not None, HAS_BIAS=b is not None,
                      F64=acc_dtype(main.dtype) == torch.float64, BLOCK=BLOCK)
    return out


def _reference_args(x, b, y):
    """The reference value of act' (see csrc/bias_act.h): y when given, else x (+ b)."""
    return (y, None) if y is not None else (x, b)


# The launchers of the three ops (their schemas: gradreg_fast/ops/bias_act.py).

def bias_act(x: torch.Tensor, b: torch.Tensor | None, act: int, dim: int, alpha: float) -> torch.Tensor:
    return _launch(0, x, x, None, None, b, act, dim, alpha)


def bias_act_grad(grad: torch.Tensor, x: torch.Tensor | None, b: torch.Tensor | None, y: torch.Tensor | None,
                  act: int, dim: int, alpha: float) -> torch.Tensor:
    ref, bias = _reference_args(x, b, y)
    if ACTIVATIONS[act] == "linear":
        ref, bias = None, None
    return _launch(1, grad, ref, grad, None, bias, act, dim, alpha)


def bias_act_grad2(gg: torch.Tensor, grad: torch.Tensor, x: torch.Tensor | None, b: torch.Tensor | None,
                   y: torch.Tensor | None, act: int, dim: int, alpha: float) -> torch.Tensor:
    if ACTIVATIONS[act] in NO_SECOND:
        return torch.zeros_like(gg, memory_format=memory_format(gg))
    ref, bias = _reference_args(x, b, y)
    return _launch(2, gg, ref, gg, grad, bias, act, dim, alpha)
