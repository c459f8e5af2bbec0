"""End-to-end training-step benchmark: what a gradient penalty costs per step, in time and memory.

For each model × batch size × penalty × method it measures, interleaved (one repetition of every
variant, then the next round), median over the rounds:

    plain   forward, cross-entropy, backward, optimizer step (Adam)
    naive   the same plus the penalty written the obvious way in PyTorch: create_graph=True input
            gradient (a Python loop over the K classes for FrobReg/JacReg), (CE + λ·P).backward()
    ours    gradreg_fast.GradRegLoss(kind, λ, method=..., every=...)(model, x, y).backward()
            (every=k: one repetition is k consecutive steps, and the time is their average;
            exact/fused: on gradreg_fast.fuse(model, activations="all"), every activation fused)

and reports each time as a ratio to the plain step and to the naive step of the same penalty, plus
peak memory. Memory: CUDA: torch.cuda.max_memory_allocated over one step (after warm-up), minus the
memory allocated before it. CPU: there is no allocator peak counter (and ru_maxrss is dominated by
the interpreter's and torch's own footprint), so the step runs once more under a TorchDispatchMode
that sees every op output (forward, autograd's backward ops, optimizer) and counts each new tensor
storage until it is freed: the peak of live tensor bytes created during the step, which includes
what autograd saves for the backward and the gradients. By default (--memory exact) plain, naive
and method="exact" are measured.

Usage (from the repository root):

    python benchmarks/bench_step.py                    # the full CPU table (one thread)
    python benchmarks/bench_step.py --quick --out /tmp/r  # seconds, for CI
    python benchmarks/bench_step.py --device cuda --amp bf16   # CUDA events, bf16 autocast
    python benchmarks/bench_step.py --model mypkg.nets:make_net --input-shape 3,32,32 --batch 64
    python benchmarks/bench_step.py --models dcgan_d --batch 64 --tag gan   # a GAN discriminator step

The discriminator step (``--models dcgan_d``, the GAN kinds r1 and wgan_gp only) is the loss on a real
and a generated batch: plain = softplus(D(fake)) + softplus(−D(real)) without penalty; naive = the
penalty by hand (create_graph); ours = gr.penalty(kind, D, real, ...) per method, "exact/every16" =
StyleGAN2's lazy R1, "exact/shared" = R1 through gr.penalties.penalty_from_output on the loss's own
D(real) (one forward of the real batch instead of two).

Outputs: a printed table, and bench_step_<device>[_<tag>].csv/.json/.png under --out
(default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

_ROOT = Path(__file__).resolve().parent.parent
try:
    import gradreg_fast  # noqa: F401  (the installed package, with its built extension)
except ImportError:  # a source checkout with the extension built in place
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import gradreg_fast as gr  # noqa: E402
from gradreg_fast.penalties.core import math_attention  # noqa: E402
from gradreg_fast.testing.zoo import TinyViT  # noqa: E402

# --------------------------------------------------------------------------------------- models


def lenet() -> nn.Module:
    """The paper's LeNet on 1×28×28: conv 6@5×5, maxpool, conv 16@5×5, maxpool, conv 120@4×4,
    FC 84, dropout 0.5, FC 10, ReLU."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 120, 4), nn.ReLU(), nn.Flatten(),
        nn.Linear(120, 84), nn.ReLU(), nn.Dropout(0.5), nn.Linear(84, 10))


def mlp() -> nn.Module:
    """tanh MLP 784-512-512-10 on flat 784-vectors."""
    return nn.Sequential(nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


def resnet(blocks: int = 1, widths: tuple[int, int, int] = (16, 32, 64)) -> nn.Module:
    """A small CIFAR ResNet with BatchNorm: 3 stages × ``blocks`` basic blocks, 3×32×32 input."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        for b in range(blocks):
            layers.append(BasicBlock(c, w, 2 if (b == 0 and i > 0) else 1))
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def dcgan_d() -> nn.Module:
    """A DCGAN discriminator on 3×32×32: strided 4×4 convs 64-128-256 with LeakyReLU(0.2), no
    normalization (WGAN-GP forbids BatchNorm in the critic), a linear score: output (B, 1)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(128, 256, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(256 * 4 * 4, 1))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "dcgan_d": (dcgan_d, (3, 32, 32)),   # a discriminator: GAN kinds (r1, wgan_gp) only, a D step
    "lenet": (lenet, (1, 28, 28)),
    "mlp": (mlp, (784,)),
    "resnet": (resnet, (3, 32, 32)),
    # a small vision transformer: patch conv, LayerNorm, nn.MultiheadAttention, GELU MLP (the zoo's TinyViT)
    "vit": (lambda: TinyViT(k=10, dim=32, heads=4, depth=2, patch=4, image=32), (3, 32, 32)),
}

# λ of the paper at 2000 MNIST points (SpectReg's also for the others); they do not change the cost
LAMBDAS = {"doubleback": 50.0, "spectreg": 0.03, "frobreg": 0.03, "jacreg": 1.0, "onehot": 0.3,
           "random_onehot": 0.3, "r1": 5.0, "wgan_gp": 10.0}   # r1: γ/2 with γ = 10
DISCRIMINATORS = ("dcgan_d",)

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
JVP_ONLY = ("frobreg", "jacreg")


def method_applies(kind: str, label: str) -> bool:
    if kind in gr.GAN_KINDS:
        return label in ("exact", "hvp", "fd", "fd-forward", "exact/every16") or (
            label == "exact/shared" and kind == "r1")
    return label not in ("exact/every16", "exact/shared") and (label != "jvp" or kind in JVP_ONLY)


def load_model(spec: str) -> nn.Module:
    if spec in MODELS:
        return MODELS[spec][0]()
    if ":" not in spec:
        raise ValueError(f"--model {spec!r}: give one of {sorted(MODELS)} or module:callable")
    module, name = spec.split(":", 1)
    factory = getattr(importlib.import_module(module), name)
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {spec}: {name}() must return an nn.Module, got {type(model).__name__}")
    return model


# --------------------------------------------------------------------------------------- steps


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


# --------------------------------------------------------------------------------------- timing


def time_group(variants: list[Variant], device: str, reps: int, warmup: int, input_shape, amp, progress,
               refused: dict) -> dict:
    """Median seconds per variant, repetitions interleaved across the variants of one model/batch.
    A variant the library refuses for this model (a ValueError naming the method that works, e.g.
    jvp with batch statistics) is not timed: its key and the reason go into ``refused``."""
    v0 = variants[0]
    model, opt, x, y = setup(v0.model, v0.batch, device, input_shape)
    steps = {v.key: make_step(v, model, opt, x, y, amp) for v in variants}
    calls = {v.key: calls_per_rep(v) for v in variants}
    for k, fn in list(steps.items()):
        try:
            fn()   # the first warm-up step; a refusal shows here
        except ValueError as exc:
            refused[k] = str(exc).splitlines()[0]
            del steps[k]
            progress.update(reps)
    for fn in steps.values():
        for _ in range(max(0, warmup - 1)):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    cuda = device.startswith("cuda")
    for _ in range(reps):
        for k, fn in steps.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls[k]):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times[k].append(start.elapsed_time(end) / 1e3 / calls[k])
            else:
                t = time.perf_counter()
                for _ in range(calls[k]):
                    fn()
                times[k].append((time.perf_counter() - t) / calls[k])
            progress.update(1)
    return {k: statistics.median(t) for k, t in times.items()}


def memory_cuda(v: Variant, device: str, input_shape, amp) -> float:
    model, opt, x, y = setup(v.model, v.batch, device, input_shape)
    step = make_step(v, model, opt, x, y, amp)
    step()
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(calls_per_rep(v)):
        step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the storages created under this mode.

    Every op output (forward, the autograd engine's backward ops, the optimizer's) is seen by the
    dispatcher; each new storage is counted until it is freed (a weak reference to the storage
    expires), so tensors autograd saves for the backward count for as long as they live.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _sweep(self):
        for ptr, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_meta:
                try:
                    st = t.untyped_storage()
                    ptr = st.data_ptr()
                except RuntimeError:  # opaque tensors (e.g. mkldnn) have no inspectable storage
                    continue
                if ptr and ptr not in self.live:
                    self.live[ptr] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def memory_tensors(v: Variant, device: str, input_shape, amp) -> float:
    """MiB: peak live tensor storage created during one step (after two warm-up steps)."""
    model, opt, x, y = setup(v.model, v.batch, device, input_shape)
    step = make_step(v, model, opt, x, y, amp)
    step()
    step()
    mode = LiveTensorBytes()
    with mode:
        for _ in range(calls_per_rep(v)):   # every=k: the k calls of one schedule period
            step()
    return mode.peak / 2**20


# --------------------------------------------------------------------------------------- report


def build_rows(variants: list[Variant], times: dict, memory: dict) -> list[dict]:
    rows = []
    for v in variants:
        plain = times[Variant(v.model, v.batch, "-", "plain", "-").key]
        naive_key = Variant(v.model, v.batch, v.penalty, "naive", "-").key
        naive = times.get(naive_key)
        mem = memory.get(v.key)
        naive_mem = memory.get(naive_key)
        rows.append(dict(
            model=v.model, batch=v.batch, penalty=v.penalty, impl=v.impl, method=v.method,
            ms=round(times[v.key] * 1e3, 3),
            x_plain=round(times[v.key] / plain, 3),
            x_naive=round(times[v.key] / naive, 3) if naive and v.impl == "ours" else None,
            peak_mib=round(mem, 2) if mem is not None else None,
            mem_x_naive=(round(mem / naive_mem, 3) if mem is not None and naive_mem and v.impl == "ours"
                         else None)))
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'model':8} {'batch':>5} {'penalty':13} {'impl':5} {'method':13} {'ms':>9} {'x plain':>8} " \
           f"{'x naive':>8} {'peak MiB':>9} {'mem/naive':>9}"
    lines = [head, "-" * len(head)]
    fmt = lambda v, f: (format(v, f) if v is not None else "-")  # noqa: E731
    for r in rows:
        lines.append(f"{r['model']:8} {r['batch']:>5} {r['penalty']:13} {r['impl']:5} {r['method']:13} "
                     f"{r['ms']:>9.2f} {r['x_plain']:>8.2f} {fmt(r['x_naive'], '>8.2f'):>8} "
                     f"{fmt(r['peak_mib'], '>9.1f'):>9} {fmt(r['mem_x_naive'], '>9.2f'):>9}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda t: (t[0], t[1]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(14, 3.2 * len(groups)), squeeze=False)
    for ax, (m, b) in zip(axes[:, 0], groups):
        sel = [r for r in rows if r["model"] == m and r["batch"] == b and r["impl"] != "plain"]
        labels = [f"{r['penalty']}\n{r['method'] if r['impl'] == 'ours' else 'naive'}" for r in sel]
        colors = ["tab:gray" if r["impl"] == "naive" else "tab:blue" for r in sel]
        ax.bar(range(len(sel)), [r["x_plain"] for r in sel], color=colors)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.2, color="tab:red", lw=0.8, ls="--")
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_ylabel("× plain step")
        ax.set_title(f"{m}, batch {b} (gray: naive PyTorch, blue: gradreg_fast; red: 2.2×)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (CUDA events, max_memory_allocated); default: cuda when a GPU is visible")
    ap.add_argument("--models", default="lenet,mlp,resnet,vit", help="comma list of lenet, mlp, resnet, vit")
    ap.add_argument("--model", default=None, help="a user model as module:callable (replaces --models)")
    ap.add_argument("--input-shape", default=None, help="per-sample input shape for --model, e.g. 3,32,32")
    ap.add_argument("--batch", default="50", help="comma list of batch sizes (the paper's 50 by default; e.g. 50,256)")
    ap.add_argument("--penalties", default=None, help=f"comma list of {', '.join(gr.KINDS)} (default: all; "
                    f"--quick: {QUICK_PENALTIES}); {', '.join(gr.GAN_KINDS)} on --models dcgan_d (a D step)")
    ap.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default: all; "
                    f"--quick: {QUICK_METHODS})")
    ap.add_argument("--reps", type=int, default=11, help="interleaved repetitions (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype")
    ap.add_argument("--memory", default=None, choices=["none", "exact", "all"],
                    help="peak memory of: no variant / plain, naive and exact (default; none with "
                         "--quick) / every variant")
    ap.add_argument("--quick", action="store_true", help="seconds: LeNet batch 16, 3 reps, a few variants")
    ap.add_argument("--smoke", action="store_true",
                    help="every default (model x penalty x method) cell once at batch 2, no timing claims: "
                         "a crash in any cell fails (CI)")
    ap.add_argument("--out", default=str(_ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.smoke:   # every cell of the default run, once, tiny
        args.batch, args.reps, args.warmup = "2", 1, 0
        args.memory = args.memory or "none"
        args.tag = args.tag or "smoke"
    if args.quick:   # small sizes; penalties and methods given on the command line are kept
        args.models, args.batch, args.reps, args.warmup = "lenet", "16", 3, 1
        args.penalties = args.penalties or QUICK_PENALTIES
        args.methods = args.methods or QUICK_METHODS
        args.memory = args.memory or "none"
        args.tag = args.tag or "quick"
    args.penalties = args.penalties or ",".join(gr.KINDS + gr.GAN_KINDS)   # each on its own models
    args.methods = args.methods or ",".join(METHODS)
    args.memory = args.memory or "exact"
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    ext = gr.backends()["cuda" if device.startswith("cuda") else "cpp"]
    if os.environ.get("GRADREG_REQUIRE_EXT") == "1" and not ext.available:
        raise SystemExit(f"GRADREG_REQUIRE_EXT=1 but the compiled kernels are unavailable: {ext.reason} "
                         f"(gradreg_fast from {gr.__file__})")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    input_shape = [int(s) for s in args.input_shape.split(",")] if args.input_shape else None
    if args.model and input_shape is None:
        raise SystemExit("--model module:callable needs --input-shape (per sample, e.g. 3,32,32)")
    models = [args.model] if args.model else args.models.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    penalties = [gr.penalties.check_kind(k) for k in args.penalties.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")

    groups = [variants_for(m, b, penalties, methods) for m in models for b in batches]
    total = sum(len(g) for g in groups) * args.reps
    try:
        from tqdm import tqdm
        progress = tqdm(total=total, desc="bench_step", unit="step", file=sys.stderr)
    except ImportError:  # the progress bar is optional
        progress = type("NoBar", (), {"update": lambda self, n: None, "close": lambda self: None})()
    times, memory, refused = {}, {}, {}
    for group in groups:
        times.update(time_group(group, device, args.reps, args.warmup, input_shape, amp, progress, refused))
    progress.close()
    groups = [[v for v in g if v.key not in refused] for g in groups]
    for k, why in refused.items():
        print(f"refused (not timed): {k}: {why}")
    if args.memory != "none":
        for group in groups:
            for v in group:
                if args.memory == "exact" and v.impl == "ours" and v.method != "exact":
                    continue
                memory[v.key] = (memory_cuda(v, device, input_shape, amp) if device.startswith("cuda")
                                 else memory_tensors(v, device, input_shape, amp))
    variants = [v for g in groups for v in g]
    rows = build_rows(variants, times, memory)
    table = format_table(rows)
    print(table)

    backends = {name: st.available for name, st in gr.backends().items()}
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    meta = dict(command="python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                device=device, device_name=dev_name, threads=args.threads if device == "cpu" else None,
                amp=args.amp, torch=torch.__version__, reps=args.reps, gradreg_fast=gr.__file__,
                backends=backends, refused=refused,
                memory=("cuda max_memory_allocated growth over one step" if device.startswith("cuda") else
                        "peak live tensor storage created during one step (TorchDispatchMode accounting)"),
                load_average=os.getloadavg(), time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_step_{device.split(':')[0]}" + (f"_{args.tag}" if args.tag else "")
    with open(out / f"{stem}.json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(out / f"{stem}.csv", "w") as f:
        cols = list(rows[0])
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join("" if r[c] is None else str(r[c]) for c in cols) + "\n")
    with open(out / f"{stem}.txt", "w") as f:
        f.write(f"# {meta['command']}\n# {dev_name}, torch {torch.__version__}, load {meta['load_average']}\n")
        f.write(f"# backends available: {', '.join(n for n, ok in backends.items() if ok)}\n")
        f.write(table + "\n")
    try:
        plot(rows, out / f"{stem}.png", f"gradreg_fast step cost on {dev_name} ({meta['time']})")
    except ImportError:
        print("matplotlib is not installed: no PNG chart (pip install matplotlib)", file=sys.stderr)
    print(f"wrote {out / stem}.{{json,csv,txt,png}}")
    return rows


if __name__ == "__main__":
    main()
