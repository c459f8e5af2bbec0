"""Penalties and their parameter gradients by plain double backpropagation, written with torch alone.

Nothing here calls gradreg_fast's estimators, ops or kernels: cross-entropy is F.cross_entropy, norms
are ``pow(2).sum``, and every input gradient is one ``torch.autograd.grad(..., create_graph=True)``
per output in a Python loop (no batching, no fused ops). Attention runs on the math kernel of
``torch.nn.attention.sdpa_kernel`` (twice differentiable) and a model with a once-differentiable op
is replaced by its twice-differentiable twin (same parameters and outputs). jvp's random tangents are
reproduced from the pure-torch definition of the library's random stream (gradreg_fast.reference.philox).

With f = model, u the per-sample target of the kind and R the cotangents (see gradreg_fast.penalty):

    G_j = ∂(Σ_b R[j, b] · u_b)/∂x     (x-shaped; row b is sample b's input gradient when samples
                                      do not interact, the batch statistic's otherwise)
    per-sample penalty_b = scale · Σ_j ‖G_j[b]‖²,     value = mean_b penalty_b

GAN kinds: "r1" is ‖∇ₓD(x_b)‖² (the single scalar Σ_b D(x_b)); "wgan_gp" is (‖∇ₓD(x̂_b)‖ − c)² at
x̂ = fake + ε (x − fake) for the given ε, with the norm taken as ``pow(2).sum().sqrt()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradreg_fast.penalties.core import math_attention  # torch's own kernel choice, no library op
from gradreg_fast.reference import philox  # the random stream's pure-torch definition
from gradreg_fast.testing.case import Case


@dataclass
class Truth:
    per_sample: torch.Tensor         # (B,)
    value: torch.Tensor              # scalar
    grads: list[torch.Tensor]        # one per case.params entry


def repeated_batch(t: torch.Tensor, repeat: int) -> torch.Tensor:
    """t with its batch repeated ``repeat`` times along dim 0 (the copies keep t's graph)."""
    return t if repeat == 1 else t.repeat((repeat,) + (1,) * (t.dim() - 1))


def repeated_kwargs(kwargs: dict, batch: int, repeat: int) -> dict:
    """Model keyword arguments for the batch repeated ``repeat`` times: per-sample tensors (first
    dimension = ``batch``) repeated along dim 0, the rest as they are."""
    return {k: repeated_batch(v, repeat) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch
            else v for k, v in kwargs.items()}


def targets(kind: str, out: torch.Tensor, y: torch.Tensor, projection: torch.Tensor | None = None,
            classes: torch.Tensor | None = None) -> tuple[list[torch.Tensor], float]:
    """The scalars Σ_b R[j, b] · u_b, one per j, and the scale."""
    if kind == "doubleback":
        return [F.cross_entropy(out, y, reduction="sum")], 1.0
    if kind == "spectreg":
        r = projection                      # (n, B, K)
        return [(r[j] * out).sum() for j in range(r.shape[0])], 1.0 / r.shape[0]
    if kind == "frobreg":
        return [out[:, k].sum() for k in range(out.shape[1])], 1.0
    if kind == "jacreg":
        p = torch.softmax(out, dim=1)
        return [p[:, k].sum() for k in range(out.shape[1])], 1.0
    if kind == "onehot":
        return [out.gather(1, y.reshape(-1, 1)).sum()], 1.0
    if kind == "random_onehot":
        return [out.gather(1, classes.reshape(-1, 1)).sum()], 1.0
    if kind in ("r1", "wgan_gp"):
        return [out.sum()], 1.0
    raise ValueError(f"no ground truth for kind {kind!r}")


def jvp_tangents(x: torch.Tensor, generator: torch.Generator, n_proj: int) -> list[torch.Tensor]:
    """The n_proj tangents v_j that method='jvp' draws from ``generator`` for input x, reproduced as its
    documented contract says (gradreg_fast.penalties.estimators.jvp): draw j takes the seed
    s_j = torch.randint(0, 2^63 - 1, (1,), generator=generator) and v_j is the x-shaped stretch
    z[0 : x.numel()] of the counter-based Gaussian stream (s_j, offset 0), here from the pure-torch
    reference of that stream (gradreg_fast.reference.philox), in x's dtype."""
    seeds = [int(torch.randint(0, 2 ** 63 - 1, (1,), generator=generator).item()) for _ in range(n_proj)]
    return [philox.gaussian_like(x.detach(), s, 0, per_sample=True) for s in seeds]


def penalty(case: Case, kind: str, *, projection: torch.Tensor | None = None,
            classes: torch.Tensor | None = None, rng_seed: int = 0, repeat: int = 1,
            eps: torch.Tensor | None = None, target_norm: float = 1.0, one_sided: bool = False,
            tangents: list[torch.Tensor] | None = None) -> Truth:
    """The penalty of ``kind`` on the zoo case and its gradient w.r.t. ``case.params``, in the dtype of
    the case. ``rng_seed`` seeds the global RNG right before the forward (dropout masks): seed the
    library's call the same way to compare. ``repeat`` > 1 evaluates the batch repeated that many times
    (``repeated_batch``). "wgan_gp" takes the interpolation weights ``eps`` (B,) and uses
    ``case.notes["fake"]``; ``target_norm`` and ``one_sided`` as gr.penalty's.

    ``tangents`` (frobreg, jacreg: n x-shaped v_j) gives instead the Hutchinson estimate at those
    draws, penalty_b = (1/n) Σ_j ‖J_b v_j[b]‖² with (J_b v)_k = ⟨G_k[b], v[b]⟩ from the same loop of
    double-backprop input gradients G_k (one per output k), and its exact parameter gradient: the
    deterministic function of the draws that method='jvp' computes (``jvp_tangents``)."""
    model = case.twin if case.twin is not None else case.model
    with math_attention():
        torch.manual_seed(rng_seed)
        x = repeated_batch(case.input(), repeat)
        y = repeated_batch(case.y, repeat) if case.y is not None else None
        if kind == "wgan_gp":
            fake = repeated_batch(case.notes["fake"], repeat)
            x = fake + eps.reshape((-1,) + (1,) * (x.dim() - 1)) * (x - fake)
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        out = model(x, **repeated_kwargs(case.model_kwargs, case.y.shape[0], repeat)) if case.model_kwargs \
            else model(x)
        scalars, scale = targets(kind, out, y, projection, classes)
        per_sample = torch.zeros(x.shape[0], dtype=out.dtype)
        for s in scalars:
            (g,) = torch.autograd.grad(s, x, create_graph=True)
            if tangents is None:
                per_sample = per_sample + g.reshape(g.shape[0], -1).pow(2).sum(1)
            else:   # (J_b v_j)_k = ⟨G_k[b], v_j[b]⟩, squared and averaged over the draws
                for v in tangents:
                    per_sample = per_sample + (g * v).reshape(g.shape[0], -1).sum(1).pow(2) / len(tangents)
        per_sample = scale * per_sample
        if kind == "wgan_gp":
            d = per_sample.sqrt() - target_norm
            per_sample = (torch.relu(d) if one_sided else d).pow(2)
        value = per_sample.mean()
        grads = torch.autograd.grad(value, case.params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, case.params, strict=True)]
    return Truth(per_sample.detach(), value.detach(), [g.detach() for g in grads])
