"""Input validation shared by penalty() and GradRegLoss: each error names the problem and the fix."""
from __future__ import annotations

import math
import numbers

import torch

from gradreg_fast import _methods
from gradreg_fast.ops._common import index_extremes
from gradreg_fast.penalties import kinds
from gradreg_fast.penalties.kinds import ALL_KINDS, CLASSIFIER_KINDS, GAN_KINDS, KINDS  # noqa: F401 (the table's lists)


def check_kind(kind: str) -> str:
    return kinds.lookup(kind).name


def check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor to differentiate with respect to it, got {x.dtype}; "
                        "convert it first, e.g. x.float()")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension and at least one feature dimension, shape (B, ...); "
                         f"got shape {tuple(x.shape)} (use x.unsqueeze(0) for one sample, x.unsqueeze(1) "
                         "for scalar features)")
    if x.shape[0] == 0:
        raise ValueError("x has an empty batch (B = 0): a batch-averaged penalty is undefined")


def _integer_classes(y: torch.Tensor) -> bool:
    return not (y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex())


def _range_checkable(y: torch.Tensor) -> bool:
    """False for a tensor wrapped by a torch.func transform (vmap over the labels), whose values a
    Python-side range check cannot read."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not (wrapped is not None and wrapped(y))


def check_labels(y, batch: int, kind: str, num_classes: int | None = None, indices: bool = True,
                 ignore_index: int | None = None) -> torch.Tensor:
    """The one rule for labels at every entry point (gr.penalty, functional_penalty, GradRegLoss):

    y is a tensor with one entry per sample; where it holds class indices (``indices``: onehot, and
    doubleback's and GradRegLoss's default cross-entropy) it is an integer tensor (any integer dtype)
    of shape (B,) with values in [0, num_classes) (``ignore_index`` also allowed; the range is checked
    once num_classes is known). Returns y, as torch.long where it holds indices. ``kind`` names the
    penalty (or the base loss) in the messages."""
    if y is None:
        raise ValueError(f"{kind} needs the labels y (shape (B,), integer classes)")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of integer class indices, got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != batch:
        raise ValueError(f"y must have one entry per sample: x has batch size {batch}, "
                         f"y has shape {tuple(y.shape)}")
    if not indices:
        return y
    if not _integer_classes(y):
        raise TypeError(f"y must hold integer class indices for {kind} (e.g. y.long()), got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"y must have shape (B,) of class indices for {kind}, got {tuple(y.shape)}")
    if num_classes is not None and y.numel() and _range_checkable(y):
        lo, hi = index_extremes(y)
        if lo < 0 or hi >= num_classes:   # some label outside [0, K): allowed only if it is ignore_index
            valid = (y >= 0) & (y < num_classes)
            if ignore_index is not None:
                valid |= y == ignore_index
            if not bool(valid.all()):
                bad = y[~valid][0].item()
                raise ValueError(f"y holds class index {bad} outside [0, {num_classes}) for {kind} on a model "
                                 f"with {num_classes} outputs")
    return y if y.dtype == torch.long else y.long()


def check_base_labels(y, out: torch.Tensor) -> torch.Tensor:
    """Labels for GradRegLoss's default base loss, F.cross_entropy(out, y): class indices under the
    rule of ``check_labels`` (F.cross_entropy's ignore_index -100 allowed), or class probabilities
    (floating, shaped like out)."""
    if isinstance(y, torch.Tensor) and y.is_floating_point() and y.shape == out.shape:
        return y
    if isinstance(y, torch.Tensor) and out.dim() > 2 and _integer_classes(y) and y.dim() == out.dim() - 1:
        return y if y.dtype == torch.long else y.long()   # per-position classes (B, d1, ...): F.cross_entropy checks
    return check_labels(y, out.shape[0], "the cross-entropy base loss", num_classes=out.shape[1] if out.dim() > 1
                        else None, ignore_index=-100)


def check_output(out: torch.Tensor, batch: int, kind: str) -> torch.Tensor:
    """The model output as (B, K): classifier penalties need exactly (B, K), others are flattened."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != batch:
        raise ValueError(f"the model output must have the batch size {batch} first, got shape {tuple(out.shape)}")
    spec = kinds.lookup(kind)
    if spec.class_scores and out.dim() != 2:
        raise ValueError(f"penalty {kind!r} is defined on class scores: the model output (logits) must be "
                         f"(B, K), got shape {tuple(out.shape)}")
    if spec.gan and tuple(out.shape) not in ((batch,), (batch, 1)):
        raise ValueError(f"penalty {kind!r} is defined on a discriminator's (critic's) score: the model output "
                         f"must be one score per sample, shape ({batch},) or ({batch}, 1), got shape "
                         f"{tuple(out.shape)}; reduce a patch discriminator's map to one score per sample first")
    if not out.is_floating_point():
        raise TypeError(f"the model output must be floating, got {out.dtype}")
    if out.numel() == 0:
        raise ValueError(f"the model output has no entries per sample (shape {tuple(out.shape)}): its input "
                         "gradient is empty and a penalty on it is undefined; check the model's last layer")
    return out.reshape(batch, -1)


def check_lam(lam) -> float:
    # a str ("0.1") or a bool (True) is a mistake that float() would accept silently
    if isinstance(lam, (bool, str, bytes)) or not isinstance(lam, (numbers.Real, torch.Tensor)) or (
            isinstance(lam, torch.Tensor) and (lam.numel() != 1 or lam.is_complex() or lam.dtype == torch.bool)):
        raise TypeError(f"lam must be a real number (int or float, e.g. lam=0.1), got {lam!r} "
                        f"({type(lam).__name__})")
    value = float(lam)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    return value


REDUCTIONS = ("mean", "sum", "none")
# fd_h, relative to rms(x): below 1e-12 x + t·d rounds to x even in fp64 (and fp32 loses every digit
# far above that: fd checks the step against x's dtype at the call); above 1 the "difference" spans
# more than the inputs' own scale
FD_H_RANGE = (1e-12, 1.0)
FD_SCHEMES = ("central", "forward")   # as gradreg_fast.penalties.estimators.FD_SCHEMES
JVP_KINDS = _methods.JVP_KINDS


def check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(repr(r) for r in REDUCTIONS)} (\"none\": the "
                         f"(B,) per-sample penalties), got {reduction!r}")
    return reduction


def check_gan_options(kind: str, x: torch.Tensor, y=None, fake=None) -> None:
    """The GAN arguments of gr.penalty: ``fake`` (WGAN-GP's generated batch, shaped like x) applies to
    kind='wgan_gp' only and is required there; y does not apply to the GAN kinds."""
    spec = kinds.lookup(kind)
    if spec.gan and y is not None:
        raise ValueError(f"y does not apply to kind={kind!r} (the penalty is on the discriminator's input "
                         "gradient, no labels); for a conditional discriminator pass "
                         "model=lambda x: D(x, labels)")
    if "fake" not in spec.options:
        if fake is not None:
            raise ValueError(f"fake= applies to kind={kinds.owners('fake')} only, not {kind!r} (R2 is "
                             "kind='r1' called on the generated batch: gr.penalty('r1', D, x_fake.detach()))")
        return
    if fake is None:
        raise ValueError(f"kind={kind!r} needs the generated batch: gr.penalty({kind!r}, D, x_real, "
                         "fake=x_fake.detach()); the penalty is taken at random interpolates of the two")
    if not isinstance(fake, torch.Tensor):
        raise TypeError(f"fake must be a torch.Tensor shaped like x, got {type(fake).__name__}")
    if fake.shape != x.shape or fake.dtype != x.dtype or fake.device != x.device:
        raise ValueError(f"fake must match x in shape, dtype and device: x is {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}, fake is {tuple(fake.shape)} {fake.dtype} on {fake.device}")


def _positive_finite(value) -> bool:
    """A real number (not a bool), finite and > 0."""
    return (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
            and value > 0)


def check_penalty_options(kind: str, method: str, *, projection=None, n_proj=1, per_sample=False,
                          generator=None, loss_fn=None, fd_h=None, fd_scheme=None, target_norm=None,
                          one_sided=None) -> None:
    """Every option of gr.penalty / GradRegLoss checked before any work: type, range, and whether it
    applies to this kind and method (an option that would be ignored raises instead)."""
    spec = kinds.lookup(kind)
    if (target_norm is not None or one_sided is not None) and "target_norm" not in spec.options:
        raise ValueError(f"target_norm and one_sided apply to kind={kinds.owners('target_norm')} only, not {kind!r}")
    if target_norm is not None and not _positive_finite(target_norm):
        raise ValueError(f"target_norm must be a finite number > 0 (the gradient norm the critic is pulled "
                         f"to, default 1), got {target_norm!r}")
    if one_sided is not None and not isinstance(one_sided, bool):
        raise TypeError(f"one_sided must be True or False, got {one_sided!r}")
    if isinstance(n_proj, bool) or not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj must be a positive integer (the number of random projections), got {n_proj!r}")
    if n_proj != 1 and "n_proj" not in spec.options and method != "jvp":
        raise ValueError(f"n_proj={n_proj} applies to kind={kinds.owners('n_proj')} and method='jvp' only, not "
                         f"kind={kind!r} with method={method!r}")
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be True or False, got {per_sample!r}")
    if per_sample and "per_sample" not in spec.options:
        raise ValueError(f"per_sample=True applies to kind={kinds.owners('per_sample')} only, not {kind!r}")
    if projection is not None:
        if "projection" not in spec.options:
            raise ValueError(f"projection applies to {kinds.owners('projection')} only, not {kind!r}")
        if not isinstance(projection, torch.Tensor) or not projection.is_floating_point():
            got = projection.dtype if isinstance(projection, torch.Tensor) else type(projection).__name__
            raise TypeError(f"projection must be a floating tensor of shape (K,), (B, K) or (n, B, K), got {got}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None, "
                        f"got {type(generator).__name__}")
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (logits, y) -> per-sample losses, got {type(loss_fn).__name__}")
        if "loss_fn" not in spec.options:
            raise ValueError(f"loss_fn applies to kind={kinds.owners('loss_fn')} only, not {kind!r}")
    if (fd_h is not None or fd_scheme is not None) and method != "fd":
        raise ValueError(f"fd_h and fd_scheme apply to method='fd' only, not method={method!r}")
    if fd_h is not None and not (_positive_finite(fd_h) and FD_H_RANGE[0] <= fd_h <= FD_H_RANGE[1]):
        raise ValueError(f"fd_h must be a number in [{FD_H_RANGE[0]:g}, {FD_H_RANGE[1]:g}] (the step relative to "
                         f"the batch RMS of x, default 1e-3; outside that range the step under- or overflows "
                         f"against the inputs), got {fd_h!r}")
    if fd_scheme is not None and fd_scheme not in FD_SCHEMES:
        raise ValueError(f"fd_scheme must be one of {', '.join(repr(s) for s in FD_SCHEMES)}, got {fd_scheme!r}")
    if method == "jvp" and kind not in JVP_KINDS:
        raise ValueError(f"method='jvp' estimates ‖J‖_F² and serves {', '.join(JVP_KINDS)} only, not "
                         f"{kind!r}; for {kind!r} use method='exact', 'hvp' or 'fd'")


def check_projection(r: torch.Tensor, batch: int, num_outputs: int) -> torch.Tensor:
    """A SpectReg projection as (n, B, K): accepts (K,) shared, (B, K) per sample, (n, B, K)."""
    if not isinstance(r, torch.Tensor) or not r.is_floating_point():
        raise TypeError("projection must be a floating tensor of shape (K,), (B, K) or (n, B, K)")
    if r.shape == (num_outputs,):
        return r.reshape(1, 1, num_outputs).expand(1, batch, num_outputs)
    if r.shape == (batch, num_outputs):
        return r.unsqueeze(0)
    if r.dim() == 3 and r.shape[1:] == (batch, num_outputs):
        return r
    raise ValueError(f"projection has shape {tuple(r.shape)}; with batch size {batch} and {num_outputs} "
                     f"outputs it must be ({num_outputs},) shared, ({batch}, {num_outputs}) per sample or "
                     f"(n, {batch}, {num_outputs}) for n projections")
