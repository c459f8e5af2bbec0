"""Smoke test of the step benchmark: --quick runs, writes its files, and its numbers are sane."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]  # the checkout


def test_quick_run_writes_results(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--quick", "--out",
                          str(tmp_path), "--methods", "exact,fd,jvp,exact/every4,exact/fused", "--memory", "exact"],
                         capture_output=True, text=True, cwd=str(tmp_path), env=subprocess_env(source_tree=False),
                         timeout=600)  # as a user runs it after pip install: no source tree on the path
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x plain" in res.stdout
    data = json.loads((tmp_path / "bench_step_cpu_quick.json").read_text())
    rows = data["rows"]
    assert data["meta"]["threads"] == 1
    impls = {(r["penalty"], r["impl"], r["method"]) for r in rows}
    assert ("-", "plain", "-") in impls
    assert ("frobreg", "ours", "jvp") in impls and ("doubleback", "ours", "jvp") not in impls
    assert ("doubleback", "ours", "exact/fused") in impls
    for r in rows:
        assert r["ms"] > 0
        if r["impl"] == "ours":
            assert r["x_naive"] > 0
    plain = next(r for r in rows if r["impl"] == "plain")
    assert plain["x_plain"] == 1.0
    exact = next(r for r in rows if r["impl"] == "ours" and r["method"] == "exact" and r["penalty"] == "frobreg")
    assert exact["peak_mib"] > 0 and exact["mem_x_naive"] > 0
    assert (tmp_path / "bench_step_cpu_quick.csv").read_text().startswith("model,batch,penalty")
    assert (tmp_path / "bench_step_cpu_quick.png").stat().st_size > 1000


@pytest.mark.slow      # 34 s (--durations); test_quick_run_writes_results covers the same path in 10 s
def test_smoke_runs_every_default_cell(tmp_path):
    """The main job's every (model × penalty × method) cell, once at batch 2: a crash in any cell fails.
    Cells the library refuses for a model (jvp with BatchNorm's batch statistics) are reported, not timed."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--smoke", "--out",
                          str(tmp_path)], capture_output=True, text=True, cwd=str(tmp_path),
                         env=subprocess_env(source_tree=False), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "bench_step_cpu_smoke.json").read_text())
    cells = {(r["model"], r["penalty"], r["method"]) for r in data["rows"] if r["impl"] == "ours"}
    models = {"lenet", "mlp", "resnet", "vit"}
    assert {m for m, _, _ in cells} == models
    refused = set(data["meta"]["refused"])
    for m in models:
        for kind in ("doubleback", "spectreg", "frobreg", "jacreg", "onehot", "random_onehot"):
            for method in ("exact", "hvp", "fd", "fd-forward", "exact/every4", "exact/fused"):
                assert (m, kind, method) in cells, (m, kind, method)
            if kind in ("frobreg", "jacreg"):
                assert (m, kind, "jvp") in cells or f"{m}|2|{kind}|ours|jvp" in refused
    assert refused == {"resnet|2|frobreg|ours|jvp", "resnet|2|jacreg|ours|jvp"}


def test_live_tensor_bytes_counts_a_known_allocation():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness.memory import LiveTensorBytes
    mode = LiveTensorBytes()
    with mode:
        a = torch.empty(1000, dtype=torch.float64)      # 8000 bytes
        b = torch.empty(500, dtype=torch.float32)       # 2000 bytes, alive together with a
        del a
        c = torch.empty(100, dtype=torch.float64)       # 800 bytes, after a was freed
    assert mode.peak == 10000
    assert mode.current == 2800
    del b, c


def test_gan_discriminator_step(tmp_path):
    """The discriminator step (--models dcgan_d): R1 and WGAN-GP, naive and ours per method, once at batch 2;
    the GAN kinds run on the discriminator only (and the classifier kinds not on it)."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--models", "dcgan_d",
                          "--batch", "2", "--reps", "1", "--warmup", "0", "--memory", "exact", "--tag", "gan",
                          "--methods", "exact,exact/shared,hvp,fd,jvp,exact/every16", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=str(tmp_path), env=subprocess_env(source_tree=False),
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_step_cpu_gan.json").read_text())["rows"]
    cells = {(r["penalty"], r["impl"], r["method"]) for r in rows}
    expected = {("-", "plain", "-")} | {(k, "naive", "-") for k in ("r1", "wgan_gp")} | {
        (k, "ours", m) for k in ("r1", "wgan_gp") for m in ("exact", "hvp", "fd", "exact/every16")} | {
        ("r1", "ours", "exact/shared")}
    assert cells == expected
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["mem_x_naive"] > 0 for r in rows if r["impl"] == "ours" and r["method"] == "exact")


def test_time_interleaved_order_calls_and_refusals():
    """The harness's one timer: every repetition times each variant once, in the given order (rotated by
    one per repetition unless rotate=False), calls[name] consecutive calls as one sample; probe() sets
    aside the variants whose first call raises."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness.timing import probe, time_interleaved
    log = []

    def refuse():
        raise ValueError("not for this model")
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    fns["refused"] = refuse
    failed = probe(fns, ValueError)
    assert list(failed) == ["refused"] and str(failed["refused"]) == "not for this model"
    assert list(fns) == ["a", "b", "c"] and log == ["a", "b", "c"]
    log.clear()
    ticks = []
    progress = type("Bar", (), {"update": lambda self, n: ticks.append(n)})()
    times = time_interleaved(fns, "cpu", 3, warmup=1, calls={"b": 2}, progress=progress)
    assert log == ["a", "b", "c"] + ["a", "b", "b", "c", "b", "b", "c", "a", "c", "a", "b", "b"]
    assert set(times) == {"a", "b", "c"} and all(t > 0 for t in times.values()) and ticks == [1] * 9
    log.clear()
    time_interleaved(fns, "cpu", 2, rotate=False)
    assert log == ["a", "b", "c", "a", "b", "c"]
    assert time_interleaved({}, "cpu", 3) == {}
