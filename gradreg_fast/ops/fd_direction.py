"""Finite-difference direction: the perturbed input of the fd estimator, in one op.

    n_b = ‖g_b‖,   out_b = x_b + h · g_b / n_b     (out_b = x_b where n_b = 0: no NaN)

Kernels: per row a reduction over g, then one elementwise pass reading x and g and writing out
(the row of g is re-read from cache); see the backend files for the split used on GPUs.

Autograd (composite PyTorch, differentiable again), with d_b = g_b / n_b and cotangents
(G_out, G_n):   ∂/∂x = G_out,   ∂/∂g_b = (h / n_b)(G_out,b − d_b ⟨d_b, G_out,b⟩) + G_n,b d_b,
and 0 for g_b where n_b = 0 (the map is discontinuous there; 0 is the value used, like a
subgradient). h is a Python float and not differentiated.
"""
from __future__ import annotations

import math

import torch

from gradreg_fast import reference
from gradreg_fast.ops._common import check_floating, check_like
from gradreg_fast.ops._registry import Op, declare, implementation


def _fake(x, g, h):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((x.shape[0],), dtype=reference.acc_dtype(x.dtype)))


def _setup(ctx, inputs, output):
    x, g, h = inputs
    ctx.h = h
    ctx.save_for_backward(g)


def fd_direction_grad(ctx, grad_out, grad_n):
    (g,) = ctx.saved_tensors
    acc = reference.acc_dtype(g.dtype)
    grad_x = grad_out if ctx.needs_input_grad[0] else None
    grad_g = None
    if ctx.needs_input_grad[1]:
        rows = g.reshape(g.shape[0], math.prod(g.shape[1:])).to(acc)
        n = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        pos = n > 0
        safe = torch.where(pos, n, torch.ones_like(n))
        d = rows / safe
        go = grad_out.reshape(rows.shape).to(acc) if grad_out is not None else torch.zeros_like(rows)
        gn = grad_n.to(acc).unsqueeze(1) if grad_n is not None else torch.zeros_like(n)
        grad = (ctx.h / safe) * (go - d * (d * go).sum(1, keepdim=True)) + gn * d
        grad_g = torch.where(pos, grad, torch.zeros_like(grad)).to(g.dtype).reshape(g.shape)
    return grad_x, grad_g, None


def _autograd(ops: dict) -> dict:
    return {"fd_direction": (fd_direction_grad, _setup)}


declare("fd_direction", (
    Op("fd_direction(Tensor x, Tensor g, float h) -> (Tensor, Tensor)", _fake,
       "gradreg_fast.triton.fd_direction:fd_direction", reference.fd_direction),
), _autograd)


def fd_direction(x: torch.Tensor, g: torch.Tensor, h: float, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturbed input and per-sample norms: ``(x + h · g / ‖g‖, ‖g‖)`` per sample.

    Args:
        x: floating (B, ...) input, any strides.
        g: the direction, same shape and dtype as x (per sample, normalized by the op).
        h: finite step (a Python number; negative for a backward step).
        backend: "reference", "cpp", "cuda", "triton" or "auto" (default: GRADREG_BACKEND or auto).

    Returns:
        ``x_perturbed`` with x's shape and dtype (contiguous) and ``norms`` (B,) in float32
        (float64 for float64 inputs). Where ‖g_b‖ = 0 the sample is left unperturbed.
    """
    check_floating(x, "fd_direction", "x", batched=True)
    check_floating(g, "fd_direction", "g", batched=True)
    check_like(g, x, "fd_direction", "g", "x")
    if isinstance(h, torch.Tensor) or not isinstance(h, (int, float)) or isinstance(h, bool):
        raise TypeError(f"fd_direction: h must be a Python float, got {type(h).__name__}; use float(h)")
    if not math.isfinite(h):
        raise ValueError(f"fd_direction: h must be finite, got {h}")
    return implementation("fd_direction", backend, x.device)(x, g, float(h))
