"""GradRegLoss: a drop-in regularized loss, base(model(x), y) + λ · penalty."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradreg_fast import distributed
from gradreg_fast._backend import check_backend, use_backend
from gradreg_fast.penalties import (
    ESTIMATOR_OPTIONS,
    GAN_KINDS,
    PROBLEM_OPTIONS,
    check_base_labels,
    check_input,
    check_kind,
    check_lam,
    check_method,
    check_model_kwargs,
    check_penalty_options,
    check_reduction,
    grad_enabled_copy,
    grad_mode_off,
    graph_leaves,
    held,
    run_penalty,
    schedules,
    serialized,
)

_STATE_KEYS = ("calls", "seed", "generator_state", "generator_device", "last_penalty")


class GradRegLoss(nn.Module):
    """``loss = base(f(x), y) + lam · P(f, x, y)`` with P one of gradreg_fast.KINDS.

    Two call forms:

    - ``crit(model, x, y)``: runs the model once on x (x is not modified and need not require grad);
      ``crit(model, x, y, model_kwargs={...})`` calls ``model(x, **model_kwargs)`` (e.g. an attention
      mask; per-sample tensors follow subsample and fd's re-runs, see gradreg_fast.penalty).
    - ``crit(logits, y, inputs=x)``: drop-in where logits are already computed as ``model(x)`` from
      an x that requires grad (``x.requires_grad_()`` before the forward pass).

    ``loss.backward()`` then yields the regularized parameter gradients.

    Logging (every training call sets all three, whatever the schedule; evaluation calls none):

    - ``last_base``: the base loss of the last call, detached.
    - ``last_penalty``: the unscaled penalty P (not λ·P, not every·P) of the last call that computed
      it, detached; skipped calls (every > 1) keep the previous value. None only before the first
      computed penalty or with lam == 0 (never computed).
    - ``last_active``: whether the last call computed the penalty (its loss holds λ·every·P).

    Grad mode: under torch.no_grad() or torch.inference_mode() (validation loops, PyTorch
    Lightning's validation_step) ``crit(model, x, y)`` returns the detached value
    base + λ·P, P computed on a copy of x with gradients enabled (the model runs once, under
    enable_grad); the schedule is not advanced (``calls`` unchanged, every and subsample do not
    apply), the generator's state is restored afterwards, the penalty's own draws from torch's
    global RNG are undone (it advances as by the one plain forward), and ``last_base``,
    ``last_penalty`` and ``last_active`` keep the training values (the state_dict is unchanged),
    so validation leaves training unchanged; the evaluation's parts are in ``last_eval_base`` and
    ``last_eval_penalty`` (detached; None before the first evaluation, the penalty None with lam == 0).
    ``crit(logits, y, inputs=x)`` cannot work there (the logits have no graph): a ValueError names
    grad mode.

    Methods other than "exact" re-run the model, so they need the ``crit(model, x, y)`` form; they
    replay the original forward's random numbers (dropout masks) and restore buffers (BatchNorm
    running statistics) afterwards.

    Schedules: ``every=k`` computes the penalty on one call in k, times k (lazy regularization):
    the call counter lives in this instance (``crit.calls``, active on calls 0, k, 2k, ...; set
    ``crit.calls = 0`` to restart). ``every=k, hold=True`` (the held schedule,
    gradreg_fast.penalties.held) computes g = ∇ λ·P on those calls and adds the same g to the gradient
    of every call until the next, unscaled: ∇ loss_t = ∇ base_t + g (the loss's value on the other
    calls is base + λ·P of the last computation). Under Adam the lazy schedule loses the penalty's
    gain from k = 4 on; the held one kept most of it at k = 4 (docs/paper.md). A call whose model does not
    hold every held parameter (another model, a fresh loss, one loaded from a checkpoint: the held
    gradient is not saved) computes the penalty. Not under DDP/FSDP2. ``subsample=fraction``
    computes the penalty on a random sub-batch.

    Checkpoints: ``state_dict()`` holds the call counter, ``last_penalty`` and, with ``seed=``, the
    state of the generator the loss owns, so a run resumed from a checkpoint draws the same projections and
    follows the same schedule as the uninterrupted run. A ``generator=`` passed in stays the
    caller's (save its ``get_state()`` yourself); with neither, draws come from torch's global RNG.

    Args:
        penalty: penalty kind ("doubleback", "spectreg", "frobreg", "jacreg", "onehot", "random_onehot").
        lam: λ >= 0, finite (int or float). With lam == 0 the penalty is not computed.
        base: base loss ``base(logits, y)`` (default: cross-entropy with this ``reduction``); a scalar
            with reduction "mean"/"sum", per-sample (B,) with "none".
        method: estimator (see gradreg_fast.METHODS): "exact", "hvp", "fd", "jvp".
        every: penalty on one call in ``every``, scaled by ``every`` (default 1: every call).
        hold: with every > 1, hold the penalty's gradient between computations instead of scaling
            it by ``every`` (see Schedules).
        subsample: fraction in (0, 1] of the batch the penalty is computed on (default: all).
        reduction: "mean" (default), "sum", or "none": the loss per sample, base_i + λ·P_i, (B,).
        backend: backend of the penalty's ops (see gradreg_fast.backends(); None: GRADREG_BACKEND,
            else auto); checked here: a backend that cannot run raises, it never falls back.
        seed: seed of a torch.Generator the loss owns (created on x's device at the first call) for
            the penalty's random draws; saved in state_dict. Not together with generator=.
        **penalty_options: projection, n_proj, per_sample, generator, loss_fn, fd_h, fd_scheme
            (see gradreg_fast.penalty), each checked here.
    """

    def __init__(self, penalty: str, lam: float, base: Callable | None = None, *, method: str = "exact",
                 every: int = 1, hold: bool = False, subsample: float | None = None, reduction: str = "mean",
                 backend: str | None = None, seed: int | None = None, **penalty_options):
        super().__init__()
        self.kind = check_kind(penalty)
        if self.kind in GAN_KINDS:
            raise ValueError(f"GradRegLoss adds a penalty to a classifier's base loss; for the GAN kind "
                             f"{self.kind!r} add gr.penalty({self.kind!r}, D, x, ...) to the discriminator's "
                             "loss yourself (lazy, StyleGAN2-style: every=16, step=t)")
        self.lam = check_lam(lam)
        check_method(method)
        self.every = schedules.check_every(every)
        self.subsample = schedules.check_subsample(subsample)
        self.reduction = check_reduction(reduction)
        if not isinstance(hold, bool):
            raise TypeError(f"hold must be True or False, got {hold!r}")
        if hold and self.every < 2:
            raise ValueError("hold=True holds the penalty's gradient between the calls that compute it, one "
                             "in every=k (k >= 2); with every=1 every call computes it: pass every=k")
        if hold and self.reduction == "none":
            raise ValueError("hold=True holds the gradient of the reduced penalty; with reduction='none' the "
                             "per-sample weights come in each call's backward: use reduction='mean' or 'sum'")
        self.hold = hold
        self._held: held.Held | None = None   # hold=True: the penalty gradient held since the last computation
        self.backend = check_backend(backend)
        self.calls = 0
        allowed = set(PROBLEM_OPTIONS) | set(ESTIMATOR_OPTIONS)
        unknown = set(penalty_options) - allowed
        if unknown:
            raise TypeError(f"GradRegLoss got unknown options {sorted(unknown)}; allowed: {sorted(allowed)}")
        check_penalty_options(self.kind, method, **penalty_options)
        if base is not None and not callable(base):
            raise TypeError(f"base must be a callable base(logits, y) -> loss (or None: cross-entropy), "
                            f"got {type(base).__name__}")
        if self.reduction == "none" and self.subsample is not None:
            raise ValueError("reduction='none' gives one penalty per sample of the batch; with subsample "
                             "only a random sub-batch has one: use subsample=None or reduction='mean'/'sum'")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int (the seed of the loss's own generator) or None, got {seed!r}")
            if not -2 ** 63 <= seed < 2 ** 64:
                raise ValueError(f"seed must be in [-2**63, 2**64) (a torch.Generator seed), got {seed}")
            if penalty_options.get("generator") is not None:
                raise ValueError("pass either seed= (the loss owns its generator and checkpoints it) or "
                                 "generator= (yours), not both")
        self.seed = seed
        self._generator: torch.Generator | None = None   # owned (seed=), created at the first call
        self.method = method
        self.base = base if base is not None else F.cross_entropy
        self._default_base = base is None
        self.penalty_options = penalty_options
        self.last_base: torch.Tensor | None = None
        self.last_penalty: torch.Tensor | None = None
        self.last_active = False
        self.last_eval_base: torch.Tensor | None = None      # of the last evaluation (no_grad) call
        self.last_eval_penalty: torch.Tensor | None = None

    # -- state ---------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        gen = self._generator
        return {"calls": self.calls, "seed": self.seed,
                "generator_state": gen.get_state() if gen is not None else None,
                "generator_device": str(gen.device) if gen is not None else None,
                "last_penalty": self.last_penalty}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Loads all or nothing: every entry is checked (and the generator rebuilt) before any is set."""
        where = "GradRegLoss.load_state_dict"
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
            raise ValueError(f"{where}: expected the extra state {list(_STATE_KEYS)} written "
                             f"by GradRegLoss.state_dict(), got {state!r}")
        calls = state["calls"]
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"{where}: calls must be an int >= 0, got {calls!r}")
        if state["seed"] != self.seed:
            raise ValueError(f"{where}: the checkpoint's loss was built with seed="
                             f"{state['seed']!r}, this one with seed={self.seed!r}; construct it with the same seed")
        last = state["last_penalty"]
        if last is not None and not (isinstance(last, torch.Tensor) and last.is_floating_point()
                                     and last.dim() <= 1):
            raise ValueError(f"{where}: last_penalty must be None or a floating tensor (the last penalty), "
                             f"got {last!r}")
        gen = None
        gen_state, gen_device = state["generator_state"], state["generator_device"]
        if gen_state is not None or gen_device is not None:
            if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8 \
                    or not isinstance(gen_device, str):
                raise ValueError(f"{where}: generator_state must be a torch.uint8 tensor (Generator.get_state()) "
                                 f"and generator_device a device string, got {type(gen_state).__name__} and "
                                 f"{gen_device!r}")
            try:
                gen = torch.Generator(device=gen_device)
                gen.set_state(gen_state)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise ValueError(f"{where}: the checkpoint's generator (device {gen_device!r}) cannot be restored "
                                 f"here: {str(exc).splitlines()[0][:200]}; load it where that device exists "
                                 "(e.g. map_location and the same device)") from exc
        self.calls, self.last_penalty, self._generator = calls, last, gen
        self._held = None   # not in the checkpoint: the next call computes the penalty

    def _options(self, device: torch.device) -> dict:
        """The penalty options, with the owned generator (created on ``device`` at the first call)."""
        if self.seed is None:
            return self.penalty_options
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        elif self._generator.device.type != torch.device(device).type:
            raise ValueError(f"GradRegLoss(seed=...): its generator lives on {self._generator.device} (first "
                             f"call or checkpoint), x is on {device}; keep the loss on one device")
        return {**self.penalty_options, "generator": self._generator}

    def _base_loss(self, out: torch.Tensor, y) -> torch.Tensor:
        if self._default_base:
            return F.cross_entropy(out, check_base_labels(y, out), reduction=self.reduction)
        base = self.base(out, y)
        expected = (out.shape[0],) if self.reduction == "none" else ()
        if not isinstance(base, torch.Tensor) or tuple(base.shape) != expected:
            shape = tuple(base.shape) if isinstance(base, torch.Tensor) else type(base).__name__
            wanted = f"per-sample losses of shape {expected}" if expected else "a scalar"
            raise ValueError(f"base must return {wanted}"
                             f" with reduction={self.reduction!r}, got {shape}; e.g. reduce it inside base")
        return base

    # -- calls ---------------------------------------------------------------------------------------
    def forward(self, model_or_logits, x_or_y: torch.Tensor, y: torch.Tensor | None = None, *,
                inputs: torch.Tensor | None = None, model_kwargs: dict | None = None) -> torch.Tensor:
        kwargs = check_model_kwargs(model_kwargs)
        if kwargs and inputs is not None:
            raise TypeError("GradRegLoss: model_kwargs go with crit(model, x, y, model_kwargs=...); with "
                            "crit(logits, y, inputs=x) the model has already run")
        with serialized():   # one call at a time per process: docs/threads.md
            if grad_mode_off():
                return self._evaluate(model_or_logits, x_or_y, y, inputs, kwargs)
            with use_backend(self.backend):
                return self._train(model_or_logits, x_or_y, y, inputs, kwargs)

    def _split_call(self, model_or_logits, x_or_y, y, inputs):
        if inputs is None:
            model, x = model_or_logits, x_or_y
            if not callable(model) or isinstance(model, torch.Tensor):
                raise TypeError("GradRegLoss: call it as crit(model, x, y) or crit(logits, y, inputs=x); "
                                f"got a {type(model).__name__} first and no inputs=")
            check_input(x)
            return model, x, y
        if y is not None:
            raise TypeError("GradRegLoss: with inputs=x call it as crit(logits, y, inputs=x)")
        return None, inputs, x_or_y

    @staticmethod
    def _check_labels(y, x: torch.Tensor) -> None:
        if isinstance(y, torch.Tensor) and y.dim() >= 1 and y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have one entry per sample: x has batch size {x.shape[0]}, "
                             f"y has shape {tuple(y.shape)}")

    def _train(self, model_or_logits, x_or_y, y, inputs, model_kwargs: dict) -> torch.Tensor:
        """One training call; a call that raises leaves the loss as it was (calls, the owned generator)."""
        calls, gen = self.calls, self._generator
        gen_state = gen.get_state() if gen is not None else None
        try:
            return self._train_call(model_or_logits, x_or_y, y, inputs, model_kwargs)
        except BaseException:
            self.calls, self._generator = calls, gen
            if gen is not None:
                gen.set_state(gen_state)
            raise

    def _train_call(self, model_or_logits, x_or_y, y, inputs, model_kwargs: dict) -> torch.Tensor:
        model, x, y = self._split_call(model_or_logits, x_or_y, y, inputs)
        active = self.lam > 0 and schedules.is_active(self.calls, self.every)
        out = None
        if model is None:
            out = model_or_logits
            check_input(x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"GradRegLoss: logits must be a tensor, got {type(out).__name__}")
            if not x.requires_grad or not out.requires_grad:
                raise ValueError("GradRegLoss: with inputs=x the logits must be computed from x after "
                                 "x.requires_grad_(): x.requires_grad_(); logits = model(x); "
                                 "crit(logits, y, inputs=x)")

        def base_loss(out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
            self._check_labels(y, x_in)
            return self._base_loss(out, y)

        self.calls += 1
        if self.hold and self.lam > 0:
            return self._held_call(model, x, y, out, model_kwargs, active, base_loss)
        if not active:
            # on a call the schedule skips, the forward is a plain one: x need not require grad, and the
            # backward then skips the first layer's input gradient, as in a plain training step
            loss = base = base_loss(out if model is None else model(x, **model_kwargs), x)
        else:
            # the estimators that take the penalty's gradients at the call take the base loss's there
            # too, on the clean graph, which is then freed before their own passes (core.Fold)
            pen, base = run_penalty(self.kind, x, y, self._options(x.device), model=model, out=out,
                                    forward=model is not None, method=self.method, subsample=self.subsample,
                                    reduction=self.reduction, model_kwargs=model_kwargs, base_loss=base_loss,
                                    fold_weight=1.0 / (self.lam * self.every))
            loss = torch.add(base, pen, alpha=self.lam * self.every)   # base + λ·k·P: one op, one backward node
            self.last_penalty = pen.detach()
        self.last_base = base.detach()
        self.last_active = active
        return loss

    def _held_call(self, model, x, y, out, model_kwargs: dict, active: bool, base_loss) -> torch.Tensor:
        """A training call with hold=True: compute the penalty and hold its gradient (active calls, and
        calls with nothing held for this model), else add the held gradient to the base loss's."""
        if (distributed.find_ddp(model, out) is not None or distributed.find_fsdp(model, out)
                or isinstance(model, nn.parallel.DistributedDataParallel)):
            raise ValueError("GradRegLoss(hold=True) is not supported under DDP or FSDP2 (the held gradient "
                             "would be added on every rank without its reduction being tested): use "
                             "every=k without hold, or hold the gradient yourself (docs/paper.md)")
        params = list(model.parameters()) if model is not None else list(graph_leaves(out))
        if not active and self._held is not None and self._held.serves(params):
            base = base_loss(out if model is None else model(x, **model_kwargs), x)
            self.last_base, self.last_active = base.detach(), False
            return base + self._held.carrier()
        pen, base = run_penalty(self.kind, x, y, self._options(x.device), model=model, out=out,
                                forward=model is not None, method=self.method, subsample=self.subsample,
                                reduction=self.reduction, model_kwargs=model_kwargs, base_loss=base_loss)
        carrier, self._held = held.hold(pen, self.lam)
        self.last_penalty, self.last_base, self.last_active = pen.detach(), base.detach(), True
        return base + carrier

    def _evaluate(self, model_or_logits, x_or_y, y, inputs, model_kwargs: dict) -> torch.Tensor:
        """The loss's value under no_grad / inference_mode (see the class docstring)."""
        if inputs is not None:
            raise ValueError("GradRegLoss: crit(logits, y, inputs=x) was called with gradients off "
                             "(torch.no_grad() or torch.inference_mode(), e.g. a validation step): logits "
                             "computed there have no graph to x, so no penalty exists. Call crit(model, x, y) "
                             "instead (it turns grad mode on for the penalty itself), or compute the logits "
                             "with grad mode on")
        model, x, y = self._split_call(model_or_logits, x_or_y, y, inputs)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # DDP's forward under enable_grad would arm its reducer for a backward that never comes
            model = model.module
        if self.lam == 0:
            out = model(x, **model_kwargs)
            self._check_labels(y, x)
            self.last_eval_base, self.last_eval_penalty = self._base_loss(out, y).detach(), None
            return self.last_eval_base
        owned = self._generator
        options = self._options(x.device)
        gen = options.get("generator")
        saved = gen.get_state() if gen is not None else None
        try:
            with torch.inference_mode(False), torch.enable_grad(), use_backend(self.backend):
                xc, yc = grad_enabled_copy(x), grad_enabled_copy(y)
                options = {k: grad_enabled_copy(v) for k, v in options.items()}
                model_kwargs = {k: grad_enabled_copy(v) for k, v in model_kwargs.items()}

                def base_loss(out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
                    self._check_labels(yc, x_in)
                    return self._base_loss(out, yc)
                # the penalty's own draws leave torch's RNG as the forward did (restore_rng)
                pen, base = run_penalty(self.kind, xc, yc, options, model=model, forward=True, method=self.method,
                                        reduction=self.reduction, model_kwargs=model_kwargs, base_loss=base_loss,
                                        restore_rng=True)
                self.last_eval_base, self.last_eval_penalty = base.detach(), pen.detach()
                return (base + self.lam * pen).detach()
        finally:
            if saved is not None:
                gen.set_state(saved)
            self._generator = owned   # not created by an evaluation either

    def extra_repr(self) -> str:
        extra = (f", every={self.every}" if self.every > 1 else "") + \
            (", hold=True" if self.hold else "") + \
            (f", subsample={self.subsample}" if self.subsample is not None else "") + \
            (f", reduction={self.reduction!r}" if self.reduction != "mean" else "") + \
            (f", backend={self.backend!r}" if self.backend is not None else "") + \
            (f", seed={self.seed}" if self.seed is not None else "")
        return f"penalty={self.kind!r}, lam={self.lam}, method={self.method!r}{extra}"
