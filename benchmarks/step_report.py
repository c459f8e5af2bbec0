"""The step benchmark's report: one row per variant (time, ratios to the plain and the naive step,
peak memory), the printed table and the bar chart."""
from __future__ import annotations

from pathlib import Path

from harness.results import pyplot, save_figure, write_csv, write_json, write_text
from step_cases import Variant


def build_rows(variants: list[Variant], times: dict, memory: dict) -> list[dict]:
    rows = []
    for v in variants:
        plain = times[Variant(v.model, v.batch, "-", "plain", "-").key]
        naive_key = Variant(v.model, v.batch, v.penalty, "naive", "-").key
        naive = times.get(naive_key)
        mem = memory.get(v.key)
        naive_mem = memory.get(naive_key)
        rows.append(dict(
            model=v.model, batch=v.batch, penalty=v.penalty, impl=v.impl, method=v.method,
            ms=round(times[v.key] * 1e3, 3),
            x_plain=round(times[v.key] / plain, 3),
            x_naive=round(times[v.key] / naive, 3) if naive and v.impl == "ours" else None,
            peak_mib=round(mem, 2) if mem is not None else None,
            mem_x_naive=(round(mem / naive_mem, 3) if mem is not None and naive_mem and v.impl == "ours"
                         else None)))
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'model':8} {'batch':>5} {'penalty':13} {'impl':5} {'method':13} {'ms':>9} {'x plain':>8} " \
           f"{'x naive':>8} {'peak MiB':>9} {'mem/naive':>9}"
    lines = [head, "-" * len(head)]
    fmt = lambda v, f: (format(v, f) if v is not None else "-")  # noqa: E731
    for r in rows:
        lines.append(f"{r['model']:8} {r['batch']:>5} {r['penalty']:13} {r['impl']:5} {r['method']:13} "
                     f"{r['ms']:>9.2f} {r['x_plain']:>8.2f} {fmt(r['x_naive'], '>8.2f'):>8} "
                     f"{fmt(r['peak_mib'], '>9.1f'):>9} {fmt(r['mem_x_naive'], '>9.2f'):>9}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """A bar chart per model and batch: each variant's time as a multiple of the plain step."""
    plt = pyplot("matplotlib is not installed: no PNG chart (pip install matplotlib)")
    if plt is None:
        return
    groups = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda t: (t[0], t[1]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(14, 3.2 * len(groups)), squeeze=False)
    for ax, (m, b) in zip(axes[:, 0], groups, strict=True):
        sel = [r for r in rows if r["model"] == m and r["batch"] == b and r["impl"] != "plain"]
        labels = [f"{r['penalty']}\n{r['method'] if r['impl'] == 'ours' else 'naive'}" for r in sel]
        colors = ["tab:gray" if r["impl"] == "naive" else "tab:blue" for r in sel]
        ax.bar(range(len(sel)), [r["x_plain"] for r in sel], color=colors)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.2, color="tab:red", lw=0.8, ls="--")
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_ylabel("× plain step")
        ax.set_title(f"{m}, batch {b} (gray: naive PyTorch, blue: gradreg_fast; red: 2.2×)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------- main


def write(out: Path, stem: str, meta: dict, rows: list[dict], table: str) -> None:
    """<stem>.json (meta and rows), .csv (the rows), .txt (the table under a header) and .png under out."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", dict(meta=meta, rows=rows))
    write_csv(out / f"{stem}.csv", rows)
    backends = ", ".join(n for n, ok in meta["backends"].items() if ok)
    write_text(out / f"{stem}.txt", f"# {meta['command']}\n# {meta['device_name']}, torch {meta['torch']}, "
                                    f"load {meta['load_average']}, {meta['time']}, heap {meta.get('heap', 'default')}\n"
                                    f"# backends available: {backends}\n{table}\n")
    plot(rows, out / f"{stem}.png", f"gradreg_fast step cost on {meta['device_name']} ({meta['time']})")
