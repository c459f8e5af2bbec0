"""Per-sample squared L2 norm, the reduction every gradient penalty ends with.

    sq_norm(x)[b] = Σ_j x[b, j]²          (all non-batch dims; accumulated in reference.acc_dtype)
    ∂/∂x:  grad_x[b, j] = 2 · grad[b] · x[b, j]                    (op sq_norm_backward)
    ∂²:    d grad[b] = 2 Σ_j gg[b, j] x[b, j],  d x[b, j] = 2 grad[b] gg[b, j]

The backward is an op of its own whose backward is again differentiable, so penalties built on
sq_norm can be differentiated twice (the parameter gradient of a gradient penalty needs that).
"""
from __future__ import annotations

import torch

from gradreg_fast import reference
from gradreg_fast.ops._common import check_floating
from gradreg_fast.ops._registry import Op, declare, implementation


def _batch_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def _fake_sq_norm(x):
    return x.new_empty((x.shape[0],), dtype=reference.acc_dtype(x.dtype))


def _fake_sq_norm_backward(grad, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_sq_norm(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _setup_sq_norm_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sq_norm_backward_grad(ctx, gg):
    grad, x = ctx.saved_tensors
    acc = reference.acc_dtype(x.dtype)
    d_grad = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad = (2 * (gg.to(acc) * x.to(acc)).reshape(x.shape[0], -1).sum(1)).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        d_x = (2 * _batch_view(grad.to(acc), x) * gg.to(acc)).to(x.dtype)
    return d_grad, d_x


def _autograd(ops: dict) -> dict:
    backward_op = ops["sq_norm_backward"]

    def sq_norm_grad(ctx, grad):
        (x,) = ctx.saved_tensors
        return backward_op(grad, x)

    return {"sq_norm": (sq_norm_grad, _setup_sq_norm),
            "sq_norm_backward": (_sq_norm_backward_grad, _setup_sq_norm_backward)}


declare("sq_norm", (
    Op("sq_norm(Tensor x) -> Tensor", _fake_sq_norm, "gradreg_fast.triton.sq_norm:sq_norm", reference.sq_norm),
    Op("sq_norm_backward(Tensor grad, Tensor x) -> Tensor", _fake_sq_norm_backward,
       "gradreg_fast.triton.sq_norm:sq_norm_backward", reference.sq_norm_backward),
), _autograd)


def sq_norm(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-sample squared L2 norm: ``out[b] = Σ_j x[b, j]²`` over all non-batch dims.

    Args:
        x: floating tensor of shape (B, ...), any strides (made contiguous by the kernels).
        backend: "reference", "cpp", "cuda", "triton" or "auto" (default: GRADREG_BACKEND or auto;
            auto runs the reference on small CPU inputs, see docs/backends.md).

    Returns:
        Tensor of shape (B,), float32 for fp16/bf16/fp32 inputs (fp32 accumulation, no fp16
        overflow), float64 for fp64 inputs. Differentiable twice.
    """
    check_floating(x, "sq_norm", batched=True)
    return implementation("sq_norm", backend, x.device, x.numel())(x)
