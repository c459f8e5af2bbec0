"""Smoke test of the op microbenchmark harness (benchmarks/bench_ops.py --quick)."""
import csv
import json
import os
import subprocess
import sys

import gradreg_fast as gr
from conftest import ROOT, subprocess_env


def test_bench_ops_quick(tmp_path):
    """Every op module, run as a user runs the script after ``pip install .``: from another folder,
    without the source tree on the import path."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_ops.py"), "--quick",
                           "--device", "cpu", "--reps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=subprocess_env(source_tree=False),
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "bias_act[gelu]" in proc.stdout and "double_backward" in proc.stdout
    with open(tmp_path / "ops_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["pass_name"] for r in rows} == {"forward", "backward", "double_backward"}
    ops = {r["op"].split("[")[0] for r in rows}
    assert ops == {"bias_act", "cross_entropy", "fd_direction", "gaussian_like", "project", "sq_norm"}, ops
    assert not any(r.get("error") for r in rows), [r for r in rows if r.get("error")]
    # the subprocess must see the same backends as this process (the installed extension included)
    want = {b for b in ("reference", "cpp", "triton") if gr.backends()[b].available}
    assert {r["backend"] for r in rows} >= want - {"triton"}
    assert all(float(r["time_ms"]) > 0 for r in rows)
    data = json.loads((tmp_path / "ops_cpu.json").read_text())
    assert data["meta"]["device"] == "cpu" and len(data["rows"]) == len(rows)
