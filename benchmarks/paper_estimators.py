"""Does the estimator matter for training? The paper's MNIST experiment (LeNet, 3000 iterations, weight
decay isolated) with DoubleBack (paper λ ÷ 50) and SpectReg (paper λ) trained by each method.

Reads the MNIST runs (benchmarks/results/paper/mnist_runs.jsonl; the estimator runs are made by
``python benchmarks/paper_mnist.py --sizes N --methods doubleback spectreg --lam-scale doubleback=0.02
--estimator E --iters 3000``) and writes, per (penalty, N), each estimator's accuracy, its paired Δ to
the baseline and to exact on the same seeds (95% t-interval), and its wall-clock per run, plus one plot:

    python benchmarks/paper_estimators.py   # -> benchmarks/results/paper/estimators_table.md, estimators.png
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/: harness, paper
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split
from paper.mnist_report import delta_bars, report_main  # noqa: E402
from paper.mnist_stats import lam_rule, mean_std, paired_delta, paired_stats  # noqa: E402
from paper.mnist_train import ESTIMATORS  # noqa: E402

RESULTS = os.path.join(harness.ROOT, "benchmarks", "results", "paper")
ITERS, WD_MODE = 3000, "isolated"
PENALTIES = {"doubleback": "doubleback (paper λ × 0.02)", "spectreg": "spectreg"}   # method: its λ series


def groups(records: list[dict]) -> tuple[dict, dict]:
    """({(penalty, N): {estimator: {seed: record}}}, {N: {seed: baseline record}}) of the setting."""
    runs: dict = defaultdict(lambda: defaultdict(dict))
    base: dict = defaultdict(dict)
    for r in records:
        if r["iters"] != ITERS or r.get("wd_mode", "isolated") != WD_MODE:
            continue
        if r["method"] == "baseline":
            base[r["N"]][r["seed"]] = r
        elif r["method"] in PENALTIES and lam_rule({**r, "estimator": None}) == PENALTIES[r["method"]]:
            runs[(r["method"], r["N"])][r.get("estimator") or "exact"][r["seed"]] = r
    return runs, base


def table(runs: dict, base: dict) -> tuple[str, list]:
    lines = ["| penalty | N | estimator | test accuracy | Δ vs baseline (pp) | Δ vs exact (pp) | "
             "s per run | ms per step |", "|---|---|---|---|---|---|---|---|"]
    points = []
    for (method, n) in sorted(runs, key=lambda k: (list(PENALTIES).index(k[0]), k[1])):
        by_est = runs[(method, n)]
        if set(by_est) == {"exact"}:
            continue   # a size no other estimator ran at
        exact = by_est.get("exact", {})
        for est in [e for e in ESTIMATORS if e in by_est]:
            rs = by_est[est]
            acc, sd = mean_std([r["test_acc"] for r in rs.values()])
            secs = mean_std([r["time_s"] for r in rs.values()])[0]
            step = mean_std([r["step_ms"] for r in rs.values()])[0]
            vs_exact = "–" if est == "exact" else paired_delta(rs, exact)
            lines.append(f"| {method} | {n} | {est} | {100 * acc:.2f} ± {100 * sd:.2f} (n={len(rs)}) | "
                         f"{paired_delta(rs, base.get(n, {}))} | {vs_exact} | {secs:.0f} | {step:.1f} |")
            stats = paired_stats(rs, base.get(n, {}))
            if stats is not None and stats[2] > 1:
                points.append((f"{method}, N={n}", est, stats))
    return "\n".join(lines), points


def plot(points: list, path: str) -> None:
    delta_bars(points, path, f"MNIST, LeNet, {ITERS} iterations: the penalty's gain by the method that trains it",
               "Δ test accuracy vs baseline (pp), 95% CI", series_order=ESTIMATORS)


def main(argv: list[str] | None = None) -> int:
    return report_main(
        __doc__, RESULTS, argv, "paper_estimators.py", lambda records: table(*groups(records)), plot,
        "The penalty's gain by the method that trains it",
        f"LeNet on N MNIST digits, {ITERS} iterations, weight decay only in its own method; DoubleBack at "
        "the paper's λ ÷ 50, SpectReg at the paper's λ. Paired Δ on the same seeds, 95% t-interval, `*` "
        "when it excludes 0. fd-h1e-4: fd with fd_h = 1e-4 (the default is 1e-3). Wall-clock: one "
        "run on one thread of a shared 2-core VM (a rough figure).", "estimators_table.md", "estimators.png")


if __name__ == "__main__":
    raise SystemExit(main())
