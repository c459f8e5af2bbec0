"""Penalties under DistributedDataParallel: torchrun with 2 gloo processes on the CPU (fp64).

tests/distributed/ddp_worker.py runs every kind x method x call form x DDP configuration once (about 10 s);
the tests below check its results case by case:
  - the two ranks end with identical gradients (DDP averaged them),
  - they equal one process on the concatenated batch (deterministic penalties), and always equal
    the mean of the per-half penalties with the draws each rank makes (random penalties draw per
    sample, so a concatenated batch draws different numbers),
  - DDP(static_graph=True) raises the library's error for every method.
"""
import json
import os
import subprocess
import sys

import pytest

import gradreg_fast as gr
from conftest import ROOT, subprocess_env
from method_matrix import NEEDS_MODEL, STOCHASTIC_METHODS, serves

CONFIGS = ("default", "find_unused")
FORMS = ("penalty", "loss", "inputs")
TOL = 1e-12  # relative, fp64: only summation order differs (mean of two rank means vs one mean)

# Random penalties draw per sample, so one process on the concatenated batch draws other numbers
# than the ranks: compared with the per-half reference only (which uses each rank's draws).
STOCHASTIC_KINDS = ("random_onehot",)
# fd's step depends on the batch (method_matrix.BATCH_DEPENDENT_METHODS): equal to the per-half
# reference, and to the concatenated batch within fd's truncation error O(t^2).
TOL_BY_METHOD = {"fd": dict(halves=1e-9, concat=1e-6)}


def expected_error(form: str, kind: str, method: str) -> str | None:
    """A fragment of the error a case must raise, or None when it must work."""
    if not serves(kind, method):
        return "serves"
    if form == "inputs" and method in NEEDS_MODEL:
        return "re-evaluates the model"
    return None


def _torchrun(args, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def worker_results(tmp_path_factory, worker: str) -> dict:
    """Run tests/distributed/<worker>_worker.py under torchrun (2 ranks) and load the results it wrote."""
    out = tmp_path_factory.mktemp(worker) / "results.json"
    _torchrun([os.path.join("tests", "distributed", f"{worker}_worker.py"), str(out)])
    with open(out) as f:
        data = json.load(f)
    assert data["methods"] == list(gr.METHODS) and data["kinds"] == list(gr.KINDS)
    return data


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return worker_results(tmp_path_factory, "ddp")


@pytest.mark.parametrize("method", list(gr.METHODS))
@pytest.mark.parametrize("kind", gr.KINDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("config", CONFIGS)
def test_case(results, config, form, kind, method):
    r = results["cases"][f"{config}-{form}-{kind}-{method}"]
    expected = expected_error(form, kind, method)
    if expected is not None:
        assert "error" in r and "ValueError" in r["error"] and expected in r["error"], r
        return
    assert "error" not in r, r["error"]
    tol = TOL_BY_METHOD.get(method, dict(halves=TOL, concat=TOL))
    assert r["ranks_differ"] <= TOL, f"ranks hold different gradients: {r}"
    assert r["grad_vs_halves"] <= tol["halves"] and r["value_vs_halves"] <= tol["halves"], r
    if kind not in STOCHASTIC_KINDS and method not in STOCHASTIC_METHODS:
        assert r["grad_vs_concat"] <= tol["concat"] and r["value_vs_concat"] <= tol["concat"], r


def test_random_penalty_really_differs_from_concatenated_batch(results):
    """The per-half reference is needed for random_onehot: the concatenated batch draws differently
    (so the deterministic comparison above is not vacuous for the other kinds)."""
    r = results["cases"]["default-penalty-random_onehot-exact"]
    assert r["grad_vs_concat"] > 1e-3


@pytest.mark.parametrize("method", list(gr.METHODS))
def test_static_graph_raises(results, method):
    msg = results["static_graph"][method]
    assert msg is not None, "DDP(static_graph=True) must raise: it silently skips the all-reduce"
    assert "static_graph" in msg and "static_graph=False" in msg


@pytest.mark.slow      # 13 s (torchrun, 2 ranks); the worker cases cover the same code path
def test_example_runs(tmp_path):
    """examples/ddp_train.py trains for a few steps and its replicas stay identical."""
    proc = _torchrun([os.path.join("examples", "ddp_train.py"), "--steps", "5", "--check"])
    assert "replicas identical" in proc.stdout
