"""The one call path of every penalty: gr.penalty, penalty_from_output and GradRegLoss's two call forms
(crit(model, x, y) and crit(logits, y, inputs=x), in training and in evaluation) all run ``run_penalty``:

    1. input      x as a graph input that requires grad (``core.differentiable_input``)
    2. replay     a ``core.Replay`` captured before the forward, when the estimator (or subsample) re-runs
                  the model
    3. forward    the call's one plain forward (``core.run_forward``), then the caller's base loss on it
                  (GradRegLoss), which an estimator may differentiate at the call (``core.Fold``)
    4. problem    ``core.build_problem`` from the kind's row of kinds.TABLE (on a random sub-batch with
                  subsample)
    5. estimator  the method's estimator (estimators.METHODS) under the guards (``guards.run_estimator``)

Steps 1-3 are the caller's when it ran the forward itself (``out`` given: penalty_from_output,
crit(logits, y, inputs=x)).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch

from gradreg_fast.penalties import schedules
from gradreg_fast.penalties._checks import check_reduction
from gradreg_fast.penalties.core import (
    Fold,
    Problem,
    Replay,
    build_problem,
    check_model_kwargs,
    differentiable_input,
    forked_rng,
    run_forward,
    select_kwargs,
)
from gradreg_fast.penalties.estimators import ESTIMATOR_OPTIONS, METHODS
from gradreg_fast.penalties.guards import run_estimator

PROBLEM_OPTIONS = ("projection", "n_proj", "per_sample", "generator", "loss_fn", "target_norm", "one_sided")


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


def grad_mode_off() -> bool:
    """True under torch.no_grad() or torch.inference_mode(), where a penalty cannot be built in place."""
    return not torch.is_grad_enabled() or torch.is_inference_mode_enabled()


def grad_enabled_copy(t):
    """A tensor usable under enable_grad (call inside ``with torch.inference_mode(False)``): a clone
    of an inference tensor, anything else as it is (never the caller's tensor modified)."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


class Outcome(NamedTuple):
    penalty: torch.Tensor          # the penalty (scalar, or (B,) with reduction="none")
    base: torch.Tensor | None      # base_loss's value (None without one); detached when its gradient
                                   # rides the penalty's (the estimator took it at the call: Fold)


def run_penalty(kind: str, x: torch.Tensor, y: torch.Tensor | None, options: dict, *,
                model: Callable | None = None, out: torch.Tensor | None = None, forward: bool = False,
                method: str = "exact", replay: Replay | None = None, subsample: float | None = None,
                reduction: str = "mean", fold: Fold | None = None, model_kwargs: dict | None = None,
                base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                fold_weight: float | None = None, restore_rng: bool = False) -> Outcome:
    """The penalty ``kind`` of ``model`` at x, through the steps of this module.

    ``forward``: run steps 1-3 here (``model`` given, x as the caller passed it); else ``out`` is the
    model's output already computed from x (which then requires grad) and ``replay`` the Replay
    captured before it (optional). ``base_loss(out, x)``: the caller's base loss, computed on the
    forward's output before the penalty (GradRegLoss); with ``fold_weight`` (1/λ) an estimator that
    takes the parameter gradients at the call may take the base loss's there too (``core.Fold``).
    ``options``: the problem and estimator options (gr.penalty's keywords). ``restore_rng``: the
    penalty's own draws (after the forward) leave torch's global RNG as the forward left it.
    """
    estimator = check_method(method)
    check_reduction(reduction)
    problem_opts, estimator_opts = _split_options(options)
    estimator_opts["reduction"] = reduction
    model_kwargs = check_model_kwargs(model_kwargs)
    if forward:
        if subsample is None:
            x = differentiable_input(x)
            replay = Replay(model, x.device) if method != "exact" else None
            out = run_forward(model, x, method, model_kwargs)
        elif base_loss is not None:
            # the base loss's forward on the whole batch is a plain one (x need not require grad); the
            # penalty re-runs the model on the sub-batch, as this forward, without side effects
            replay = Replay(model, x.device)
            out = run_forward(model, x, None, model_kwargs)
        else:
            # no forward yet: with subsample the sub-batch's forward is the call's one plain forward (step 4)
            x = differentiable_input(x)
        if replay is not None:
            _ = replay.needed   # settled on this forward's draws, before the base loss runs
    elif out is not None and isinstance(out, torch.Tensor) and not out.requires_grad and grad_mode_off():
        raise ValueError("the model output was computed with gradients off (torch.no_grad() or "
                         "torch.inference_mode()), so it has no graph to x and no input gradient exists: "
                         "compute it with grad mode on, or pass the model (crit(model, x, y) or "
                         "gr.penalty(kind, model, x, y)), which re-enables gradients itself")
    base = None
    if base_loss is not None:
        base = base_loss(out, x)
        if fold_weight is not None and model is not None and subsample is None:
            fold = Fold(base, fold_weight)
    with forked_rng(x.device) if restore_rng else contextlib.nullcontext():
        value = _estimate(kind, out, x, y, estimator, method=method, model=model, replay=replay,
                          subsample=subsample, reduction=reduction, fold=fold, model_kwargs=model_kwargs,
                          problem_opts=problem_opts, estimator_opts=estimator_opts)
    if base is not None and fold is not None and fold.taken:
        base = base.detach()   # its gradient rides the penalty's
    return Outcome(value, base)


def _estimate(kind, out, x, y, estimator, *, method, model, replay, subsample, reduction, fold, model_kwargs,
              problem_opts, estimator_opts) -> torch.Tensor:
    """Steps 4-5: the problem (on a sub-batch with subsample) and the estimator under the guards."""
    fraction = schedules.check_subsample(subsample)
    if fraction is not None:
        if reduction == "none":
            raise ValueError("reduction='none' gives one penalty per sample of the batch; with subsample "
                             "only a random sub-batch has one: use subsample=None or reduction='mean'/'sum'")
        batch = x.shape[0]
        idx = schedules.subset(batch, fraction, problem_opts.get("generator"), x.device)
        problem_opts["projection"] = _subset_projection(problem_opts.get("projection"), idx, batch)
        if model is not None:
            x = differentiable_input(x[idx])
            y = y[idx.to(y.device)] if isinstance(y, torch.Tensor) and y.dim() >= 1 else y
            model_kwargs = select_kwargs(model_kwargs, batch, idx)
            if out is None:
                # no forward yet (gr.penalty): the sub-batch's forward is the call's one plain forward
                replay = Replay(model, x.device) if method != "exact" else None
                out = run_forward(model, x, method, model_kwargs)
            else:
                # the caller's forward ran on the whole batch: the sub-batch's is a re-run of it (from
                # the RNG state and buffers before it, no side effects), and the estimator's re-runs
                # replay that sub-batch forward
                out, replay = (replay or Replay(model, x.device)).original(
                    lambda: run_forward(model, x, method, model_kwargs))
            if reduction == "sum":   # the sub-batch sum times B/m: unbiased for the batch sum
                p = build_problem(kind, out, x, y, model=model, replay=replay, options=estimator_opts,
                                  model_kwargs=model_kwargs, **problem_opts)
                value = run_estimator(estimator, p, method=method, model=model, out=out)
                return value * (batch / idx.numel())
        else:
            if out is None:
                raise ValueError("penalty_from_output needs out (or model with subsample)")
            # no model: keep the full graph, zero the other samples' cotangents, rescale by B/m
            p = build_problem(kind, out, x, y, model=None, options=estimator_opts, **problem_opts)
            mask = torch.zeros(batch, device=p.R.device, dtype=p.R.dtype)
            mask[idx.to(p.R.device)] = 1
            p.R = p.R * mask.reshape(1, batch, 1)
            p.scale = p.scale * batch / idx.numel()
            return run_estimator(estimator, p, method=method, model=model, out=out)
    p = build_problem(kind, out, x, y, model=model, replay=replay, options=estimator_opts,
                      model_kwargs=model_kwargs, **problem_opts)
    p.fold = fold
    return run_estimator(estimator, p, method=method, model=model, out=out)
