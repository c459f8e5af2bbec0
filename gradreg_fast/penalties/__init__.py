"""Gradient penalties (PAPER.md) behind one function, ``penalty``, and the paper's baselines."""
from __future__ import annotations

from typing import Callable

import torch

from gradreg_fast._guards import run_estimator
from gradreg_fast.penalties import schedules
from gradreg_fast.penalties._checks import KINDS, check_input, check_kind
from gradreg_fast.penalties.baselines import confidence_penalty, weight_decay
from gradreg_fast.penalties.core import Problem, Replay, build_problem, differentiable_input
from gradreg_fast.penalties.estimators import ESTIMATOR_OPTIONS, METHODS

PROBLEM_OPTIONS = ("projection", "n_proj", "per_sample", "generator", "loss_fn")


def check_method(method: str) -> Callable[[Problem], torch.Tensor]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[method]


def _split_options(options: dict) -> tuple[dict, dict]:
    unknown = set(options) - set(PROBLEM_OPTIONS) - set(ESTIMATOR_OPTIONS)
    if unknown:
        raise TypeError(f"unknown penalty options {sorted(unknown)}; allowed: "
                        f"{sorted(PROBLEM_OPTIONS + ESTIMATOR_OPTIONS)}")
    problem = {k: v for k, v in options.items() if k in PROBLEM_OPTIONS}
    estimator = {k: v for k, v in options.items() if k in ESTIMATOR_OPTIONS and v is not None}
    return problem, estimator


def _subset_projection(projection, idx: torch.Tensor, batch: int):
    if projection is None or not isinstance(projection, torch.Tensor) or projection.dim() == 1:
        return projection
    if projection.dim() == 2 and projection.shape[0] == batch:
        return projection[idx.to(projection.device)]
    if projection.dim() == 3 and projection.shape[1] == batch:
        return projection[:, idx.to(projection.device)]
    return projection  # malformed: build_problem reports it


def penalty_from_output(kind: str, out: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor | None = None, *,
                        method: str = "exact", model: Callable | None = None, replay: Replay | None = None,
                        subsample: float | None = None, **options) -> torch.Tensor:
    """The penalty for outputs ``out`` already computed from ``x`` (x must require grad).

    ``model`` (with ``replay``, captured before ``out`` was computed) lets estimators and
    ``subsample`` re-run the model; without it only method="exact" applies. ``out`` may be None
    when ``subsample`` and ``model`` are given (the model then runs on the sub-batch only).
    """
    estimator = check_method(method)
    problem_opts, estimator_opts = _split_options(options)
    fraction = schedules.check_subsample(subsample)
    if fraction is not None:
        batch = x.shape[0]
        idx = schedules.subset(batch, fraction, problem_opts.get("generator"), x.device)
        problem_opts["projection"] = _subset_projection(problem_opts.get("projection"), idx, batch)
        if model is not None:
            x = differentiable_input(x[idx])
            y = y[idx.to(y.device)] if isinstance(y, torch.Tensor) and y.dim() >= 1 else y
            replay = Replay(model, x.device)
            with replay.context():
                out = model(x)
        else:
            if out is None:
                raise ValueError("penalty_from_output needs out (or model with subsample)")
            # no model: keep the full graph, zero the other samples' cotangents, rescale by B/m
            p = build_problem(kind, out, x, y, model=None, options=estimator_opts, **problem_opts)
            mask = torch.zeros(batch, device=p.R.device, dtype=p.R.dtype)
            mask[idx.to(p.R.device)] = 1
            p.R = p.R * mask.reshape(1, batch, 1)
            p.scale = p.scale * batch / idx.numel()
            return run_estimator(estimator, p, method=method, methods=METHODS, model=model, out=out)
    p = build_problem(kind, out, x, y, model=model, replay=replay, options=estimator_opts, **problem_opts)
    return run_estimator(estimator, p, method=method, methods=METHODS, model=model, out=out)


def penalty(kind: str, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            y: torch.Tensor | None = None, *, method: str = "exact", projection: torch.Tensor | None = None,
            n_proj: int = 1, per_sample: bool = False, generator: torch.Generator | None = None,
            loss_fn: Callable | None = None, fd_h: float | None = None, fd_scheme: str | None = None,
            every: int = 1, step: int | None = None, subsample: float | None = None) -> torch.Tensor:
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
        method: estimator, one of ``gradreg_fast.METHODS``: "exact" (double backpropagation),
            "hvp" (forward-over-reverse, exact, needs an nn.Module), "fd" (finite differences,
            first-order passes only), "jvp" (forward-mode Hutchinson, frobreg/jacreg; n_proj draws).
            See gradreg_fast.penalties.estimators.
        generator: torch.Generator for the random draws (on x's device).
        fd_h, fd_scheme: method="fd" step relative to the batch RMS of x (default 1e-3) and scheme
            ("central", default, or "forward").
        every, step: lazy regularization: with every=k the penalty is k·P when step % k == 0 and
            0 (no work) otherwise; ``step`` (the training step) is required when every > 1.
        subsample: fraction in (0, 1]: the penalty on a random sub-batch (unbiased).

    Returns:
        A scalar tensor: the penalty, differentiable with respect to the model's parameters.
    """
    kind = check_kind(kind)
    check_input(x)
    check_method(method)
    every = schedules.check_every(every)
    schedules.check_subsample(subsample)
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module or function), got {type(model).__name__}")
    if every > 1:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"every={every} needs the training step: penalty(..., every={every}, step=t) "
                             "(penalty() keeps no state; GradRegLoss counts calls itself)")
        if not schedules.is_active(step, every):
            return torch.zeros((), device=x.device, dtype=x.dtype)
    x_in = differentiable_input(x)
    replay = Replay(model, x.device) if method != "exact" else None
    # with subsample the model runs on the sub-batch only (inside penalty_from_output)
    out = model(x_in) if subsample is None else None
    value = penalty_from_output(kind, out, x_in, y, method=method, model=model, replay=replay,
                                subsample=subsample, projection=projection, n_proj=n_proj,
                                per_sample=per_sample, generator=generator, loss_fn=loss_fn, fd_h=fd_h,
                                fd_scheme=fd_scheme)
    return value * every if every > 1 else value


__all__ = ["KINDS", "METHODS", "penalty", "penalty_from_output", "confidence_penalty", "weight_decay"]
