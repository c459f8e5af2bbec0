"""Gradient penalties (docs/method.md) behind one function, ``penalty``, and the paper's baselines."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from gradreg_fast._backend import check_backend, use_backend
from gradreg_fast.penalties import held, kinds, schedules  # noqa: F401  (held: GradRegLoss's hold=True)

# also the names gradreg_fast.nn (GradRegLoss) uses from this layer: the checks of its arguments and the
# call path (run_penalty); noqa: F401 marks those this module does not use itself
from gradreg_fast.penalties._checks import (  # noqa: F401
    REDUCTIONS,
    check_base_labels,
    check_gan_options,
    check_input,
    check_kind,
    check_lam,
    check_penalty_options,
    check_reduction,
)
from gradreg_fast.penalties.baselines import confidence_penalty, weight_decay
from gradreg_fast.penalties.call import (  # noqa: F401
    PROBLEM_OPTIONS,
    check_method,
    grad_enabled_copy,
    grad_mode_off,
    run_penalty,
)
from gradreg_fast.penalties.core import (
    Fold,
    Replay,
    check_model_kwargs,
    forked_rng,
    interpolates,
    serialized,
    serialized_call,
)
from gradreg_fast.penalties.estimators import ESTIMATOR_OPTIONS, METHODS  # noqa: F401
from gradreg_fast.penalties.guards import graph_leaves  # noqa: F401  (GradRegLoss's hold=True)
from gradreg_fast.penalties.kinds import GAN_KINDS, KINDS


@contextlib.contextmanager
def _restored(generator: torch.Generator | None, state: torch.Tensor | None):
    """``generator`` set back to ``state`` on exit (nothing for None)."""
    try:
        yield
    finally:
        if generator is not None:
            generator.set_state(state)


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
    return run_penalty(kind, x, y, options, model=model, out=out, method=method, replay=replay,
                       subsample=subsample, reduction=reduction, fold=fold, model_kwargs=model_kwargs).penalty


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
                 through φ, "hvp" and "fd" weight their per-sample terms by φ′ (see the estimators package).
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
    spec = kinds.lookup(kind)
    gan = {k: v for k, v in (("target_norm", target_norm), ("one_sided", one_sided)) if k in spec.options}
    with serialized(), use_backend(backend):   # one call at a time per process: docs/threads.md
        if "fake" in spec.options:   # the penalty is taken at x̂ = fake + ε (x − fake), ε from the generator
            x = interpolates(x, fake, generator)
        options = dict(projection=projection, n_proj=n_proj, per_sample=per_sample, generator=generator,
                       loss_fn=loss_fn, fd_h=fd_h, fd_scheme=fd_scheme, **gan)
        value = run_penalty(kind, x, y, options, model=model, forward=True, method=method, subsample=subsample,
                            reduction=reduction, model_kwargs=check_model_kwargs(model_kwargs)).penalty
    return value * every if every > 1 else value


__all__ = ["KINDS", "GAN_KINDS", "METHODS", "REDUCTIONS", "penalty", "penalty_from_output", "confidence_penalty",
           "weight_decay"]
