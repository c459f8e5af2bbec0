"""Statistics of the MNIST runs: the paired difference of a method to the baseline over seeds with its
95% t-interval, the grouping of runs into table rows and series, and the choice of one setting."""
from __future__ import annotations

import math

import numpy as np

from paper.mnist_data import LAMBDA, TABLE_N, lam_for


def _estimator(r: dict) -> str:
    """' [fd]' for a gradient penalty computed by another method than exact, else ''."""
    est = r.get("estimator")
    return "" if est in (None, "exact") else f" [{est}]"


def label(r: dict) -> str:
    """The table row of a record: the method's name, with its λ when that is not the paper's, and its
    estimator when that is not exact."""
    if r["method"] in LAMBDA and r["method"] not in ("baseline", "weightdecay") \
            and not math.isclose(r["lam"], lam_for(r["method"], r["N"])):
        return f"{r['method']} (λ={r['lam']:g})" + _estimator(r)
    return r["method"] + _estimator(r)


def lam_rule(r: dict) -> str:
    """The series of a record across sizes: the method with the paper's λ at each N, or the paper's λ
    times one factor (--lam-scale), whose λ differs between sizes but whose runs belong together."""
    paper = lam_for(r["method"], r["N"])
    scale = r["lam"] / paper if paper else 1.0
    name = r["method"] if math.isclose(scale, 1.0) else f"{r['method']} (paper λ × {scale:g})"
    return name + _estimator(r)


def t_quantile(df: int, q: float = 0.975) -> float:
    try:
        from scipy import stats
        return float(stats.t.ppf(q, df))
    except ImportError:  # two-sided 95% quantiles of Student's t for small df
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}
        if q != 0.975:
            raise
        return table.get(df, table[max(k for k in table if k <= df)] if df > 1 else table[1])


def paired_stats(runs: dict, base: dict) -> tuple[float, float, int] | None:
    """(mean, 95% t half-width, n) of method − baseline test accuracy over the seeds both have (the
    half-width is nan for n = 1); None when they share no seed."""
    common = sorted(set(runs) & set(base))
    if not common:
        return None
    d = [runs[s]["test_acc"] - base[s]["test_acc"] for s in common]
    if len(d) == 1:
        return d[0], float("nan"), 1
    dm, ds = mean_std(d)
    return dm, t_quantile(len(d) - 1) * ds / math.sqrt(len(d)), len(d)


def paired_delta(runs: dict, base: dict) -> str:
    """paired_stats as text, in percentage points; `*` when the interval excludes 0."""
    stats = paired_stats(runs, base)
    if stats is None:
        return "(no baseline)"
    dm, h, n = stats
    if n == 1:
        return f"{100 * dm:+.2f} pp (n=1)"
    flag = " *" if dm - h > 0 or dm + h < 0 else ""
    return f"{100 * dm:+.2f} [{100 * (dm - h):+.2f}, {100 * (dm + h):+.2f}] pp (n={n}){flag}"


def mean_std(v: list[float]) -> tuple[float, float]:
    a = np.asarray(v, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def select_runs(records, iters=None, wd_mode=None):
    """The records of one (iters, wd_mode) setting: by default the largest iteration count that has
    N = 2000 baseline runs, so runs of different lengths never mix in one table."""
    recs = [r for r in records if (wd_mode is None or r.get("wd_mode", "isolated") == wd_mode)]
    if iters is None:
        cand = [r["iters"] for r in recs if r["method"] == "baseline" and r["N"] == TABLE_N] or \
               [r["iters"] for r in recs]
        if not cand:
            return [], None
        iters = max(cand, key=lambda i: (sum(1 for r in recs if r["iters"] == i), i))
    return [r for r in recs if r["iters"] == iters], iters
