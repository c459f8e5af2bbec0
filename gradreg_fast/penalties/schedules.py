"""Cheaper schedules for any estimator, both unbiased in expectation.

- ``every=k`` (lazy regularization, as StyleGAN2's R1): the penalty is computed on one call in k
  and multiplied by k, so its average over k consecutive steps equals the per-step penalty.
  ``GradRegLoss`` keeps the call counter itself (``crit.calls``: active on calls 0, k, 2k, ...);
  ``penalty()`` is stateless and takes the training step as ``step=`` (active when step % k == 0).
- ``subsample=fraction``: the penalty on m = max(1, round(fraction · B)) samples drawn uniformly
  without replacement (from the penalty's ``generator``). The mean over a uniform random subset is
  an unbiased estimate of the batch mean, so no further rescaling is needed when the model is
  re-run on the subset (the fast path: the penalty's work shrinks by the fraction). Without the
  model (``crit(logits, y, inputs=x)``) the full graph is used with the other samples' cotangents
  set to 0 and the result scaled by B/m: unbiased, but no faster. With BatchNorm in training mode
  a sub-batch has its own statistics, so the estimate is only approximately unbiased there.
"""
from __future__ import annotations

import torch


def check_every(every) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer (1: penalty on every step), got {every!r}")
    return every


def check_subsample(fraction) -> float | None:
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"subsample must be a fraction in (0, 1] of the batch (or None), got {fraction!r}")
    return None if fraction == 1 else float(fraction)


def is_active(step: int, every: int) -> bool:
    return step % every == 0


def subset(batch: int, fraction: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """Sorted indices of m = max(1, round(fraction · batch)) samples, uniform without replacement."""
    m = max(1, min(batch, round(fraction * batch)))
    perm = torch.randperm(batch, generator=generator, device=generator.device if generator is not None
                          else "cpu")
    return perm[:m].sort().values.to(device)
