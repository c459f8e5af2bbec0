"""The penalty kinds in one table: one ``KindSpec`` row per kind says everything the library knows
about it. ``build_problem`` (core.py), ``functional_penalty``, the checks (_checks.py), ``gr.KINDS`` /
``gr.GAN_KINDS`` and the step benchmark read it; adding a kind is one row here (with its target and
cotangent rules if no existing one fits) plus its ground truth, written independently in
gradreg_fast/reference/penalties.py and gradreg_fast/testing/ground_truth.py (CONTRIBUTING.md).

Every kind is the same computation (docs/method.md): with the model output o = f(x), a per-sample
target u = transform(o) (B, K') and cotangents R (n, B, K'),

    P = scale · mean_i Σ_j ‖ ∂( Σ_b R[j, b] · u(x_b) ) / ∂x_i ‖²

and, for a kind with an outer function φ (WGAN-GP), P_b = φ(s_b) of the per-sample s_b above:

    doubleback     u = ℓ(f(x), y) (B, 1)   R = 1                  scale 1
    spectreg       u = f(x)       (B, K)   R = r (n draws)        scale 1/n
    frobreg        u = f(x)       (B, K)   R = e_1 … e_K          scale 1
    jacreg         u = softmax(f) (B, K)   R = e_1 … e_K          scale 1
    onehot         u = f(x)       (B, K)   R = e_{y_i}            scale 1
    random_onehot  u = f(x)       (B, K)   R = e_{c_i}, c_i ~ U   scale 1
    r1             u = D(x)       (B, 1)   R = 1                  scale 1
    wgan_gp        u = D(x̂)       (B, 1)   R = 1                  scale 1, then φ(s) = (√s − c)²

(spectreg without a given projection: u = the n projections S[b, j] = ⟨r_j[b], f(x_b)⟩ computed
inside the fused projection op, R = e_1 … e_n.)

A leaf of the penalties layer: it imports the ops and the reference (Philox, ``rows``) only, so that
the checks can read it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradreg_fast.ops import cross_entropy, draw_seed, project
from gradreg_fast.reference import philox
from gradreg_fast.reference.ops import rows

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KindArgs:
    """What a kind's target and cotangents are built from; the labels and the projection are checked
    already (the labels by the kind's label rule, the projection as (n, B, K))."""

    batch: int
    device: torch.device
    y: torch.Tensor | None = None
    loss_fn: Callable | None = None
    projection: torch.Tensor | None = None
    n_proj: int = 1
    per_sample: bool = False
    generator: torch.Generator | None = None


# -- targets: u = transform(o), and the same map in composite torch ops (None: transform is composite) --

def default_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy through the fused op (gradreg_fast.ops.cross_entropy): DoubleBack's
    double backward then runs the fused Hessian-vector product instead of autograd's composite."""
    return cross_entropy(out, y if y.dtype == torch.long else y.long())


def projected_outputs(seed: int, n_proj: int, per_sample: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """o -> S (B, n) with S[b, j] = Σ_k r_j[b, k] · o[b, k], r_j ~ N(0, I_K) regenerated from
    (seed, offset j) inside the fused projection op (gradreg_fast.ops.project): no random tensor
    is stored, and the backward regenerates r_j (backend "auto" on small CPU inputs: r_j drawn once
    by the gaussian_like kernel and kept for the backward, see ops.project). One draw (n = 1, the
    default) is a view of the projection, not a stack of one."""
    def transform(o: torch.Tensor) -> torch.Tensor:
        flat = rows(o)
        if n_proj == 1:
            return project(flat, seed, 0, per_sample=per_sample).unsqueeze(1)
        return torch.stack([project(flat, seed, j, per_sample=per_sample) for j in range(n_proj)], dim=1)
    return transform


def projected_outputs_composite(seed: int, n_proj: int, per_sample: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same map as ``projected_outputs`` (the same r_j, from the pure-PyTorch Philox reference)
    in composite torch ops, for torch.func transforms."""
    def transform(o: torch.Tensor) -> torch.Tensor:
        flat = rows(o)
        return torch.stack([philox.project(flat, seed & ((1 << 64) - 1), j, per_sample=per_sample)
                            for j in range(n_proj)], dim=1)
    return transform


def score_target(a: KindArgs) -> tuple[Transform, Transform | None]:
    """u = D's score (B, 1) (with R = 1: G = ∇ₓ Σ_b D(x_b), whose row b is ∇ₓD(x_b))."""
    batch = a.batch
    return (lambda o: o if o.shape == (batch, 1) else o.reshape(batch, 1)), None


def loss_target(a: KindArgs) -> tuple[Transform, Transform | None]:
    """u = the per-sample loss ℓ(o, y) (B, 1): ``loss_fn`` or the fused cross-entropy."""
    batch, y, loss_fn = a.batch, a.y, a.loss_fn
    fn = loss_fn if loss_fn is not None else default_loss

    def transform(o):
        losses = fn(o, y)
        if losses.shape not in ((batch,), (batch, 1)):
            raise ValueError(f"loss_fn must return per-sample losses of shape ({batch},) "
                             f"(e.g. reduction='none'), got shape {tuple(losses.shape)}")
        return losses if losses.dim() == 2 else losses.reshape(batch, 1)
    if loss_fn is None:
        return transform, lambda o: F.cross_entropy(o, y.long(), reduction="none").reshape(batch, 1)
    return transform, None


def projection_target(a: KindArgs) -> tuple[Transform, Transform | None]:
    """u = the outputs (B, K) for a given projection; else the n projections themselves (B, n),
    r_j drawn from a seed of ``generator`` (so that R = e_j makes the VJP of u[:, j] J_iᵀ r_j)."""
    if a.projection is not None:
        return rows, None
    seed = draw_seed(a.generator)
    return (projected_outputs(seed, a.n_proj, bool(a.per_sample)),
            projected_outputs_composite(seed, a.n_proj, bool(a.per_sample)))


def output_target(a: KindArgs) -> tuple[Transform, Transform | None]:
    """u = the outputs, flattened to (B, K)."""
    return rows, None


def softmax_target(a: KindArgs) -> tuple[Transform, Transform | None]:
    """u = softmax(o) (B, K)."""
    return (lambda o: torch.softmax(o, dim=1)), None


def logits_target(a: KindArgs) -> tuple[Transform, Transform | None]:
    """u = the logits as they are (B, K)."""
    return (lambda o: o), None


# -- cotangents: R (n, B, K') and the scale, for outputs ``like`` (B, K) (their dtype, K) --------

def ones_cotangents(a: KindArgs, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """R = 1 (1, B, 1): one scalar target per sample."""
    return torch.ones(1, a.batch, 1, device=a.device, dtype=like.dtype), 1.0


def projection_cotangents(a: KindArgs, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """R = the given projection r (n, B, K), or e_1 … e_n on the projected outputs; scale 1/n."""
    if a.projection is not None:
        R = a.projection.to(device=like.device, dtype=like.dtype)
        return R, 1.0 / R.shape[0]
    n = a.n_proj
    return torch.eye(n, device=a.device, dtype=like.dtype).unsqueeze(1).expand(n, a.batch, n), 1.0 / n


def identity_cotangents(a: KindArgs, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """R = e_1 … e_K (K, B, K): every output."""
    num = like.shape[1]
    return torch.eye(num, device=a.device, dtype=like.dtype).unsqueeze(1).expand(num, a.batch, num), 1.0


def _one_hot(classes: torch.Tensor, num: int, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(classes, num).to(like.dtype).unsqueeze(0)


def label_cotangents(a: KindArgs, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """R = e_{y_i} (1, B, K): the labelled class of each sample."""
    return _one_hot(a.y, like.shape[1], like), 1.0


def random_class_cotangents(a: KindArgs, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """R = e_{c_i} (1, B, K), c_i uniform over the K classes (torch.randint from ``generator``)."""
    num = like.shape[1]
    classes = torch.randint(num, (a.batch,), generator=a.generator, device=a.device)
    return _one_hot(classes, num, like), 1.0


# -- outer functions of the per-sample squared norm -----------------------------------------------

def _safe_sqrt(s: torch.Tensor) -> torch.Tensor:
    """√s with derivative 0 (not inf) at s = 0, so that 0 · ∞ never makes a NaN gradient."""
    pos = s > 0
    return torch.where(pos, torch.where(pos, s, torch.ones_like(s)).sqrt(), torch.zeros_like(s))


def gradient_norm_outer(target_norm: float = 1.0, one_sided: bool = False
                        ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """WGAN-GP's per-sample outer function of the squared gradient norm s = ‖g‖² and its derivative:

        φ(s) = (√s − c)²                  φ′(s) = (√s − c)/√s = 1 − c/√s
        one-sided: φ(s) = max(0, √s − c)²  φ′(s) = max(0, √s − c)/√s

    with c = ``target_norm``. At s = 0 (a zero gradient, where the direction is undefined) φ′ is
    taken as 0, as torch's norm takes the subgradient 0 there."""
    c = float(target_norm)

    def outer(s: torch.Tensor) -> torch.Tensor:
        d = _safe_sqrt(s) - c
        if one_sided:
            d = d.clamp_min(0)
        return d * d

    def outer_grad(s: torch.Tensor) -> torch.Tensor:
        norm = _safe_sqrt(s)
        d = norm - c
        if one_sided:
            d = d.clamp_min(0)
        return torch.where(s > 0, d / torch.where(s > 0, norm, torch.ones_like(norm)), torch.zeros_like(s))
    return outer, outer_grad


def wgan_gp_outer(target_norm: float | None, one_sided: bool | None):
    """WGAN-GP's φ with gr.penalty's defaults: c = 1, two-sided."""
    return gradient_norm_outer(1.0 if target_norm is None else target_norm, bool(one_sided))


# -- the table -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KindSpec:
    name: str
    gan: bool            # a discriminator penalty: one score per sample, (B,) or (B, 1); no labels
    class_scores: bool   # defined on class scores: the model output must be (B, K) exactly
    labels: str | None   # None: takes no labels; "indices": class indices (B,); "loss": the labels of the
                         # per-sample loss (class indices for the default cross-entropy, anything per sample
                         # for a loss_fn)
    options: tuple[str, ...]   # the kind's own options (penalty() keywords) that apply to it and no other
    target: Callable[[KindArgs], tuple[Transform, Transform | None]]   # o -> u, and its composite twin
    cotangents: Callable[[KindArgs, torch.Tensor], tuple[torch.Tensor, float]]   # R and the scale
    outer: Callable | None = None   # (target_norm, one_sided) -> (φ, φ′) of the per-sample s_b; None: P_b = s_b
    # None: functional_penalty serves it; else its error (the fix), formatted with {kind} and {kinds}
    functional_refusal: str | None = None

    def label_indices(self, loss_fn: Callable | None) -> bool:
        """Whether the labels must be class indices (for the rule of _checks.check_labels)."""
        return self.labels == "indices" or (self.labels == "loss" and loss_fn is None)


_GAN_REFUSAL = ("functional_penalty serves the classifier kinds ({kinds}), not the GAN kind {kind!r}: use "
                "gr.penalty({kind!r}, D, x, ...)")

TABLE: dict[str, KindSpec] = {s.name: s for s in (
    KindSpec("doubleback", gan=False, class_scores=True, labels="loss", options=("loss_fn",),
             target=loss_target, cotangents=ones_cotangents),
    KindSpec("spectreg", gan=False, class_scores=False, labels=None, options=("projection", "per_sample", "n_proj"),
             target=projection_target, cotangents=projection_cotangents),
    KindSpec("frobreg", gan=False, class_scores=False, labels=None, options=(),
             target=output_target, cotangents=identity_cotangents),
    KindSpec("jacreg", gan=False, class_scores=True, labels=None, options=(),
             target=softmax_target, cotangents=identity_cotangents),
    KindSpec("onehot", gan=False, class_scores=True, labels="indices", options=(),
             target=logits_target, cotangents=label_cotangents),
    KindSpec("random_onehot", gan=False, class_scores=True, labels=None, options=(),
             target=logits_target, cotangents=random_class_cotangents,
             functional_refusal="functional_penalty has no random draws: for 'random_onehot' pass kind='onehot' "
                                "with y = your random classes (e.g. torch.randint(K, (B,), generator=g))"),
    KindSpec("r1", gan=True, class_scores=False, labels=None, options=(),
             target=score_target, cotangents=ones_cotangents, functional_refusal=_GAN_REFUSAL),
    KindSpec("wgan_gp", gan=True, class_scores=False, labels=None, options=("fake", "target_norm", "one_sided"),
             target=score_target, cotangents=ones_cotangents, outer=wgan_gp_outer,
             functional_refusal=_GAN_REFUSAL),
)}

# the classifier penalties (GradRegLoss and the examples iterate over them) and the GAN discriminator
# penalties (R1/R2, WGAN-GP), in the table's order
KINDS = tuple(n for n, s in TABLE.items() if not s.gan)
GAN_KINDS = tuple(n for n, s in TABLE.items() if s.gan)
ALL_KINDS = KINDS + GAN_KINDS
CLASSIFIER_KINDS = tuple(n for n, s in TABLE.items() if s.class_scores)


def lookup(kind) -> KindSpec:
    """The row of ``kind`` (any case), or the ValueError naming the kinds there are."""
    spec = TABLE.get(kind.lower()) if isinstance(kind, str) else None
    if spec is None:
        raise ValueError(f"unknown penalty kind {kind!r}; choose one of: {', '.join(ALL_KINDS)}")
    return spec


def owners(option: str) -> str:
    """The kinds ``option`` applies to, as the messages name them ("'spectreg'", "'a' or 'b'")."""
    return " or ".join(repr(n) for n, s in TABLE.items() if option in s.options)
