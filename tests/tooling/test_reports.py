"""The report generators behind the README's tables: benchmarks/step_markdown.py (step-cost tables
from a bench_step JSON), benchmarks/paper_recipe.py (the N = 2000 recipe comparison) and
benchmarks/paper_estimators.py (training by each estimator), on inputs whose answer is known."""
import math

from scripts import load_script


def _load(name):
    return load_script(f"benchmarks/{name}.py", f"_test_report_{name}")


def _row(model, kind, impl, method, ms, plain=10.0, naive=None, mem=None):
    return {"model": model, "batch": 4, "penalty": kind, "impl": impl, "method": method, "ms": ms,
            "x_plain": ms / plain, "x_naive": None if naive is None else ms / naive, "peak_mib": 1.0,
            "mem_x_naive": mem}


def test_step_markdown_ratios_and_refusals():
    sm = _load("step_markdown")
    rows = [_row("m", "-", "plain", "-", 10.0), _row("m", "frobreg", "naive", "-", 40.0),
            _row("m", "frobreg", "ours", "exact", 44.0, naive=40.0, mem=0.5)]
    data = {"rows": rows, "meta": {"command": "x", "time": "t", "torch": "v", "load_average": [1.0],
                                   "refused": {"m|4|frobreg|ours|jvp": "no"}}}
    text = sm.tables(data)
    line = next(ln for ln in text.splitlines() if ln.startswith("| frobreg"))
    # naive is 4.0x the plain step; exact 1.10x naive (4.4x plain); jvp refused
    assert line == "| frobreg | 4.0 | 1.10 (4.4) | ✗ |", line
    mem = next(ln for ln in sm.tables(data, memory=True).splitlines() if ln.startswith("| frobreg"))
    assert mem == "| frobreg | 1.0 | 0.50 | ✗ |", mem


def test_paper_recipe_paired_deltas():
    pr = _load("paper_recipe")

    def rec(method, seed, acc, iters=10000, wd_mode="all"):
        lam = {"baseline": 0.0, "weightdecay": 0.0, "spectreg": 0.03}[method]
        return {"method": method, "N": 2000, "seed": seed, "iters": iters, "wd_mode": wd_mode, "lam": lam,
                "test_acc": acc}
    base = [0.960, 0.965, 0.970]
    gain = [0.004, 0.006, 0.005]        # spectreg − baseline per seed: mean +0.5 pp
    records = [rec("baseline", s, a) for s, a in enumerate(base)]
    records += [rec("spectreg", s, a + d) for s, (a, d) in enumerate(zip(base, gain, strict=True))]
    records += [rec("weightdecay", s, a + 0.002) for s, a in enumerate(base)]
    records += [{**rec("spectreg", s, a - 0.03), "estimator": "fd"} for s, a in enumerate(base)]  # not here
    text, points = pr.table(pr.by_setting(records))
    assert "[fd]" not in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| spectreg"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "–" and cells[2] == "–"                 # no 3000-iteration or isolated runs
    assert cells[3].startswith("+0.50 [") and cells[3].endswith("(n=3) *"), cells[3]
    assert cells[4].startswith("+0.30 ["), cells[4]             # vs weightdecay: 0.5 − 0.2 pp
    half = 4.303 * 0.001 / math.sqrt(3)                          # t(2) · sd / √n, sd of (4, 6, 5)/1000 = 0.001
    (mean, h, n), = [p[2] for p in points if p[0] == "spectreg" and p[1] == "10000/all/vs baseline"]
    assert n == 3 and math.isclose(mean, 0.005, abs_tol=1e-12) and math.isclose(h, half, rel_tol=1e-3)


def test_paper_estimators_deltas_to_exact_and_baseline():
    pe = _load("paper_estimators")

    def rec(method, seed, acc, estimator=None, lam=None):
        lam = {"baseline": 0.0, "spectreg": 0.03}[method] if lam is None else lam
        return {"method": method, "N": 500, "seed": seed, "iters": 3000, "wd_mode": "isolated", "lam": lam,
                "test_acc": acc, "time_s": 10.0, "step_ms": 3.0, "estimator": estimator}
    base = [0.930, 0.935, 0.940]
    records = [rec("baseline", s, a) for s, a in enumerate(base)]
    records += [rec("spectreg", s, a + 0.010, "exact") for s, a in enumerate(base)]
    fd_gap = [-0.019, -0.021, -0.020]
    records += [rec("spectreg", s, a + 0.010 + d, "fd") for s, (a, d) in enumerate(zip(base, fd_gap, strict=True))]
    records += [rec("spectreg", s, a, "hvp", lam=0.3) for s, a in enumerate(base)]   # another λ: not this table
    text, points = pe.table(*pe.groups(records))
    rows = {ln.split("|")[3].strip(): [c.strip() for c in ln.strip("|").split("|")]
            for ln in text.splitlines() if ln.startswith("| spectreg")}
    assert set(rows) == {"exact", "fd"}, rows
    assert rows["exact"][4].startswith("+1.00 [") and rows["exact"][5] == "–"
    assert rows["fd"][4].startswith("-1.00 [")                   # vs baseline: +1 − 2 pp
    assert rows["fd"][5].startswith("-2.00 [-2.25, -1.75]") and rows["fd"][5].endswith("(n=3) *"), rows["fd"][5]
    assert {p[1] for p in points} == {"exact", "fd"}


def test_bench_step_steady_heap_is_recorded(tmp_path):
    """--steady-heap sets glibc's malloc to keep freed memory (mallopt accepts every setting here) and
    the results' header names the setting (the default says so too)."""
    import platform

    import pytest
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        pytest.skip("mallopt is glibc's")
    import subprocess
    import sys
    bs = _load("bench_step")
    assert bs.parse_args(["--steady-heap"]).steady_heap and not bs.parse_args([]).steady_heap
    # in a process of its own (the setting is process-wide), run outside the source tree (whose
    # gradreg_fast/ would shadow the installed package and its compiled extension)
    from scripts import ROOT
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from scripts import load_script; "
            "print(load_script('benchmarks/bench_step.py', 'bs').steady_heap())")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("steady (mallopt"), done.stderr[-2000:]
