"""Fused bias + activation with first and second derivatives (after stylegan2-ada's bias_act).

    y = act(z),  z = x + b   (b of shape (x.shape[dim],) broadcast along ``dim``, or no bias)

Three ops per backend, each the derivative of the one before, so gradient penalties (which
differentiate the input gradient once more) run through fused kernels:

    bias_act(x, b)                      -> y
    bias_act_grad(grad, x, b, y)        -> grad_z = grad · act'(z)          (grad_x = grad_z,
                                                                             grad_b = Σ_{≠dim} grad_z)
    bias_act_grad2(gg, grad, x, b, y)   -> gg · grad · ∂act'/∂r             (the second-order term)

Only what the derivative needs is saved: the output y for linear, relu, leaky_relu (alpha ≥ 0),
tanh and sigmoid (act' is a function of y: 1, [y > 0], [y > 0] + alpha·[y ≤ 0], 1 − y², y(1 − y)),
x (and b) for softplus, gelu, gelu_tanh, silu, elu, whose derivatives are recomputed from z.
"r" above is that reference value. relu, leaky_relu and linear have act'' = 0: their grad2 is
never launched. The derivative of grad2 (third order) is a composite of PyTorch ops.

The autograd formulas are written once (``_autograd``) and the op registry (ops/_registry.py)
attaches them to every backend's triple of ops: the C++/CUDA extension ops and the Triton ops. The
activations and what each saves are the rows of gradreg_fast/_bias_act_spec.py.
"""
from __future__ import annotations

import math
import numbers

import torch

from gradreg_fast import reference
from gradreg_fast._bias_act_spec import (
    ACT_CODE,
    ACTIVATIONS,
    DEFAULT_ALPHA,
    NO_SECOND,
    SPEC,
    from_output,
    memory_format,
    takes_alpha,
)
from gradreg_fast.ops._common import check_floating, check_like
from gradreg_fast.ops._registry import Op, declare, implementation

SOFTPLUS_THRESHOLD = 20.0


# ---------------------------------------------------------------------------------------------
# Autograd formulas, shared by all backends.

def _bias_grad(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Σ of t over every dimension but ``dim`` (fp32 accumulation for half types)."""
    dims = [d for d in range(t.dim()) if d != dim]
    acc = reference.acc_dtype(t.dtype)
    return t.sum(dim=dims, dtype=acc).to(dtype) if dims else t.to(dtype)


def third_derivative(r: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    """∂²act'/∂r² as PyTorch ops (twice differentiable, in r's dtype); r is y or z as in grad2."""
    if act in NO_SECOND:
        return torch.zeros_like(r)
    if act in ("tanh", "sigmoid"):
        return torch.full_like(r, -2.0)
    if act == "softplus":
        s = torch.sigmoid(r)
        return torch.where(r > SOFTPLUS_THRESHOLD, 0.0, s * (1 - s) * (1 - 2 * s))
    if act == "gelu":
        pdf = torch.exp(-0.5 * r * r) / math.sqrt(2 * math.pi)
        return pdf * r * (r * r - 4)
    if act == "gelu_tanh":
        k, c = math.sqrt(2 / math.pi), 0.044715
        u = k * (r + c * r ** 3)
        t = torch.tanh(u)
        e = torch.exp(-2 * u.abs())
        q = 4 * e / (1 + e) ** 2  # 1 - t², without cancellation
        du, ddu, dddu = k * (1 + 3 * c * r * r), 6 * k * c * r, 6 * k * c
        A = du + 0.5 * r * (ddu - 2 * t * du * du)
        dA = 1.5 * ddu - t * du * du + 0.5 * r * (dddu - 2 * q * du ** 3 - 4 * t * du * ddu)
        return q * (dA - 2 * t * du * A)
    if act == "silu":
        s = torch.sigmoid(r)
        return s * (1 - s) * ((1 - 2 * s) * (3 + r * (1 - 2 * s)) - 2 * r * s * (1 - s))
    return torch.where(r > 0, 0.0, alpha * torch.exp(torch.clamp(r, max=0.0)))  # elu


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=memory_format(t))


def _fake_bias_act(x, b, act, dim, alpha):
    return _fake_like(x)


def _fake_grad(grad, x, b, y, act, dim, alpha):
    return _fake_like(grad)


def _fake_grad2(gg, grad, x, b, y, act, dim, alpha):
    return _fake_like(gg)


def _autograd(ops: dict) -> dict:
    """Autograd of one backend's (bias_act, bias_act_grad, bias_act_grad2) ops."""
    grad_op, grad2_op = ops["bias_act_grad"], ops["bias_act_grad2"]

    def setup_fwd(ctx, inputs, output):
        x, b, act, dim, alpha = inputs
        # relu's (leaky_relu's, linear's) grad op has a zero derivative with respect to y: its
        # backward returns None there, and instead of the engine's zero-filled y-shaped cotangent,
        # a grad_op pass and a bias reduction, backward_fwd writes zeros once (as PyTorch's own relu)
        ctx.set_materialize_grads(False)
        ctx.x_meta = (x.shape, x.dtype, x.device, memory_format(x))
        ctx.args = (act, dim, alpha)
        ctx.bias_dtype = b.dtype if b is not None else None
        if SPEC[ACTIVATIONS[act]].saves == "nothing":  # act' = 1 (linear): nothing to save
            ctx.save_for_backward(None, None, None)
        elif from_output(ACTIVATIONS[act], alpha):
            ctx.save_for_backward(None, None, output)
        else:
            ctx.save_for_backward(x, b, None)

    def backward_fwd(ctx, grad):
        if grad is None:
            shape, dtype, device, fmt = ctx.x_meta
            need = ctx.needs_input_grad
            zx = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).zero_() if need[0] else None
            zb = torch.zeros(shape[ctx.args[1]], dtype=ctx.bias_dtype, device=device) \
                if ctx.bias_dtype is not None and need[1] else None
            return zx, zb, None, None, None
        x, b, y = ctx.saved_tensors
        act, dim, alpha = ctx.args
        # linear: act' = 1, grad_z IS grad (no copy; its derivative with respect to grad is the identity)
        grad_z = grad if ACTIVATIONS[act] == "linear" else grad_op(grad, x, b, y, act, dim, alpha)
        grad_x = grad_z if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            grad_b = _bias_grad(grad_z, dim, ctx.bias_dtype)
        return grad_x, grad_b, None, None, None

    def setup_grad(ctx, inputs, output):
        grad, x, b, y, act, dim, alpha = inputs
        ctx.args = (act, dim, alpha)
        ctx.save_for_backward(grad, x, b, y)

    def backward_grad(ctx, gg):
        grad, x, b, y = ctx.saved_tensors
        act, dim, alpha = ctx.args
        need = ctx.needs_input_grad
        d_grad = grad_op(gg, x, b, y, act, dim, alpha) if need[0] else None
        d_x = d_b = d_y = None
        if ACTIVATIONS[act] not in NO_SECOND and any(need[1:4]):
            term = grad2_op(gg, grad, x, b, y, act, dim, alpha)
            if y is not None:
                d_y = term
            else:
                d_x = term if need[1] else None
                d_b = _bias_grad(term, dim, b.dtype) if b is not None and need[2] else None
        return d_grad, d_x, d_b, d_y, None, None, None

    def setup_grad2(ctx, inputs, output):
        gg, grad, x, b, y, act, dim, alpha = inputs
        ctx.args = (act, dim, alpha)
        ctx.save_for_backward(gg, grad, x, b, y)

    def backward_grad2(ctx, g3):
        gg, grad, x, b, y = ctx.saved_tensors
        act, dim, alpha = ctx.args
        need = ctx.needs_input_grad
        d_gg = grad2_op(g3, grad, x, b, y, act, dim, alpha) if need[0] else None
        d_grad = grad2_op(g3, gg, x, b, y, act, dim, alpha) if need[1] else None
        d_x = d_b = d_y = None
        if any(need[2:5]):
            acc = reference.acc_dtype(g3.dtype)
            if y is not None:
                r = y.to(acc)
            else:
                r = x.to(acc)
                if b is not None:
                    shape = [1] * x.dim()
                    shape[dim] = -1
                    r = r + b.to(acc).reshape(shape)
            term = (g3.to(acc) * gg.to(acc) * grad.to(acc) * third_derivative(r, ACTIVATIONS[act], alpha)
                    ).to(g3.dtype)
            if y is not None:
                d_y = term
            else:
                d_x = term if need[2] else None
                d_b = _bias_grad(term, dim, b.dtype) if b is not None and need[3] else None
        return d_gg, d_grad, d_x, d_b, d_y, None, None, None

    return {"bias_act": (backward_fwd, setup_fwd), "bias_act_grad": (backward_grad, setup_grad),
            "bias_act_grad2": (backward_grad2, setup_grad2)}


def _reference_bias_act(x, b, act, dim, alpha):
    return reference.bias_act(x, b, ACTIVATIONS[act], dim, alpha)


_TRITON = "gradreg_fast.triton.bias_act:"
declare("bias_act", (
    Op("bias_act(Tensor x, Tensor? b, int act, int dim, float alpha) -> Tensor", _fake_bias_act,
       _TRITON + "bias_act", _reference_bias_act),
    Op("bias_act_grad(Tensor grad, Tensor? x, Tensor? b, Tensor? y, int act, int dim, float alpha) -> Tensor",
       _fake_grad, _TRITON + "bias_act_grad"),
    Op("bias_act_grad2(Tensor gg, Tensor grad, Tensor? x, Tensor? b, Tensor? y, int act, int dim, float alpha) "
       "-> Tensor", _fake_grad2, _TRITON + "bias_act_grad2"),
), _autograd)


# ---------------------------------------------------------------------------------------------
# Public entry point.

def check_activation(act: str, alpha: float | None) -> float:
    """Validates the activation name and returns the alpha to use (its default when None)."""
    if not isinstance(act, str) or act not in ACT_CODE:
        raise ValueError(f"bias_act: unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    if alpha is None:
        return float(DEFAULT_ALPHA.get(act, 0.0))
    if not takes_alpha(act):
        raise ValueError(f"bias_act: alpha applies to {' and '.join(DEFAULT_ALPHA)} only, not {act!r}; "
                         "drop alpha=")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise TypeError(f"bias_act: alpha must be a finite real number, got {alpha!r}")
    return float(alpha)


def _check_inputs(x, b, dim) -> int:
    check_floating(x, "bias_act", "x")
    if b is None:
        return dim
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"bias_act: b must be a torch.Tensor or None, got {type(b).__name__}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"bias_act: dim must be an int in [{-x.dim()}, {x.dim() - 1}] for x of shape "
                         f"{tuple(x.shape)}, got {dim!r}")
    dim = dim % x.dim()
    if b.dim() != 1 or b.shape[0] != x.shape[dim]:
        raise ValueError(f"bias_act: b must have shape ({x.shape[dim]},) = (x.shape[dim],) for x of shape "
                         f"{tuple(x.shape)} and dim={dim}, got {tuple(b.shape)}")
    check_like(b, x, "bias_act", "b", "x", shape=False)
    return dim


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, act: str = "relu", dim: int = 1,
             alpha: float | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Fused ``act(x + b)``, differentiable twice (and more) through fused kernels.

    Args:
        x: floating tensor of any shape and strides (contiguous and channels_last are kept, other
            layouts are copied to contiguous; the result has the layout the kernel used).
        b: bias of shape (x.shape[dim],) in x's dtype and device, or None.
        act: one of ``ACTIVATIONS``: linear, relu, leaky_relu, tanh, sigmoid, softplus (beta 1,
            threshold 20 as torch.nn.Softplus), gelu (erf form), gelu_tanh, silu, elu.
        dim: the dimension b runs along (1: channels of (N, C, ...); -1: features of a Linear output).
        alpha: negative slope of leaky_relu (default 0.01), alpha of elu (default 1.0).
        backend: "reference", "cpp", "cuda", "triton" or "auto" (default: GRADREG_BACKEND or auto).

    Computation in fp32 for fp16/bf16/fp32 (fp64 for fp64), stored in x's dtype.
    """
    alpha = check_activation(act, alpha)
    dim = _check_inputs(x, b, dim)
    return implementation("bias_act", backend, x.device)(x, b, ACT_CODE[act], dim, alpha)
