"""Per-sample squared L2 norm, the reduction every gradient penalty ends with.

    sq_norm(x)[b] = Σ_j x[b, j]²          (all non-batch dims; fp32 accumulation, fp64 for fp64)
    ∂/∂x:  grad_x[b, j] = 2 · grad[b] · x[b, j]                    (op sq_norm_backward)
    ∂²:    d grad[b] = 2 Σ_j gg[b, j] x[b, j],  d x[b, j] = 2 grad[b] gg[b, j]

The backward is an op of its own whose backward is again differentiable, so penalties built on
sq_norm can be differentiated twice (the parameter gradient of a gradient penalty needs that).
"""
from __future__ import annotations

import torch

from gradreg_fast import reference
from gradreg_fast._backend import resolve_backend
from gradreg_fast.ops._common import check_floating_batched, extension_op

_BATCH_VIEW = lambda t, like: t.reshape((-1,) + (1,) * (like.dim() - 1))  # noqa: E731


def _fake_sq_norm(x):
    return x.new_empty((x.shape[0],), dtype=reference.acc_dtype(x.dtype))


def _fake_sq_norm_backward(grad, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_sq_norm(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _setup_sq_norm_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def register(forward: str, backward: str, backward_fn) -> None:
    """Fake kernels and autograd for one backend's (sq_norm, sq_norm_backward) pair of ops.

    ``backward_fn(grad, x)`` computes sq_norm_backward for that backend.
    """
    torch.library.register_fake(forward)(_fake_sq_norm)
    torch.library.register_fake(backward)(_fake_sq_norm_backward)

    def sq_norm_grad(ctx, grad):
        (x,) = ctx.saved_tensors
        return backward_fn(grad, x)

    def sq_norm_backward_grad(ctx, gg):
        grad, x = ctx.saved_tensors
        acc = reference.acc_dtype(x.dtype)
        d_grad = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad = (2 * (gg.to(acc) * x.to(acc)).reshape(x.shape[0], -1).sum(1)).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            d_x = (2 * _BATCH_VIEW(grad.to(acc), x) * gg.to(acc)).to(x.dtype)
        return d_grad, d_x

    torch.library.register_autograd(forward, sq_norm_grad, setup_context=_setup_sq_norm)
    torch.library.register_autograd(backward, sq_norm_backward_grad, setup_context=_setup_sq_norm_backward)


_ext_fwd = extension_op("sq_norm")
if _ext_fwd is not None:
    register("gradreg_fast::sq_norm", "gradreg_fast::sq_norm_backward",
             extension_op("sq_norm_backward"))

IMPLEMENTATIONS = {"reference": reference.sq_norm, "cpp": _ext_fwd, "cuda": _ext_fwd}


def sq_norm(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-sample squared L2 norm: ``out[b] = Σ_j x[b, j]²`` over all non-batch dims.

    Args:
        x: floating tensor of shape (B, ...), any strides (made contiguous by the kernels).
        backend: "reference", "cpp", "cuda", "triton" or "auto" (default: GRADREG_BACKEND or auto).

    Returns:
        Tensor of shape (B,), float32 for fp16/bf16/fp32 inputs (fp32 accumulation, no fp16
        overflow), float64 for fp64 inputs. Differentiable twice.
    """
    check_floating_batched(x, "sq_norm")
    name = resolve_backend(backend, x.device)
    impl = IMPLEMENTATIONS.get(name)
    if impl is None:
        raise RuntimeError(f"sq_norm: backend {name!r} has no implementation of this op yet")
    return impl(x)


# --- Triton pair (the kernels are imported only when the ops run) -----------------------------------
@torch.library.custom_op("gradreg_fast::sq_norm_triton", mutates_args=())
def _sq_norm_triton(x: torch.Tensor) -> torch.Tensor:
    from gradreg_fast.triton.sq_norm import sq_norm as launch
    return launch(x)


@torch.library.custom_op("gradreg_fast::sq_norm_backward_triton", mutates_args=())
def _sq_norm_backward_triton(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from gradreg_fast.triton.sq_norm import sq_norm_backward as launch
    return launch(grad, x)


register("gradreg_fast::sq_norm_triton", "gradreg_fast::sq_norm_backward_triton", _sq_norm_backward_triton)
IMPLEMENTATIONS["triton"] = _sq_norm_triton
