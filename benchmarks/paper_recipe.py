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

import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/: harness, paper
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split
from paper.mnist_data import TABLE_N  # noqa: E402
from paper.mnist_report import delta_bars, report_main  # noqa: E402
from paper.mnist_stats import label, paired_delta, paired_stats  # noqa: E402

RESULTS = os.path.join(harness.ROOT, "benchmarks", "results", "paper")
SETTINGS = ((3000, "isolated"), (10000, "isolated"), (10000, "all"))
FAR = 0.05   # rows whose |Δ| exceeds 5 pp are left out of the plot (they are in the table)
ORDER = ("spectreg", "doubleback", "jacreg", "cp", "weightdecay", "frobreg", "onehot")


def by_setting(records: list[dict]) -> dict:
    """{(iters, wd_mode): {row label: {seed: record}}} at N = 2000."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["N"] == TABLE_N and r.get("estimator") in (None, "exact"):   # other methods: paper_estimators.py
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
    far = sorted({p[0] for p in points if abs(p[2][0]) > FAR})   # off the scale of the others
    delta_bars([p for p in points if p[0] not in far], path,
               "MNIST N = 2000, LeNet: paired Δ per recipe"
               + (f" (left out, |Δ| > {100 * FAR:g} pp: {', '.join(far)})" if far else ""),
               "Δ test accuracy (pp), 95% CI", rotation=15)


def main(argv: list[str] | None = None) -> int:
    return report_main(
        __doc__, RESULTS, argv, "paper_recipe.py", lambda records: table(by_setting(records)), plot,
        "The paper's recipe at N = 2000",
        "Paired Δ = method − reference on the same seeds, 95% t-interval, `*` when it excludes 0. "
        "'wd all': weight decay 5e-4 in every method but the baseline; 'vs weightdecay' isolates the "
        "penalty on top of weight decay.", "recipe_table.md", "recipe_deltas.png")


if __name__ == "__main__":
    raise SystemExit(main())
