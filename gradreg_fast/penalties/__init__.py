"""Gradient penalties (PAPER.md) behind one function, ``penalty``, and the paper's baselines."""
from __future__ import annotations

from typing import Callable

import torch

from gradreg_fast._guards import run_estimator
from gradreg_fast.penalties._checks import KINDS, check_input, check_kind
from gradreg_fast.penalties.baselines import confidence_penalty, weight_decay
from gradreg_fast.penalties.core import Problem, build_problem, differentiable_input
from gradreg_fast.penalties.estimators import METHODS


def check_method(method: str) -> Callable[[Problem], torch.Tensor]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[method]


def penalty_from_output(kind: str, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None, *,
                        method: str = "exact", model: Callable | None = None, **options) -> torch.Tensor:
    """The penalty for outputs ``out`` already computed from ``x`` (x must require grad)."""
    estimator = check_method(method)
    problem = build_problem(kind, out, x, y, model=model, **options)
    return run_estimator(estimator, problem, method=method, methods=METHODS, model=model, out=out)


def penalty(kind: str, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            y: torch.Tensor | None = None, *, method: str = "exact", projection: torch.Tensor | None = None,
            n_proj: int = 1, per_sample: bool = False, generator: torch.Generator | None = None,
            loss_fn: Callable | None = None) -> torch.Tensor:
    """Gradient penalty of ``model`` at inputs ``x``, averaged over the batch.

    With f = model, J_i = ∂f(x_i)/∂x_i and p = softmax(f):

    - "doubleback":    mean_i ‖∂ℓ_i/∂x_i‖², ℓ_i = loss_fn(f(x), y)_i (cross-entropy by default;
                       loss_fn must return per-sample losses, e.g. reduction="none").
    - "spectreg":      mean_i mean_j ‖J_iᵀ r_j‖², r_j ~ N(0, I_K) (one vector shared by the batch, or
                       one per sample with per_sample=True; n_proj draws), or ``projection`` given as
                       (K,), (B, K) or (n, B, K). An unbiased estimate of FrobReg.
    - "frobreg":       mean_i ‖J_i‖_F²  (exact, all K outputs in one batched pass).
    - "jacreg":        mean_i ‖∂p(x_i)/∂x_i‖_F².
    - "onehot":        mean_i ‖∂f_{y_i}(x_i)/∂x_i‖².
    - "random_onehot": mean_i ‖∂f_{c_i}(x_i)/∂x_i‖², c_i uniform over the classes (from ``generator``).

    Args:
        kind: one of the names above.
        model: callable mapping x (B, ...) to outputs (B, K) (any (B, ...) for spectreg/frobreg).
        x: floating inputs with a batch dimension; not modified, need not require grad.
        y: integer labels (B,) for doubleback and onehot.
        method: estimator, one of ``gradreg_fast.METHODS`` ("exact": double backpropagation).
        generator: torch.Generator for the random draws (on x's device).

    Returns:
        A scalar tensor: the penalty, differentiable with respect to the model's parameters.
    """
    kind = check_kind(kind)
    check_input(x)
    check_method(method)
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module or function), got {type(model).__name__}")
    x_in = differentiable_input(x)
    out = model(x_in)
    return penalty_from_output(kind, out, x_in, y, method=method, model=model, projection=projection,
                               n_proj=n_proj, per_sample=per_sample, generator=generator, loss_fn=loss_fn)


__all__ = ["KINDS", "METHODS", "penalty", "penalty_from_output", "confidence_penalty", "weight_decay"]
