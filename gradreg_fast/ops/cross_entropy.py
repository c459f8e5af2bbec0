"""Softmax cross-entropy per sample, differentiable twice through fused kernels.

    ℓ_b = lse_b − z_{b, y_b},  lse_b = log Σ_k exp z_{b,k}             (op cross_entropy → (ℓ, lse))
    ∂ℓ/∂z:   grad_z[b] = grad[b] · (p_b − onehot(y_b)),  p_b = exp(z_b − lse_b)
                                                                       (op cross_entropy_backward)
    ∂²:  for a cotangent u of grad_z,
         d grad[b] = ⟨p_b − onehot(y_b), u_b⟩,  d z_b = grad[b] · (diag(p_b) − p_b p_bᵀ) u_b
                                                      (both from ONE pass: op cross_entropy_hvp)
    ∂³:  the backward of cross_entropy_hvp is composite PyTorch (below), itself differentiable.

Only lse (one number per sample, float64 for every dtype so that exp(z − lse) keeps fp32 accuracy
when |lse| is large) is saved by the forward; p is recomputed from (z, lse). Gradients
are never written into the logits. lse is a non-differentiable output of the forward op: the
derivative through it is already part of the softmax Jacobian diag(p) − ppᵀ used by the backward.
"""
from __future__ import annotations

import torch

from gradreg_fast import reference
from gradreg_fast.ops._common import check_floating, check_like, index_extremes
from gradreg_fast.ops._registry import Op, declare, implementation

_acc = reference.acc_dtype


def _fake_forward(logits, y):
    b = logits.shape[0]
    acc = _acc(logits.dtype)
    return logits.new_empty((b,), dtype=acc), logits.new_empty((b,), dtype=torch.float64)


def _fake_backward(grad, logits, y, lse):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_hvp(u, scale, logits, y, lse):
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            logits.new_empty((logits.shape[0],), dtype=_acc(logits.dtype)))


def _setup_forward(ctx, inputs, output):
    logits, y = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, y, output[1])


def _setup_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _setup_hvp(ctx, inputs, output):
    u, scale, logits, y, _lse = inputs
    ctx.save_for_backward(u, scale, logits, y)


def hvp_backward_composite(u, scale, logits, y, grad_hvp, grad_dot):
    """Backward of cross_entropy_hvp in plain PyTorch (third order of the loss; differentiable again).

    With p = softmax(z), s = ⟨p, u⟩, outputs h = c (p ⊙ u − p s) and dot = s − u_y, cotangents
    (G, G_d):  d u = c (p ⊙ G − p ⟨p, G⟩) + G_d (p − onehot(y)),   d c = ⟨G, p ⊙ u − p s⟩,
               d z = p ⊙ a − p ⟨p, a⟩ with a = c (G ⊙ u − u ⟨p, G⟩ − G s) + G_d u.
    """
    acc = _acc(logits.dtype)
    p = torch.softmax(logits.to(acc), dim=1)
    uu = u.to(acc)
    c = scale.to(acc).unsqueeze(1)
    G = grad_hvp.to(acc) if grad_hvp is not None else torch.zeros_like(p)
    Gd = grad_dot.to(acc).unsqueeze(1) if grad_dot is not None else torch.zeros_like(c)
    s = (p * uu).sum(1, keepdim=True)
    pG = (p * G).sum(1, keepdim=True)
    onehot = torch.zeros_like(p).scatter_(1, y.reshape(-1, 1), 1.0)
    d_u = c * (p * G - p * pG) + Gd * (p - onehot)
    d_c = (G * (p * uu - p * s)).sum(1)
    a = c * (G * uu - uu * pG - G * s) + Gd * uu
    d_z = p * a - p * (p * a).sum(1, keepdim=True)
    return d_u.to(u.dtype), d_c.to(scale.dtype), d_z.to(logits.dtype)


def _autograd(ops: dict) -> dict:
    backward_op, hvp_op = ops["cross_entropy_backward"], ops["cross_entropy_hvp"]

    def forward_grad(ctx, grad_loss, _grad_lse):
        logits, y, lse = ctx.saved_tensors
        return backward_op(grad_loss, logits, y, lse), None

    def backward_grad(ctx, gg):
        grad, logits, y, lse = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None
        d_z, dot = hvp_op(gg.to(logits.dtype), grad, logits, y, lse)
        return (dot.to(grad.dtype) if ctx.needs_input_grad[0] else None,
                d_z if ctx.needs_input_grad[1] else None, None, None)

    def hvp_grad(ctx, grad_hvp, grad_dot):
        u, scale, logits, y = ctx.saved_tensors
        d_u, d_c, d_z = hvp_backward_composite(u, scale, logits, y, grad_hvp, grad_dot)
        need = ctx.needs_input_grad
        return (d_u if need[0] else None, d_c if need[1] else None, d_z if need[2] else None, None, None)

    return {"cross_entropy": (forward_grad, _setup_forward), "cross_entropy_backward": (backward_grad, _setup_backward),
            "cross_entropy_hvp": (hvp_grad, _setup_hvp)}


def _reference_forward(logits, y):
    return reference.cross_entropy(logits, y), None


_TRITON = "gradreg_fast.triton.cross_entropy:"
declare("cross_entropy", (
    Op("cross_entropy(Tensor logits, Tensor y) -> (Tensor, Tensor)", _fake_forward,
       _TRITON + "cross_entropy_forward", _reference_forward),
    Op("cross_entropy_backward(Tensor grad, Tensor logits, Tensor y, Tensor lse) -> Tensor", _fake_backward,
       _TRITON + "cross_entropy_backward"),
    Op("cross_entropy_hvp(Tensor u, Tensor scale, Tensor logits, Tensor y, Tensor lse) -> (Tensor, Tensor)",
       _fake_hvp, _TRITON + "cross_entropy_hvp"),
), _autograd)


def check_cross_entropy_inputs(logits: torch.Tensor, y: torch.Tensor) -> None:
    """TypeError/ValueError naming the problem for bad logits/labels (every backend)."""
    check_floating(logits, "cross_entropy", "logits", ndim=2, layout="(B, K)",
                   fix="flatten extra dims with logits.reshape(-1, K)")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"cross_entropy: y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype != torch.long:
        raise TypeError(f"cross_entropy: y must be an int64 tensor of class indices, got {y.dtype}; "
                        "use y.long() (class probabilities are not supported)")
    if y.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy: y must have shape (B,) = ({logits.shape[0]},), got {tuple(y.shape)}")
    check_like(y, logits, "cross_entropy", "y", "logits", shape=False, dtype=False)
    K = logits.shape[1]
    if logits.shape[0] > 0 and K == 0:
        raise ValueError("cross_entropy: logits need at least one class (K = 0)")
    if y.numel() == 0 or torch.compiler.is_compiling():
        return
    if y.device.type == "cpu":
        lo, hi = index_extremes(y)
        if lo < 0 or hi >= K:
            raise ValueError(f"cross_entropy: y must hold class indices in [0, {K}), got values in [{lo}, {hi}]")
    else:  # no host synchronization: the assertion fires on the device
        torch._assert_async(((y >= 0) & (y < K)).all(), f"cross_entropy: y must hold class indices in [0, {K})")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-sample softmax cross-entropy ``ℓ_b = logsumexp(z_b) − z_{b, y_b}`` (numerically stable).

    Equals ``F.cross_entropy(logits, y, reduction="none")`` and is differentiable twice through
    fused kernels (gradient p − onehot(y), Hessian-vector product (diag(p) − ppᵀ)u), so gradient
    penalties of the loss (DoubleBack) avoid the composite double backward.

    Args:
        logits: (B, K) float16/bfloat16/float32/float64, any strides (math in fp32, fp64 for fp64).
        y: (B,) int64 class indices in [0, K).
        backend: "reference", "cpp", "cuda", "triton" or "auto" (default: GRADREG_BACKEND or auto;
            auto runs the reference on small CPU inputs, see docs/backends.md).

    Returns:
        (B,) losses in float32 (float64 for float64 logits). Gradients w.r.t. logits have the
        logits' dtype.
    """
    check_cross_entropy_inputs(logits, y)
    return implementation("cross_entropy", backend, logits.device, logits.numel())(logits, y)[0]
