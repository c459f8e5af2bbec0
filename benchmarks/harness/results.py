"""The result files of the benchmarks (json, csv, txt, png) and the metadata they carry."""
from __future__ import annotations

import csv
import json
import sys
import time


def utc_now() -> str:
    """The time a result was written, as every benchmark records it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for the record of a CPU measurement."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces a run: ``python benchmarks/<script> <arguments>``."""
    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def write_json(path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def write_csv(path, rows: list[dict], fields: list[str] | None = None, lineterminator: str = "\n") -> None:
    """One row per dict, a header of ``fields`` (default: the first row's keys); None is written as an
    empty cell. ``lineterminator="\\r\\n"`` is the csv module's default dialect (the ops tables')."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(rows[0]), lineterminator=lineterminator)
        writer.writeheader()
        writer.writerows(rows)


def write_text(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def pyplot(missing: str):
    """matplotlib.pyplot on the Agg backend, or None (printing ``missing`` to stderr) when matplotlib
    is not installed: the charts are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(missing, file=sys.stderr)
        return None
    return plt


def save_figure(fig, path, dpi: int) -> None:
    """Lay the figure out, write it as PNG and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
