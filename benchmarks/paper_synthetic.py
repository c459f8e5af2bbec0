"""The paper's synthetic experiment (Varga et al., 2017; docs/method.md): 1-D regression with and without SpectReg.

y = sin(5x) + N(0, 0.1²), 100 training points, x ~ U(-1, 1); a 5-layer ReLU MLP of width 64
(Linear 1→64, three Linear 64→64, Linear 64→1, ReLU between), L2 loss (mean squared error), full
batch, Adam lr 0.01, 10000 iterations (settable). SpectReg for a scalar output is
mean_i ‖r · ∂f(x_i)/∂x_i‖² with one r ~ N(0, 1) per step, i.e. a randomly scaled squared slope
penalty at the training points (gradreg_fast.GradRegLoss("spectreg", lam, base=mse, method="exact")).

The paper gives no λ for this experiment: this script tries a grid (default 0 = unregularized,
1e-5, 1e-4, 1e-3, 1e-2) and reports, for each λ and seed, the test MSE against the noiseless
truth sin(5x) on a dense grid of 2001 points in [-1, 1], plus the training MSE. Outputs under
benchmarks/results/paper/: synthetic.json, synthetic.md and synthetic_fits.png (the fits of seed 0
against the truth and the training points).

    python benchmarks/paper_synthetic.py                 # the default grid, seeds 0-9, 10000 iterations
    python benchmarks/paper_synthetic.py --quick         # seconds
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/: harness
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import gradreg_fast as gr  # noqa: E402
from harness.results import pyplot, save_figure, write_json, write_text  # noqa: E402
from paper.mnist_stats import t_quantile  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(HERE, "results", "paper")
LAMBDAS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)


def make_data(seed: int, n: int = 100, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 2 - 1
    y = torch.sin(5 * x) + noise * torch.randn(n, 1, generator=g)
    return x, y


def mlp(width: int = 64, layers: int = 5) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(1, width), nn.ReLU()]
    for _ in range(layers - 2):
        mods += [nn.Linear(width, width), nn.ReLU()]
    mods.append(nn.Linear(width, 1))
    return nn.Sequential(*mods)


def fit(lam: float, seed: int, iters: int, lr: float = 0.01) -> tuple[nn.Module, dict]:
    x, y = make_data(seed)
    torch.manual_seed(seed)                  # same initial weights for every λ of one seed
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    crit = gr.GradRegLoss("spectreg", lam=lam, base=F.mse_loss, method="exact")
    t0 = time.perf_counter()
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        loss = crit(model, x, y)
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    grid = torch.linspace(-1, 1, 2001).unsqueeze(1)
    with torch.no_grad():
        test_mse = float(F.mse_loss(model(grid), torch.sin(5 * grid)))
        train_mse = float(F.mse_loss(model(x), y))
        train_mse_truth = float(F.mse_loss(model(x), torch.sin(5 * x)))
    return model, {"lam": lam, "seed": seed, "iters": iters, "test_mse": test_mse, "train_mse": train_mse,
                   "train_mse_vs_truth": train_mse_truth, "time_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lams", nargs="+", type=float, default=list(LAMBDAS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--iters", type=int, default=10000)
    p.add_argument("--out-dir", default=DEFAULT_DIR)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's setting)")
    p.add_argument("--quick", action="store_true", help="λ 0 and 1e-3, seed 0, 200 iterations")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.lams, a.seeds, a.iters = [0.0, 1e-3], [0], min(a.iters, 200)
    os.makedirs(a.out_dir, exist_ok=True)
    rows, fits = [], {}
    for seed in a.seeds:
        for lam in a.lams:
            model, rec = fit(lam, seed, a.iters)
            rows.append(rec)
            if seed == a.seeds[0]:
                fits[lam] = model
            print(f"λ={lam:g} seed={seed}: test MSE {rec['test_mse']:.4f}, train MSE {rec['train_mse']:.4f} "
                  f"({rec['time_s']:.0f} s)", flush=True)
    meta = {"task": "y = sin(5x) + N(0, 0.1^2), 100 points, x ~ U(-1, 1)", "model": "5-layer ReLU MLP, width 64",
            "optimizer": "Adam lr 0.01, full batch", "iters": a.iters,
            "test": "MSE against sin(5x) on 2001 evenly spaced points in [-1, 1]",
            "versions": {"torch": torch.__version__, "gradreg_fast": gr.__version__}}
    write_json(os.path.join(a.out_dir, "synthetic.json"), {"meta": meta, "runs": rows})
    lines = ["# Synthetic 1-D regression: SpectReg λ against test error", "",
             f"y = sin(5x) + N(0, 0.1²), 100 training points, x ~ U(-1, 1); 5-layer ReLU MLP of width 64, "
             f"MSE loss, Adam 0.01 full batch, {a.iters} iterations, exact SpectReg (one r ~ N(0,1) per step). "
             "Test MSE: against the noiseless sin(5x) on 2001 grid points in [-1, 1]. The training data and "
             "the initial weights depend on the seed only (paired across λ). The noise floor of the training "
             "MSE is 0.01.", "",
             "MSE ratio: test MSE at λ over test MSE without penalty on the same seed, geometric mean over "
             "the seeds with the 95% t-interval of the mean log ratio (below 1: SpectReg fits the truth better).",
             "", "| λ | seeds | test MSE mean | MSE ratio vs λ = 0 [95% CI] | per seed | train MSE mean |",
             "|---|---|---|---|---|---|"]
    plain = {r["seed"]: r["test_mse"] for r in rows if r["lam"] == 0}
    for lam in a.lams:
        rs = [r for r in rows if r["lam"] == lam]
        lines.append(f"| {lam:g} | {len(rs)} | {np.mean([r['test_mse'] for r in rs]):.4f} | "
                     f"{'–' if lam == 0 else mse_ratio(rs, plain)} | "
                     + ", ".join(f"{r['test_mse']:.4f}" for r in rs)
                     + f" | {np.mean([r['train_mse'] for r in rs]):.4f} |")
    md = "\n".join(lines) + "\n"
    write_text(os.path.join(a.out_dir, "synthetic.md"), md)
    print(md)
    _plot(fits, a.seeds[0], os.path.join(a.out_dir, "synthetic_fits.png"), a.iters)
    return 0


def mse_ratio(rs: list[dict], plain: dict) -> str:
    """Geometric mean of test MSE(λ) / test MSE(0) over the seeds both have, with the 95% t-interval of
    the mean log ratio, as text."""
    logs = np.log([r["test_mse"] / plain[r["seed"]] for r in rs if r["seed"] in plain])
    if len(logs) < 2:
        return f"{np.exp(logs.mean()):.2f} (n={len(logs)})" if len(logs) else "–"
    half = t_quantile(len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs))
    return f"{np.exp(logs.mean()):.2f} [{np.exp(logs.mean() - half):.2f}, {np.exp(logs.mean() + half):.2f}]"


def _plot(fits: dict, seed: int, path: str, iters: int) -> None:
    plt = pyplot("paper_synthetic: matplotlib not installed, no plot")
    if plt is None:
        return
    x, y = make_data(seed)
    grid = torch.linspace(-1, 1, 2001).unsqueeze(1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(grid, torch.sin(5 * grid), "k--", lw=1.5, label="truth sin(5x)")
    ax.scatter(x, y, s=10, c="k", alpha=0.6, label="training points")
    for lam, model in fits.items():
        with torch.no_grad():
            pred = model(grid)
        mse = float(F.mse_loss(pred, torch.sin(5 * grid)))
        ax.plot(grid, pred, lw=1.2, label=f"{'no penalty' if lam == 0 else f'SpectReg λ={lam:g}'} "
                                          f"(test MSE {mse:.3f})")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"5-layer ReLU MLP, {iters} Adam steps, seed {seed}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
