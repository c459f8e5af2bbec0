"""The step-cost tables of docs/benchmarks.md, regenerated from a committed bench_step result (JSON):

    python benchmarks/step_markdown.py benchmarks/results/bench_step_cpu.json            # time
    python benchmarks/step_markdown.py benchmarks/results/bench_step_cpu_estimators_b50_idle.json --memory

One table per (model, batch): a row per penalty, a column per method; each cell is the step time as
a ratio to the naive double-backprop step of the same penalty, with the ratio to the plain step in
parentheses (--memory: peak tensor memory as a ratio to the naive step's). Refused cells read "✗".
"""
from __future__ import annotations

import argparse
import json
import sys


def tables(data: dict, memory: bool = False) -> str:
    rows, meta = data["rows"], data["meta"]
    refused = meta.get("refused", {})
    out = [f"<!-- {meta['command'].strip()} · {meta['time']} · {meta.get('device_name', meta.get('device', '?'))} · "
           f"torch {meta['torch']} · {meta.get('clock', 'wall clock')} · "
           f"load {', '.join(f'{v:.1f}' for v in meta.get('load_average', []))} -->"]
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
        methods = list(dict.fromkeys([r["method"] for r in mine if r["impl"] == "ours"]
                                     + [k.split("|")[4] for k in refused if k.startswith(f"{model}|{batch}|")]))
        plain = next((r["ms"] for r in mine if r["impl"] == "plain"), None)
        what = "peak memory × naive" if memory else "× naive (× plain)"
        head = f"| {model}, batch {batch}: {what} | naive " + ("(MiB)" if memory else "(× plain)") + " | "
        out += ["", head + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        for kind in dict.fromkeys(r["penalty"] for r in mine if r["impl"] == "naive"):
            naive = next(r for r in mine if r["penalty"] == kind and r["impl"] == "naive")
            cells = []
            for m in methods:
                r = next((r for r in mine if r["penalty"] == kind and r["method"] == m), None)
                if r is None:
                    key = f"{model}|{batch}|{kind}|ours|{m}"
                    cells.append("✗" if key in refused else "")
                elif memory:
                    cells.append("" if r.get("mem_x_naive") is None else f"{r['mem_x_naive']:.2f}")
                else:
                    cells.append(f"{r['x_naive']:.2f} ({r['x_plain']:.1f})")
            first = (f"{naive['peak_mib']:.1f}" if memory and naive.get("peak_mib") is not None
                     else f"{naive['ms'] / plain:.1f}" if plain else "")
            out.append(f"| {kind} | {first} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", help="a bench_step result, e.g. benchmarks/results/bench_step_cpu.json")
    ap.add_argument("--memory", action="store_true", help="peak memory ratios instead of times")
    a = ap.parse_args(argv)
    with open(a.json) as f:
        sys.stdout.write(tables(json.load(f), a.memory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
