"""The paper's recipe against ours at N = 2000: 3000 vs 10000 iterations, weight decay only in the
'weightdecay' method (--wd-mode isolated) vs in every method (--wd-mode all).

Reads the MNIST runs (benchmarks/results/paper/mnist_runs.jsonl, written by paper_mnist.py) and writes
a table of paired Δ test accuracy (method − reference on the same seeds, 95% t-interval) per setting,
and one plot:

    python benchmarks/paper_recipe.py      # -> benchmarks/results/paper/recipe_table.md, recipe_deltas.png

In the 'all' setting every method except the baseline carries weight decay 5e-4, so each penalty is
compared twice: with the plain baseline (penalty and weight decay together) and with 'weightdecay'
(the baseline with the same weight decay: the penalty's own effect on top of it).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/: harness, paper
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split
from harness.results import pyplot, save_figure  # noqa: E402
from paper.mnist_data import TABLE_N  # noqa: E402
from paper.mnist_stats import label, paired_delta, paired_stats  # noqa: E402
from paper.mnist_train import read_results  # noqa: E402

RESULTS = os.path.join(harness.ROOT, "benchmarks", "results", "paper")
SETTINGS = ((3000, "isolated"), (10000, "isolated"), (10000, "all"))
FAR = 0.05   # rows whose |Δ| exceeds 5 pp are left out of the plot (they are in the table)
ORDER = ("spectreg", "doubleback", "jacreg", "cp", "weightdecay", "frobreg", "onehot")


def by_setting(records: list[dict]) -> dict:
    """{(iters, wd_mode): {row label: {seed: record}}} at N = 2000."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["N"] == TABLE_N:
            out[(r["iters"], r.get("wd_mode", "isolated"))][label(r)][r["seed"]] = r
    return out


def table(groups: dict) -> tuple[str, list]:
    rows = sorted({lab for s in SETTINGS for lab in groups.get(s, {}) if lab != "baseline"},
                  key=lambda lab: (next((i for i, m in enumerate(ORDER) if lab.startswith(m)), 99), lab))
    cols = [(s, "baseline") for s in SETTINGS] + [((10000, "all"), "weightdecay")]
    head = [f"{it} it, wd {mode}, vs {ref}" for (it, mode), ref in cols]
    lines = ["| Δ test accuracy (pp), N = 2000 | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    base_line = []
    for (it, mode), ref in cols:
        base = groups.get((it, mode), {}).get(ref, {})
        acc = [r["test_acc"] for r in base.values()]
        base_line.append(f"{100 * sum(acc) / len(acc):.2f}% (n={len(acc)})" if acc else "–")
    lines.append("| reference accuracy | " + " | ".join(base_line) + " |")
    points = []
    for lab in rows:
        cells = []
        for (it, mode), ref in cols:
            g = groups.get((it, mode), {})
            stats = None if lab == ref or lab not in g or ref not in g else paired_stats(g[lab], g[ref])
            cells.append("–" if stats is None else paired_delta(g[lab], g[ref]))
            if stats is not None and stats[2] > 1:
                points.append((lab, f"{it}/{mode}/vs {ref}", stats))
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines), points


def plot(points: list, path: str) -> None:
    plt = pyplot("paper_recipe: matplotlib is not installed, no plot")
    far = sorted({p[0] for p in points if abs(p[2][0]) > FAR})   # off the scale of the others
    points = [p for p in points if p[0] not in far]
    if plt is None or not points:
        return
    labels = sorted({p[0] for p in points}, key=lambda lab: [p[0] for p in points].index(lab))
    settings = list(dict.fromkeys(p[1] for p in points))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(settings)
    for i, s in enumerate(settings):
        xs, ys, es = [], [], []
        for j, lab in enumerate(labels):
            for p in points:
                if p[0] == lab and p[1] == s:
                    xs.append(j + (i - (len(settings) - 1) / 2) * width)
                    ys.append(100 * p[2][0])
                    es.append(100 * p[2][1])
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=s)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=15)
    ax.set_ylabel("Δ test accuracy (pp), 95% CI")
    ax.set_title("MNIST N = 2000, LeNet: paired Δ per recipe"
                 + (f" (left out, |Δ| > {100 * FAR:g} pp: {', '.join(far)})" if far else ""), fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=os.path.join(RESULTS, "mnist_runs.jsonl"))
    ap.add_argument("--out-dir", default=RESULTS)
    a = ap.parse_args(argv)
    text, points = table(by_setting(read_results(a.results)))
    md = ("<!-- generated by: python benchmarks/paper_recipe.py -->\n# The paper's recipe at N = 2000\n\n"
          "Paired Δ = method − reference on the same seeds, 95% t-interval, `*` when it excludes 0. "
          "'wd all': weight decay 5e-4 in every method but the baseline; 'vs weightdecay' isolates the "
          "penalty on top of weight decay.\n\n" + text + "\n")
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "recipe_table.md"), "w") as f:
        f.write(md)
    plot(points, os.path.join(a.out_dir, "recipe_deltas.png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
