"""Gradient penalties (docs/method.md) behind one function, ``penalty``, and the paper's baselines."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from gradreg_fast._backend import check_backend, use_backend
from gradreg_fast._guards import run_estimator
from gradreg_fast.penalties import schedules
from gradreg_fast.penalties._checks import (
    GAN_KINDS,
    KINDS,
    REDUCTIONS,
    check_gan_options,
    check_input,
    check_kind,
    check_penalty_options,
    check_reduction,
)
from gradreg_fast.penalties.baselines import confidence_penalty, weight_decay
from gradreg_fast.penalties.core import (
    Fold,
    Problem,
    Replay,
    build_problem,
    check_model_kwargs,
    differentiable_input,
    forked_rng,
    interpolates,
    run_forward,
    select_kwargs,
    serialized,
    serialized_call,
)
from gradreg_fast.penalties.estimators import ESTIMATOR_OPTIONS, METHODS

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


@contextlib.contextmanager
def _restored(generator: torch.Generator | None, state: torch.Tensor | None):
    """``generator`` set back to ``state`` on exit (nothing for None)."""
    try:
        yield
    finally:
        if generator is not None:
            generator.set_state(state)


def grad_mode_off() -> bool:
    """True under torch.no_grad() or torch.inference_mode(), where a penalty cannot be built in place."""
    return not torch.is_grad_enabled() or torch.is_inference_mode_enabled()


def grad_enabled_copy(t):
    """A tensor usable under enable_grad (call inside ``with torch.inference_mode(False)``): a clone
    of an inference tensor, anything else as it is (never the caller's tensor modified)."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


@serialized_call   # one call at a time per process: docs/threads.md
def penalty_from_output(kind: str, out: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor | None = None, *,
                        method: str = "exact", model: Callable | None = None, replay: Replay | None = None,
                        subsample: float | None = None, reduction: str = "mean", fold: Fold | None = None,
                        model_kwargs: dict | None = None, **options) -> torch.Tensor:
    """The penalty for outputs ``out`` already computed from ``x`` (x must require grad).

    ``model`` (with ``replay``, captured before ``out`` was computed) lets estimators and
    ``subsample`` re-run the model; without it only method="exact" applies. ``out`` may be None
    when ``subsample`` and ``model`` are given (the model then runs on the sub-batch only).
    ``reduction``: "mean" (batch mean), "sum" (batch sum; with subsample, B/m times the sub-batch
    sum) or "none" (the (B,) per-sample penalties; not with subsample). ``fold``: the caller's base
    loss, which an estimator may differentiate at the call (``core.Fold``; not with subsample).
    ``model_kwargs``: keyword arguments of every call of ``model`` (see ``penalty``).
    """
    estimator = check_method(method)
    check_reduction(reduction)
    problem_opts, estimator_opts = _split_options(options)
    estimator_opts["reduction"] = reduction
    model_kwargs = check_model_kwargs(model_kwargs)
    if out is not None and isinstance(out, torch.Tensor) and not out.requires_grad and grad_mode_off():
        raise ValueError("the model output was computed with gradients off (torch.no_grad() or "
                         "torch.inference_mode()), so it has no graph to x and no input gradient exists: "
                         "compute it with grad mode on, or pass the model (crit(model, x, y) or "
                         "gr.penalty(kind, model, x, y)), which re-enables gradients itself")
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
                value = run_estimator(estimator, p, method=method, methods=METHODS, model=model, out=out)
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
            return run_estimator(estimator, p, method=method, methods=METHODS, model=model, out=out)
    p = build_problem(kind, out, x, y, model=model, replay=replay, options=estimator_opts,
                      model_kwargs=model_kwargs, **problem_opts)
    p.fold = fold
    return run_estimator(estimator, p, method=method, methods=METHODS, model=model, out=out)


def penalty(kind: str, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            y: torch.Tensor | None = None, *, method: str = "exact", projection: torch.Tensor | None = None,
            n_proj: int = 1, per_sample: bool = False, generator: torch.Generator | None = None,
            loss_fn: Callable | None = None, fd_h: float | None = None, fd_scheme: str | None = None,
            every: int = 1, step: int | None = None, subsample: float | None = None, reduction: str = "mean",
            backend: str | None = None, fake: torch.Tensor | None = None, target_norm: float | None = None,
            one_sided: bool | None = None, model_kwargs: dict | None = None) -> torch.Tensor:
    """Gradient penalty of ``model`` at inputs ``x``, averaged over the batch (``reduction``).

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

    GAN discriminators (``model`` = D or the critic, one score per sample: output (B,) or (B, 1); no y):

    - "r1":      mean_i ‖∇ₓD(x_i)‖² at x (Mescheder et al. 2018 use γ/2 times it, on real data).
                 R2 is the same kind called on generated data: penalty("r1", D, x_fake.detach()).
    - "wgan_gp": mean_i (‖∇ₓD(x̂_i)‖ − c)² at x̂_i = fake_i + ε_i (x_i − fake_i), ε_i ~ U(0, 1) drawn
                 as torch.rand(B) from ``generator`` (Gulrajani et al. 2017: c = 1, times λ = 10);
                 ``one_sided=True``: mean_i max(0, ‖∇ₓD(x̂_i)‖ − c)². x is the real batch.
                 With φ(s) = (√s − c)², ∇_θ P_i = φ′(‖g_i‖²) ∇_θ‖g_i‖²: "exact" differentiates
                 through φ, "hvp" and "fd" weight their per-sample terms by φ′ (see estimators.py).
    Lazy regularization as in StyleGAN2 (R1 every 16 steps): every=16, step=t gives 16·P on active
    steps and 0 otherwise. method="jvp" does not serve these kinds.

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
        reduction: "mean" (default: mean_i P_i as above), "sum" (Σ_i P_i) or "none": the (B,)
            per-sample penalties P_i, each differentiable with the same estimator semantics
            (∇_θ Σ_i w_i P_i is the weighted sum of the per-sample gradients; not with subsample).
        backend: backend of the penalty's ops ("reference", "cpp", "cuda", "triton", "auto"; None:
            GRADREG_BACKEND, else auto). Checked now, as the environment variable is: a backend
            that cannot run here raises; it never falls back.
        fake: "wgan_gp" only (required): the generated batch, shaped like x (pass it detached in the
            discriminator step; if it requires grad, the penalty differentiates into it too).
        target_norm: "wgan_gp" only: the norm c the critic's gradient is pulled to (default 1).
        one_sided: "wgan_gp" only: penalize only norms above c (default False).
        model_kwargs: keyword arguments of every call of the model, ``model(x, **model_kwargs)`` (e.g.
            a Hugging Face attention mask, with gr.nn.FromEmbeddings). Tensors whose first dimension
            is the batch size are per-sample: subsample selects their rows and re-runs on stacked
            copies of the batch (fd) repeat them; everything else is passed as it is.

    Grad mode: under torch.no_grad() or torch.inference_mode() the penalty's value is computed
    with gradients enabled on a copy of x (inference tensors are cloned) and returned detached;
    as GradRegLoss's evaluation, it leaves ``generator`` and torch's global RNG as they were.

    Threads: calls from several threads run one at a time (docs/threads.md).

    Returns:
        The penalty, differentiable with respect to the model's parameters: a scalar, or (B,) with
        reduction="none".
    """
    kind = check_kind(kind)
    check_input(x)
    check_method(method)
    every = schedules.check_every(every)
    schedules.check_subsample(subsample)
    check_reduction(reduction)
    check_backend(backend)
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module or function), got {type(model).__name__}")
    check_penalty_options(kind, method, projection=projection, n_proj=n_proj, per_sample=per_sample,
                          generator=generator, loss_fn=loss_fn, fd_h=fd_h, fd_scheme=fd_scheme,
                          target_norm=target_norm, one_sided=one_sided)
    check_gan_options(kind, x, y, fake)
    if reduction == "none" and subsample is not None and subsample != 1:
        raise ValueError("reduction='none' gives one penalty per sample of the batch; with subsample "
                         "only a random sub-batch has one: use subsample=None or reduction='mean'/'sum'")
    if every > 1:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"every={every} needs the training step: penalty(..., every={every}, step=t) "
                             "(penalty() keeps no state; GradRegLoss counts calls itself)")
        if not schedules.is_active(step, every):
            return torch.zeros((x.shape[0],) if reduction == "none" else (), device=x.device, dtype=x.dtype)
    if grad_mode_off():
        # validation loops run under no_grad / inference_mode: the value is still well defined; as for
        # GradRegLoss's evaluation, the generator and torch's global RNG are left as they were
        saved = generator.get_state() if generator is not None else None
        with (torch.inference_mode(False), torch.enable_grad(), forked_rng(x.device),
              _restored(generator, saved)):
            value = penalty(kind, model, grad_enabled_copy(x), grad_enabled_copy(y), method=method,
                            projection=grad_enabled_copy(projection), n_proj=n_proj, per_sample=per_sample,
                            generator=generator, loss_fn=loss_fn, fd_h=fd_h, fd_scheme=fd_scheme, every=every,
                            step=step, subsample=subsample, reduction=reduction, backend=backend,
                            fake=grad_enabled_copy(fake), target_norm=target_norm, one_sided=one_sided,
                            model_kwargs={k: grad_enabled_copy(v) for k, v in check_model_kwargs(model_kwargs).items()})
        return value.detach()
    gan = {} if kind != "wgan_gp" else {"target_norm": target_norm, "one_sided": one_sided}
    with serialized(), use_backend(backend):   # one call at a time per process: docs/threads.md
        if kind == "wgan_gp":   # the penalty is taken at x̂ = fake + ε (x − fake), ε from the generator
            x = interpolates(x, fake, generator)
        return _penalty(kind, model, x, y, method=method, projection=projection, n_proj=n_proj,
                        per_sample=per_sample, generator=generator, loss_fn=loss_fn, fd_h=fd_h,
                        fd_scheme=fd_scheme, every=every, subsample=subsample, reduction=reduction,
                        model_kwargs=check_model_kwargs(model_kwargs), **gan)


def _penalty(kind, model, x, y, *, method, projection, n_proj, per_sample, generator, loss_fn, fd_h, fd_scheme,
             every, subsample, reduction, model_kwargs, **gan) -> torch.Tensor:
    x_in = differentiable_input(x)
    replay = Replay(model, x.device) if method != "exact" else None
    # with subsample the model runs on the sub-batch only (inside penalty_from_output)
    out = run_forward(model, x_in, method, model_kwargs) if subsample is None else None
    value = penalty_from_output(kind, out, x_in, y, method=method, model=model, replay=replay,
                                subsample=subsample, projection=projection, n_proj=n_proj,
                                per_sample=per_sample, generator=generator, loss_fn=loss_fn, fd_h=fd_h,
                                fd_scheme=fd_scheme, reduction=reduction, model_kwargs=model_kwargs, **gan)
    return value * every if every > 1 else value


__all__ = ["KINDS", "GAN_KINDS", "METHODS", "REDUCTIONS", "penalty", "penalty_from_output", "confidence_penalty",
           "weight_decay"]
