"""A toy GAN on a ring of 8 Gaussians, trained with lazy R1 (every=16) and with WGAN-GP, on the CPU.

    python examples/gan_toy.py                       # both penalties, full run, plots + report
    python examples/gan_toy.py --penalties r1 --steps 600 --no-plot

Data: 8 isotropic Gaussians (σ = ``SIGMA``) with means on a circle of radius 2. A sample is of
high quality when it lies within 3σ of a mode's mean; a mode is covered when at least 1% of the
2000 generated samples lie within 3σ of it. Reported per run: modes covered (of 8) and the share of
high-quality samples.

- R1 (Mescheder et al. 2018): non-saturating GAN loss, discriminator loss + γ/2 · ‖∇ₓD(x_real)‖²,
  applied lazily as in StyleGAN2: ``gr.penalty("r1", D, real, every=16, step=t)`` is 16·P on
  steps t % 16 == 0 and 0 otherwise.
- WGAN-GP (Gulrajani et al. 2017): critic loss D(fake) − D(real) + λ (‖∇D(x̂)‖ − 1)² at random
  interpolates, ``gr.penalty("wgan_gp", D, real, fake=fake, generator=g)``, λ = 10, 5 critic
  steps per generator step.

Everything is seeded (torch.manual_seed and the generators), one thread, so a run repeats bit for bit
on the same machine and torch version.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import gradreg_fast as gr  # the installed package, with its built extension
except ImportError:  # a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gradreg_fast as gr

MODES = 8
RADIUS = 2.0
SIGMA = 0.05
Z_DIM = 8
N_EVAL = 2000
COVER_FRACTION = 0.01
OUT_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gan"


def centers(dtype=torch.float32) -> torch.Tensor:
    angles = torch.arange(MODES, dtype=torch.float64) * (2 * math.pi / MODES)
    return (RADIUS * torch.stack([angles.cos(), angles.sin()], 1)).to(dtype)


def sample_real(n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(MODES, (n,), generator=gen)
    return centers()[idx] + SIGMA * torch.randn(n, 2, generator=gen)


def mlp(d_in: int, d_out: int, width: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2),
                         nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, d_out))


def evaluate(samples: torch.Tensor) -> dict:
    """Modes covered (≥ 1% of the samples within 3σ of the mode) and the share within 3σ of any mode."""
    dist = torch.cdist(samples.double(), centers(torch.float64))        # (N, 8)
    nearest, which = dist.min(1)
    good = nearest <= 3 * SIGMA
    per_mode = torch.bincount(which[good], minlength=MODES)
    covered = int((per_mode >= COVER_FRACTION * samples.shape[0]).sum())
    return {"modes_covered": covered, "high_quality": float(good.double().mean()),
            "per_mode": per_mode.tolist()}


def train(penalty: str, steps: int, seed: int = 0, batch: int = 256, log_every: int = 0) -> tuple[nn.Module, dict]:
    """Train G and D with ``penalty`` ("r1" or "wgan_gp"); returns G and the evaluation of 2000 samples."""
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(1000 + seed)
    pen_gen = torch.Generator().manual_seed(2000 + seed)
    G, D = mlp(Z_DIM, 2), mlp(2, 1)
    if penalty == "r1":
        opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.99))
        opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.99))
        gamma, every, d_steps = 1.0, 16, 1
    elif penalty == "wgan_gp":
        opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.9))
        lam, d_steps = 10.0, 5
    else:
        raise ValueError(f"penalty must be 'r1' or 'wgan_gp', got {penalty!r}")
    d_calls = 0
    for step in range(steps):
        for _ in range(d_steps):
            real = sample_real(batch, data_gen)
            with torch.no_grad():
                fake = G(torch.randn(batch, Z_DIM, generator=data_gen))
            opt_d.zero_grad(set_to_none=True)
            if penalty == "r1":
                loss_d = F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
                # lazy R1: 16·‖∇D(real)‖² on one D step in 16, 0 (no work) on the others
                loss_d = loss_d + 0.5 * gamma * gr.penalty("r1", D, real, every=every, step=d_calls)
            else:
                loss_d = D(fake).mean() - D(real).mean()
                loss_d = loss_d + lam * gr.penalty("wgan_gp", D, real, fake=fake, generator=pen_gen)
            loss_d.backward()
            opt_d.step()
            d_calls += 1
        opt_g.zero_grad(set_to_none=True)
        score = D(G(torch.randn(batch, Z_DIM, generator=data_gen)))
        loss_g = F.softplus(-score).mean() if penalty == "r1" else -score.mean()
        loss_g.backward()
        opt_g.step()
        if log_every and (step + 1) % log_every == 0:
            with torch.no_grad():
                m = evaluate(G(torch.randn(N_EVAL, Z_DIM, generator=torch.Generator().manual_seed(7))))
            print(f"  {penalty} step {step + 1}: modes {m['modes_covered']}/8, high quality "
                  f"{m['high_quality']:.1%}", flush=True)
    with torch.no_grad():
        samples = G(torch.randn(N_EVAL, Z_DIM, generator=torch.Generator().manual_seed(12345)))
    result = evaluate(samples)
    result["samples"] = samples
    return G, result


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2), squeeze=False)
    c = centers().numpy()
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        s = r["samples"].numpy()
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.4, label="generated")
        ax.scatter(c[:, 0], c[:, 1], s=30, c="red", marker="x", label="mode means")
        ax.set_title(f"{name}: {r['modes_covered']}/8 modes, {r['high_quality']:.0%} within 3σ", fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    axes[0][0].legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--penalties", default="r1,wgan_gp")
    ap.add_argument("--steps", type=int, default=None, help="generator steps (default: r1 6000, wgan_gp 4000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", default=str(OUT_DIR), help="folder for gan_toy.png and gan_toy.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    default_steps = {"r1": 6000, "wgan_gp": 4000}
    results = {}
    for name in a.penalties.split(","):
        steps = a.steps if a.steps is not None else default_steps[name]
        t0 = time.perf_counter()
        _, r = train(name, steps, seed=a.seed, log_every=a.log_every)
        r["seconds"] = time.perf_counter() - t0
        r["steps"] = steps
        results[name] = r
        print(f"{name:8s} {steps} generator steps, {r['seconds']:.0f} s: modes covered {r['modes_covered']}/8, "
              f"high-quality samples (within 3σ of a mode) {r['high_quality']:.1%}, per mode {r['per_mode']}",
              flush=True)
    if not a.no_plot:
        out = Path(a.out)
        plot(results, out / "gan_toy.png")
        with open(out / "gan_toy.json", "w") as f:
            json.dump({k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in results.items()}
                      | {"command": " ".join(["python examples/gan_toy.py"] + list(argv if argv is not None
                                                                                 else sys.argv[1:])),
                         "sigma": SIGMA, "torch": torch.__version__}, f, indent=1)
        print(f"wrote {out / 'gan_toy.png'} and {out / 'gan_toy.json'}")
    return results


if __name__ == "__main__":
    main()
