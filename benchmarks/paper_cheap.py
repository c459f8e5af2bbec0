"""The paper's gain for less: how much of exact's accuracy gain do the cheap recipes keep?

The paper's MNIST experiment (LeNet, N = 2000, 3000 iterations, weight decay isolated, 10 seeds) for
DoubleBack (paper λ ÷ 50) and JacReg (paper λ), each trained by exact double backprop on a schedule
(every = 2, 4, 8, 16: the penalty on one step in k, times k; with StyleGAN2's optimizer correction
c = k/(k+1) for k = 4, 8), on a sub-batch (subsample = 0.5, 0.25), both (every 4 on half the batch),
and for JacReg by jvp with 1 and 4 projections. Every run is paired with the exact run of the same
seed (same initial weights and minibatch order; the committed exact runs are reused) and with the
baseline of that seed.

    python benchmarks/paper_cheap.py --run            # the runs (resumable; seed by seed over every recipe)
    python benchmarks/paper_cheap.py                  # table + plot from the JSONL and the step benchmark

The runs append to benchmarks/results/paper/mnist_runs.jsonl like every paper run (the recipe is the
record's ``estimator``). The step cost of each recipe (× a plain step, the same LeNet and batch)
comes from ``benchmarks/results/paper/cheap_steps.json``, written by ``--steps`` (side by side in one
process, one thread).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/: harness, paper
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split
import torch  # noqa: E402

from paper.mnist_data import TABLE_N  # noqa: E402
from paper.mnist_train import RunConfig, run_sweep  # noqa: E402

RESULTS_DIR = os.path.join(harness.ROOT, "benchmarks", "results", "paper")
RUNS = os.path.join(RESULTS_DIR, "mnist_runs.jsonl")
ITERS, WD_MODE = 3000, "isolated"
SCHEDULES = ("every2", "every4", "every8", "every16", "sub0.5", "sub0.25", "every4-sub0.5",
             "every4-c", "every8-c")
RECIPES = {"doubleback": SCHEDULES, "jacreg": SCHEDULES + ("jvp1", "jvp4")}
LAM_SCALE = {"doubleback": 0.02, "jacreg": 1.0}   # DoubleBack at the paper's λ ÷ 50 (see paper_estimators)


def planned(seeds) -> list[RunConfig]:
    """Seed by seed, DoubleBack's recipes (cheap) before JacReg's, so a partial sweep has every recipe
    at its first seeds."""
    runs = []
    for s in seeds:
        for method, recipes in RECIPES.items():
            for est in recipes:
                runs.append(RunConfig(method, TABLE_N, s, ITERS, WD_MODE, lam_scale=LAM_SCALE[method],
                                      estimator=est))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="train the missing runs (resumable)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--results", default=RUNS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.run:
        run_sweep(planned(a.seeds), a.results, progress=not a.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
