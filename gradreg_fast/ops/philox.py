"""The philox op family: random projections and Gaussian tangents from a counter-based generator
(Philox 4x32-10), no stored random tensors. Its kernels: csrc/cpu/philox.cpp, csrc/cuda/philox.cu,
gradreg_fast/triton/philox.py; its reference: gradreg_fast/reference/philox.py.

r ~ N(0, I) is regenerated wherever it is needed from (seed, offset) by Philox 4x32-10 +
Box–Muller — the stream defined in gradreg_fast/reference/philox.py, identical on every backend
(reference, cpp, cuda, triton): element e of stream (seed, offset) is the same float32 number z[e]
everywhere (to the bit, but for ~1 element in 10^8 where the backends' float64 log/cos/sin round
to different sides of a float32 boundary: then 1 ulp).

    project(out, seed, offset)[i] = s_i = Σ_k r_ik · out_ik
        per_sample=False: r_ik = z[k]        (one r shared by the batch: SpectReg's default)
        per_sample=True:  r_ik = z[i·K + k]  (one r per sample)
    ∂s/∂out:  grad_out_ik = grad_s_i · r_ik                        (op project_backward, r regenerated)
    ∂²:       project_backward is linear in grad_s; its derivative is again a projection,
              d grad_s_i = Σ_k gg_ik r_ik = project(gg)_i, and nothing flows to out.

    gaussian_like(x, seed, offset): x-shaped v ~ N(0, I) written on demand (forward-mode
    Hutchinson: E_v ‖J v‖² = ‖J‖_F²); v.flatten()[e] = z[e] (per_sample=True) or the same
    x[0]-shaped tangent for every sample (per_sample=False).

Projected SpectReg (docs/method.md) without materializing r:

    s = project(model(x).reshape(B, -1), seed, offset)            # per_sample=False: the paper
    (g,) = torch.autograd.grad(s.sum(), x, create_graph=True)      # g_i = J_iᵀ r
    penalty = sq_norm(g).mean()

On small CPU inputs backend "auto" runs project as composite ops instead (the registry's
AUTO_CPU_REFERENCE, ``_composite_project``): the same r, drawn once by the gaussian_like kernel and
kept for the backward (at most 2^16 numbers), where the op's Python autograd wrappers would cost more.

Use a fresh (seed, offset) for each draw: e.g. seed = draw_seed(generator) once per step, or one
seed per run and offset = step number (different offsets are independent streams).
"""
from __future__ import annotations

import torch

from gradreg_fast.ops._common import check_floating
from gradreg_fast.ops._registry import Op, declare, implementation
from gradreg_fast.reference import philox as ref
from gradreg_fast.reference.ops import acc_dtype

# -- the family: fake kernels, autograd (the same for every backend), implementations ------------------


def _fake_project(out, seed, offset, per_sample):
    return out.new_empty((out.shape[0],), dtype=acc_dtype(out.dtype))


def _fake_project_backward(grad, seed, offset, per_sample, num_outputs, dtype):
    return grad.new_empty((grad.shape[0], num_outputs), dtype=dtype)


def _fake_gaussian_like(x, seed, offset, per_sample):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_project(ctx, inputs, output):
    out, ctx.seed, ctx.offset, ctx.per_sample = inputs
    ctx.num_outputs, ctx.dtype = out.shape[1], out.dtype


def _setup_project_backward(ctx, inputs, output):
    grad, ctx.seed, ctx.offset, ctx.per_sample, _, _ = inputs
    ctx.grad_dtype = grad.dtype


def _autograd(ops: dict) -> dict:
    project_op, backward_op = ops["project"], ops["project_backward"]

    def project_grad(ctx, grad):
        d_out = backward_op(grad, ctx.seed, ctx.offset, ctx.per_sample, ctx.num_outputs, ctx.dtype)
        return d_out, None, None, None

    def project_backward_grad(ctx, gg):
        d_grad = project_op(gg, ctx.seed, ctx.offset, ctx.per_sample).to(ctx.grad_dtype)
        return d_grad, None, None, None, None, None

    return {"project": (project_grad, _setup_project), "project_backward": (project_backward_grad,
                                                                             _setup_project_backward)}


def _reference_project(out, seed, offset, per_sample):
    return ref.project(out, seed & ((1 << 64) - 1), offset, per_sample=per_sample)


def _reference_gaussian_like(x, seed, offset, per_sample):
    return ref.gaussian_like(x, seed & ((1 << 64) - 1), offset, per_sample=per_sample)


def _composite_project(out, seed, offset, per_sample):
    """``project`` in composite torch ops, what backend="auto" runs on small CPU inputs (the registry's
    AUTO_CPU_REFERENCE): r drawn once by the C++ gaussian_like kernel (the op's own float32 r, to the bit:
    z[k] shared, or z[i·K + k] per sample), then s = Σ_k out_ik · r_ik in the accumulation dtype, as the
    reference. Autograd differentiates it with no Python wrappers around the op's forward and backward
    (which cost more than the kernel saves on such inputs); it saves r (K or B·K numbers) for the backward."""
    acc = acc_dtype(out.dtype)
    template = torch.empty(tuple(out.shape) if per_sample else (out.shape[1],), dtype=torch.float32,
                           device=out.device)
    r = torch.ops.gradreg_fast.gaussian_like(template, seed, offset, True).to(acc)
    return (out.to(acc) * r).sum(dim=1)


_TRITON = "gradreg_fast.triton.philox:"
declare("philox", (
    Op("project(Tensor out, int seed, int offset, bool per_sample) -> Tensor", _fake_project,
       _TRITON + "project", _reference_project, small_cpu=_composite_project),
    Op("project_backward(Tensor grad, int seed, int offset, bool per_sample, int num_outputs, ScalarType dtype) "
       "-> Tensor", _fake_project_backward, _TRITON + "project_backward"),
    Op("gaussian_like(Tensor x, int seed, int offset, bool per_sample) -> Tensor", _fake_gaussian_like,
       _TRITON + "gaussian_like", _reference_gaussian_like),
), _autograd)


def _check_per_sample(per_sample, op: str) -> None:
    if not isinstance(per_sample, bool):
        raise TypeError(f"{op}: per_sample must be a bool, got {type(per_sample).__name__}")


def project(out: torch.Tensor, seed: int, offset: int, *, per_sample: bool = False,
            backend: str | None = None) -> torch.Tensor:
    """Random projection of each sample's outputs: ``s_i = Σ_k r_ik · out_ik``, r ~ N(0, I_K).

    r is generated inside the kernel from (seed, offset) (gradreg_fast.reference.philox) and
    regenerated by the backward instead of being saved: ``grad_out_ik = grad_s_i · r_ik``.
    Differentiable twice (the backward is an op whose derivative is again a projection).

    Args:
        out: floating tensor of shape (B, K) (flatten other shapes with ``out.reshape(B, -1)``).
        seed: integer in [0, 2^64) (e.g. ``draw_seed()``); offset: integer in [0, 2^63).
        per_sample: False (default) shares one r by the whole batch, r_ik = z[k] (the paper's
            SpectReg); True draws one r per sample, r_ik = z[i·K + k].
        backend: "reference", "cpp", "cuda", "triton" or "auto" (default: GRADREG_BACKEND or auto;
            auto on a small CPU input runs out · r as composite ops, r from the gaussian_like kernel,
            see docs/backends.md).

    Returns:
        (B,) tensor: float32 for fp16/bf16/fp32 ``out`` (float32 math), float64 for fp64.
    """
    check_floating(out, "project", "out", ndim=2, layout="(B, K)",
                   fix="flatten the per-sample outputs with out.reshape(out.shape[0], -1)")
    ref.check_seed_offset(seed, offset, "project")
    _check_per_sample(per_sample, "project")
    return implementation("project", backend, out.device, out.numel())(out, ref.seed_to_int64(seed), offset,
                                                                      per_sample)


def gaussian_like(x: torch.Tensor, seed: int, offset: int, *, per_sample: bool = True,
                  backend: str | None = None) -> torch.Tensor:
    """Standard normal tensor shaped like x (contiguous, x's dtype and device), from (seed, offset).

    ``v.flatten()[e] = z[e]`` of the stream (per_sample=True: independent tangents per sample), or
    ``v[i] = v[0]`` for all i with ``v[0].flatten()[j] = z[j]`` (per_sample=False: one tangent
    shared by the batch). Values are float32 numbers of the stream converted to x's dtype (exact
    for float64, rounded for float16/bfloat16). x is a template only: its values are not read
    and the result carries no gradient.

    Args:
        x: floating tensor (B, ...) (any shape when per_sample=True).
        seed: integer in [0, 2^64); offset: integer in [0, 2^63).
        per_sample: True (default) for independent tangents per sample, False for one shared.
        backend: "reference", "cpp", "cuda", "triton" or "auto".
    """
    check_floating(x, "gaussian_like", "x")
    ref.check_seed_offset(seed, offset, "gaussian_like")
    _check_per_sample(per_sample, "gaussian_like")
    if not per_sample and x.dim() < 1:
        raise ValueError("gaussian_like: per_sample=False needs a batch dimension, x of shape (B, ...); "
                         "got a 0-d tensor")
    return implementation("gaussian_like", backend, x.device)(x.detach(), ref.seed_to_int64(seed), offset,
                                                             per_sample)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed in [0, 2^63) from ``generator`` (default: torch's global CPU generator)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 63 - 1, (1,), generator=generator, device=device).item())
