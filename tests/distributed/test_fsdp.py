"""Penalties on models sharded with FSDP2 (torch.distributed.fsdp.fully_shard): torchrun with 2 gloo
processes on the CPU.

tests/distributed/fsdp_worker.py runs every kind x method x call form on a 3-Linear MLP with every Linear and the
root wrapped in fully_shard (about 25 s); the tests below check its results case by case:
  - the two ranks end with identical gradients (FSDP reduce-scattered them),
  - they equal one process on the concatenated batch (fp64, deterministic penalties; fd within its
    own truncation error) and always the mean of the per-half penalties with each rank's draws,
  - FSDP's settings and sharding are back as the user set them after every step,
  - with MixedPrecisionPolicy(param_dtype=bfloat16) exact/hvp/jvp stay within bf16 rounding of the
    fp64 reference, and fd is refused with a ValueError naming the methods that work,
  - with a (sharded) BatchNorm in training mode, hvp's torch.func route equals the per-half reference,
  - gradient accumulation with set_requires_gradient_sync(False), a penalty dropped without a
    backward, a penalty kept alive while only the base loss is differentiated, and two penalties
    summed into one backward leave the gradients right.
"""
import os
import subprocess
import sys
import types

import pytest
import torch
from test_ddp import STOCHASTIC_KINDS, TOL, TOL_BY_METHOD, _torchrun, expected_error, worker_results

import gradreg_fast as gr
from conftest import ROOT, subprocess_env
from gradreg_fast.distributed import fsdp
from method_matrix import STOCHASTIC_METHODS

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")

VARIANT_KINDS = ("doubleback", "frobreg")   # fsdp_worker.VARIANT_KINDS
CASES = ([("default", form, kind) for form in ("penalty", "loss", "inputs") for kind in gr.KINDS]
         + [("bf16", "loss", kind) for kind in gr.KINDS]
         + [(config, "loss", kind) for config in ("keep", "batchnorm") for kind in VARIANT_KINDS])
# batch statistics couple the samples: each rank normalizes its own half, one process the whole batch
PER_HALF_ONLY = ("batchnorm",)
# bf16 parameters (unit roundoff 3.9e-3) against the fp64 reference, relative to the largest entry:
# measured <= 1.0e-2 (gradients) and 2.5e-3 (values) for exact/hvp, jvp vs its per-half draws 4.7e-3
BF16_TOL = 3e-2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return worker_results(tmp_path_factory, "fsdp")


def fsdp_expected_error(config: str, form: str, kind: str, method: str) -> str | None:
    expected = expected_error(form, kind, method)
    if expected is None and config == "bf16" and method == "fd":
        return "method='exact'"
    if expected is None and config == "batchnorm" and method == "jvp":
        return "method='exact'"   # jvp refuses batch statistics, naming exact and hvp
    return expected


def test_worker_ran_exactly_these_cases(results):
    expected = {f"{config}-{form}-{kind}-{method}" for config, form, kind in CASES for method in gr.METHODS}
    assert set(results["cases"]) == expected


@pytest.mark.parametrize("method", list(gr.METHODS))
@pytest.mark.parametrize("config,form,kind", CASES)
def test_case(results, config, form, kind, method):
    r = results["cases"][f"{config}-{form}-{kind}-{method}"]
    expected = fsdp_expected_error(config, form, kind, method)
    if expected is not None:
        assert "error" in r and "ValueError" in r["error"] and expected in r["error"], r
        return
    assert "error" not in r, r["error"]
    assert r["ranks_differ"] <= TOL, f"ranks hold different gradients: {r}"
    assert r["restored"], f"FSDP's settings or sharding not restored after the step: {r}"
    if config == "bf16":
        tol = dict(halves=BF16_TOL, concat=BF16_TOL)
    else:
        tol = TOL_BY_METHOD.get(method, dict(halves=TOL, concat=TOL))
    assert r["grad_vs_halves"] <= tol["halves"] and r["value_vs_halves"] <= tol["halves"], r
    if kind not in STOCHASTIC_KINDS and method not in STOCHASTIC_METHODS and config not in PER_HALF_ONLY:
        assert r["grad_vs_concat"] <= tol["concat"] and r["value_vs_concat"] <= tol["concat"], r


def test_fd_refusal_under_bf16_names_working_methods(results):
    msg = results["cases"]["bf16-loss-frobreg-fd"]["error"]
    assert "bfloat16" in msg and "method='exact'" in msg and "method='hvp'" in msg


def test_tolerances_discriminate(results):
    """One rank's unreduced gradient is far from the whole batch's: the tolerances above (bf16's
    included) could not pass on gradients FSDP failed to reduce."""
    assert results["extra"]["local_vs_concat"] > 10 * BF16_TOL


@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
def test_gradient_accumulation_without_sync(results, method):
    r = results["extra"][f"accumulation-{method}"]
    assert "error" not in r, r
    assert r["ranks_differ"] <= TOL
    assert r["grad_vs_concat"] <= TOL_BY_METHOD.get(method, dict(concat=TOL))["concat"], r


@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
def test_dropped_penalty_leaves_next_step_right(results, method):
    r = results["extra"][f"dropped-{method}"]
    assert "error" not in r, r
    tol = TOL_BY_METHOD.get(method, dict(halves=TOL, concat=TOL))
    assert r["restored"] and r["ranks_differ"] <= TOL and r["grad_vs_concat"] <= tol["concat"], r


@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
def test_base_backward_while_penalty_kept_alive_reduces(results, method):
    """A penalty kept alive (not differentiated) must not leave another backward unreduced."""
    r = results["extra"][f"kept-{method}"]
    assert "error" not in r, r
    assert r["restored"] and r["ranks_differ"] <= TOL and r["grad_vs_concat"] <= TOL, r


@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
def test_two_penalties_one_backward(results, method):
    """Two penalties, each with its own forward through the sharded model, summed: one backward."""
    r = results["extra"][f"two_penalties-{method}"]
    assert "error" not in r, r
    assert r["restored"] and r["ranks_differ"] <= TOL and r["grad_vs_concat"] <= TOL, r


@pytest.mark.parametrize("method", ["exact", "hvp"])
def test_stale_penalty_backward_raises(results, method):
    """Differentiated after another backward reduced and resharded: a ValueError, not a crash deep
    in autograd ("storage of size 0") or an unreduced gradient."""
    msg = results["extra"][f"stale-{method}"]["error"]
    assert msg is not None and "Compute the penalty again" in msg, msg


def test_unknown_fsdp_internals_refused_naming_fd():
    """A torch whose FSDP2 lacks what the deferral uses gets a ValueError naming method='fd'."""
    state = types.SimpleNamespace(_fsdp_param_groups=[types.SimpleNamespace(reduce_grads=True)], _modules=(),
                                  _training_state=None, _is_root=True)
    with pytest.raises(ValueError, match="method='fd'"):
        fsdp._check_fsdp_internals([state])


def test_unsharded_model_not_detected():
    model = torch.nn.Linear(3, 2)
    assert fsdp.find_fsdp(model, model(torch.randn(2, 3))) is None


@pytest.mark.slow      # 30 s (torchrun, 2 ranks); CI runs it, scripts/test.sh --fast skips it
def test_memory_benchmark_runs(tmp_path):
    """benchmarks/fsdp_memory.py end to end on a tiny model (it launches torchrun itself)."""
    out = tmp_path / "mem.md"
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "fsdp_memory.py"), "--hidden", "16",
                           "--d-in", "8", "--batch", "4", "--steps", "1", "--methods", "exact",
                           "--out", str(out)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert "| exact |" in table and "FSDP2 / DDP" in table


@pytest.mark.slow      # 15 s (torchrun, 2 ranks); the worker cases cover the same code path
def test_example_runs():
    """examples/fsdp_train.py trains a few steps; its first step matches one process on the global batch."""
    proc = _torchrun([os.path.join("examples", "fsdp_train.py"), "--steps", "3", "--check"])
    assert "match one process" in proc.stdout, proc.stdout
