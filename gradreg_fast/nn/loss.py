"""GradRegLoss: a drop-in regularized loss, base(model(x), y) + λ · penalty."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradreg_fast.penalties import (ESTIMATOR_OPTIONS, PROBLEM_OPTIONS, check_method, penalty_from_output,
                                    schedules)
from gradreg_fast.penalties._checks import check_input, check_kind, check_lam
from gradreg_fast.penalties.core import Replay, differentiable_input


class GradRegLoss(nn.Module):
    """``loss = base(f(x), y) + lam · P(f, x, y)`` with P one of gradreg_fast.KINDS.

    Two call forms:

    - ``crit(model, x, y)``: runs the model once on x (x is not modified and need not require grad).
    - ``crit(logits, y, inputs=x)``: drop-in where logits are already computed as ``model(x)`` from
      an x that requires grad (``x.requires_grad_()`` before the forward pass).

    ``loss.backward()`` then yields the regularized parameter gradients. The two parts of the last
    call are kept, detached, in ``last_base`` and ``last_penalty`` for logging (``last_penalty`` is
    None on calls where the penalty is skipped: lam == 0, or an inactive call with every > 1).

    Methods other than "exact" re-run the model, so they need the ``crit(model, x, y)`` form; they
    replay the original forward's random numbers (dropout masks) and restore buffers (BatchNorm
    running statistics) afterwards.

    Schedules: ``every=k`` computes the penalty on one call in k, times k (lazy regularization):
    the call counter lives in this instance (``crit.calls``, active on calls 0, k, 2k, ...; set
    ``crit.calls = 0`` to restart). ``subsample=fraction`` computes it on a random sub-batch.

    Args:
        penalty: penalty kind ("doubleback", "spectreg", "frobreg", "jacreg", "onehot", "random_onehot").
        lam: λ >= 0, finite. With lam == 0 the penalty is not computed (last_penalty is None).
        base: base loss ``base(logits, y) -> scalar`` (default: mean cross-entropy).
        method: estimator (see gradreg_fast.METHODS): "exact", "hvp", "fd", "jvp".
        every: penalty on one call in ``every``, scaled by ``every`` (default 1: every call).
        subsample: fraction in (0, 1] of the batch the penalty is computed on (default: all).
        **penalty_options: projection, n_proj, per_sample, generator, loss_fn, fd_h, fd_scheme
            (see gradreg_fast.penalty).
    """

    def __init__(self, penalty: str, lam: float, base: Callable | None = None, *, method: str = "exact",
                 every: int = 1, subsample: float | None = None, **penalty_options):
        super().__init__()
        self.kind = check_kind(penalty)
        self.lam = check_lam(lam)
        check_method(method)
        self.every = schedules.check_every(every)
        self.subsample = schedules.check_subsample(subsample)
        self.calls = 0
        allowed = set(PROBLEM_OPTIONS) | set(ESTIMATOR_OPTIONS)
        unknown = set(penalty_options) - allowed
        if unknown:
            raise TypeError(f"GradRegLoss got unknown options {sorted(unknown)}; allowed: {sorted(allowed)}")
        self.method = method
        self.base = base if base is not None else F.cross_entropy
        self.penalty_options = penalty_options
        self.last_base: torch.Tensor | None = None
        self.last_penalty: torch.Tensor | None = None

    def forward(self, model_or_logits, x_or_y: torch.Tensor, y: torch.Tensor | None = None, *,
                inputs: torch.Tensor | None = None) -> torch.Tensor:
        if inputs is None:
            model, x = model_or_logits, x_or_y
            if not callable(model) or isinstance(model, torch.Tensor):
                raise TypeError("GradRegLoss: call it as crit(model, x, y) or crit(logits, y, inputs=x); "
                                f"got a {type(model).__name__} first and no inputs=")
            check_input(x)
            # on a call the schedule skips (and with subsample, whose penalty re-runs the model on
            # the sub-batch) this forward's x need not require grad: the backward then skips the
            # first layer's input gradient, as in a plain training step
            plain_forward = (self.lam == 0 or not schedules.is_active(self.calls, self.every)
                             or self.subsample is not None)
            x_in = x if plain_forward else differentiable_input(x)
            replay = Replay(model, x_in.device) if self.method != "exact" else None
            out = model(x_in)
        else:
            if y is not None:
                raise TypeError("GradRegLoss: with inputs=x call it as crit(logits, y, inputs=x)")
            model, out, y, x_in, replay = None, model_or_logits, x_or_y, inputs, None
            check_input(x_in)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"GradRegLoss: logits must be a tensor, got {type(out).__name__}")
            if not x_in.requires_grad or not out.requires_grad:
                raise ValueError("GradRegLoss: with inputs=x the logits must be computed from x after "
                                 "x.requires_grad_(): x.requires_grad_(); logits = model(x); "
                                 "crit(logits, y, inputs=x)")
        if isinstance(y, torch.Tensor) and y.dim() >= 1 and y.shape[0] != x_in.shape[0]:
            raise ValueError(f"y must have one entry per sample: x has batch size {x_in.shape[0]}, "
                             f"y has shape {tuple(y.shape)}")
        base = self.base(out, y)
        loss = base
        pen = None
        active = schedules.is_active(self.calls, self.every)
        self.calls += 1
        if self.lam > 0 and active:
            pen = penalty_from_output(self.kind, out, x_in, y, method=self.method, model=model, replay=replay,
                                      subsample=self.subsample, **self.penalty_options)
            if self.every > 1:
                pen = pen * self.every
            loss = base + self.lam * pen
        self.last_base = base.detach()
        self.last_penalty = pen.detach() if pen is not None else None
        return loss

    def extra_repr(self) -> str:
        extra = (f", every={self.every}" if self.every > 1 else "") + \
            (f", subsample={self.subsample}" if self.subsample is not None else "")
        return f"penalty={self.kind!r}, lam={self.lam}, method={self.method!r}{extra}"
