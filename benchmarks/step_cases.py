"""The training steps the step benchmark (bench_step.py) times: each Variant is one model, batch,
penalty and implementation, and make_step builds its step as a zero-argument callable.

    plain   forward, cross-entropy, backward, optimizer step (Adam)
    naive   the same plus the penalty written the obvious way in PyTorch: create_graph=True input
            gradient (a Python loop over the K classes for FrobReg/JacReg), (CE + λ·P).backward()
    ours    gradreg_fast.GradRegLoss(kind, λ, method=..., every=...)(model, x, y).backward()

On a discriminator (models.DISCRIMINATORS) the step is a GAN discriminator step instead (make_gan_step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradreg_fast as gr
from gradreg_fast import _methods
from gradreg_fast.penalties.core import math_attention
from harness.models import DISCRIMINATORS, MODELS, load_model

# the step benchmark times fd on ReLU models (LeNet, the ResNet) on purpose: its cost, not its meaning
warnings.filterwarnings("ignore", category=gr.FDKinkWarning)

# λ of the paper at 2000 MNIST points (SpectReg's also for the others); they do not change the cost
LAMBDAS = {"doubleback": 50.0, "spectreg": 0.03, "frobreg": 0.03, "jacreg": 1.0, "onehot": 0.3,
           "random_onehot": 0.3, "r1": 5.0, "wgan_gp": 10.0}   # r1: γ/2 with γ = 10

# method label -> GradRegLoss keyword arguments
METHODS: dict[str, dict] = {
    "exact": dict(method="exact"),
    "hvp": dict(method="hvp"),
    "fd": dict(method="fd", fd_scheme="central"),
    "fd-forward": dict(method="fd", fd_scheme="forward"),
    "jvp": dict(method="jvp"),
    "exact/every4": dict(method="exact", every=4),
    "exact/fused": dict(method="exact"),   # on gr.fuse(model, activations="all")
    "exact/every16": dict(method="exact", every=16),   # GAN kinds only: StyleGAN2's lazy R1
    # r1 only: D(real) computed once, shared by the loss and the penalty (gr.penalties.penalty_from_output)
    "exact/shared": dict(method="exact"),
}
QUICK_PENALTIES, QUICK_METHODS = "doubleback,frobreg", "exact,hvp,fd,jvp,exact/every4"   # --quick defaults
FUSED = ("exact/fused",)  # method labels that run on the fused copy of the model (shared parameters)


def method_applies(kind: str, label: str) -> bool:
    if kind in gr.GAN_KINDS:
        return label in ("exact", "hvp", "fd", "fd-forward", "exact/every16") or (
            label == "exact/shared" and kind == "r1")
    return label not in ("exact/every16", "exact/shared") and _methods.serves(kind, METHODS[label]["method"])


@dataclasses.dataclass(frozen=True)
class Variant:
    model: str
    batch: int
    penalty: str   # "-" for the plain step
    impl: str      # "plain" | "naive" | "ours"
    method: str    # "-" for plain/naive

    @property
    def key(self) -> str:
        return f"{self.model}|{self.batch}|{self.penalty}|{self.impl}|{self.method}"


def naive_penalty(kind: str, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The obvious PyTorch: create_graph=True gradients, a loop over the classes for FrobReg/JacReg."""
    B = x.shape[0]

    def sq(scalar):
        (g,) = torch.autograd.grad(scalar, x, create_graph=True)
        return g.pow(2).sum() / B

    if kind == "doubleback":
        return sq(F.cross_entropy(out, y, reduction="sum"))
    if kind == "spectreg":
        r = torch.randn(out.shape[1], device=out.device, dtype=out.dtype)
        return sq((out * r).sum())
    if kind == "frobreg":
        return sum(sq(out[:, k].sum()) for k in range(out.shape[1]))
    if kind == "jacreg":
        p = torch.softmax(out, dim=1)
        return sum(sq(p[:, k].sum()) for k in range(p.shape[1]))
    if kind == "onehot":
        return sq(out.gather(1, y[:, None]).sum())
    if kind == "random_onehot":
        c = torch.randint(out.shape[1], (B,), device=out.device)
        return sq(out.gather(1, c[:, None]).sum())
    raise ValueError(kind)


def naive_gan_penalty(kind: str, D: nn.Module, real: torch.Tensor, fake: torch.Tensor):
    """(D(real), penalty) written the obvious way: one create_graph input gradient; for R1 D's forward
    on the real batch is shared with the loss, for WGAN-GP the critic runs on the interpolates."""
    B = real.shape[0]
    if kind == "r1":
        xr = real.detach().requires_grad_(True)
        out = D(xr)
        (g,) = torch.autograd.grad(out.sum(), xr, create_graph=True)
        return out, g.pow(2).sum() / B
    eps = torch.rand(B, 1, 1, 1, device=real.device, dtype=real.dtype)
    xh = (fake + eps * (real - fake)).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(xh).sum(), xh, create_graph=True)
    return D(real), (g.flatten(1).norm(dim=1) - 1).pow(2).mean()


def make_gan_step(v: Variant, D: nn.Module, opt, real: torch.Tensor, amp) -> Callable[[], None]:
    """A discriminator step on a real and a generated batch (a fixed stand-in for G's detached output):
    plain: the non-saturating loss softplus(D(fake)) + softplus(−D(real)); R1 adds λ·‖∇D(real)‖²,
    WGAN-GP uses D(fake) − D(real) + λ·(‖∇D(x̂)‖ − 1)². ours: gr.penalty(kind, D, real, ...)."""
    fake = 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1)).to(real.device)
    lam = LAMBDAS.get(v.penalty, 0.0)
    gen = torch.Generator(device=real.device).manual_seed(2)
    counter = [0]

    def base(out_real, out_fake):
        if v.penalty == "wgan_gp":
            return out_fake.mean() - out_real.mean()
        return F.softplus(out_fake).mean() + F.softplus(-out_real).mean()

    def step():
        opt.zero_grad(set_to_none=True)
        with (torch.autocast(real.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()):
            if v.impl == "plain":
                loss = base(D(real), D(fake))
            elif v.impl == "naive":
                out_real, pen = naive_gan_penalty(v.penalty, D, real, fake)
                loss = base(out_real, D(fake)) + lam * pen
            elif v.method == "exact/shared":   # one forward on the real batch for the loss and the penalty
                xr = real.detach().requires_grad_(True)
                out_real = D(xr)
                pen = gr.penalties.penalty_from_output("r1", out_real, xr, method="exact")
                loss = base(out_real, D(fake)) + lam * pen
            else:
                opts = dict(METHODS[v.method])
                every = opts.pop("every", 1)
                extra = dict(fake=fake, generator=gen) if v.penalty == "wgan_gp" else {}
                pen = gr.penalty(v.penalty, D, real, every=every, step=counter[0], **opts, **extra)
                counter[0] += 1
                loss = base(D(real), D(fake)) + lam * pen
        loss.backward()
        opt.step()
    return step


def make_step(v: Variant, model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, amp) -> Callable[[], None]:
    def ctx():
        return torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    if v.model in DISCRIMINATORS:
        return make_gan_step(v, model, opt, x, amp)
    if v.impl == "plain":
        def step():
            opt.zero_grad(set_to_none=True)
            with ctx():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    elif v.impl == "naive":
        lam = LAMBDAS[v.penalty]

        def step():
            opt.zero_grad(set_to_none=True)
            xr = x.detach().clone().requires_grad_(True)
            # hand-written double backprop needs the twice-differentiable (math) attention kernel too
            with ctx(), math_attention():
                out = model(xr)
                loss = F.cross_entropy(out, y) + lam * naive_penalty(v.penalty, out, xr, y)
            loss.backward()
            opt.step()
    else:
        crit = gr.GradRegLoss(v.penalty, LAMBDAS[v.penalty], **METHODS[v.method])
        net = gr.fuse(model, activations="all") if v.method in FUSED else model

        def step():
            opt.zero_grad(set_to_none=True)
            with ctx():
                loss = crit(net, x, y)
            loss.backward()
            opt.step()
    return step


def calls_per_rep(v: Variant) -> int:
    """Consecutive steps timed as one repetition: k for every=k (one penalty step and k − 1 plain
    ones, so the reported per-step time is the average over the schedule, not the cheap median)."""
    return METHODS[v.method].get("every", 1) if v.impl == "ours" else 1


def variants_for(model_name: str, batch: int, penalties, methods) -> list[Variant]:
    out = [Variant(model_name, batch, "-", "plain", "-")]
    gan = model_name in DISCRIMINATORS   # GAN kinds on discriminators, the classifier kinds on the others
    for kind in [k for k in penalties if (k in gr.GAN_KINDS) == gan]:
        out.append(Variant(model_name, batch, kind, "naive", "-"))
        out += [Variant(model_name, batch, kind, "ours", m) for m in methods if method_applies(kind, m)]
    return out


def setup(model_name: str, batch: int, device: str, input_shape, seed: int = 0):
    torch.manual_seed(seed)
    model = load_model(model_name).to(device).train()
    shape = tuple(input_shape) if input_shape else MODELS[model_name][1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + shape, generator=g).to(device)
    y = torch.randint(10, (batch,), generator=g).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt, x, y
