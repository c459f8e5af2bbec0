"""One cell of the conformance matrix: a zoo model × a penalty kind × an estimator, run through the
public API (``gradreg_fast.penalty``) and checked against ``ground_truth`` (fp64, torch only).

A cell ends in one of:

    exact     value and every parameter gradient within ``EXACT_RTOL`` of the ground truth
    unbiased  jvp (Hutchinson, random tangents v ~ N(0, I)), by one of two checks (``JVP_CHECKS``):
              "fixed" (the default): at the tangents the call drew, reproduced from the same generator
              as the estimator's documented contract says (``ground_truth.jvp_tangents``), value and
              every parameter gradient within ``EXACT_RTOL`` of plain double backprop's
              (1/n) Σ_j ‖J v_j‖² and its gradient. With E[v vᵀ] = I, E_v ‖J v‖² = tr(J E[v vᵀ] Jᵀ)
              = ‖J‖_F², and the gradient is linear in that expectation, so exactness at every draw
              means the value and gradient are unbiased. Seconds per cell.
              "ztest": the mean over many calls passes z-tests on the value and on the gradient
              (along the true gradient and along a random direction), with draws enough that a 10%
              bias would fail: the end-to-end check of the sampling itself, minutes per cell
    approx    finite differences: the value is exact, the gradient within the measured error reported
    refuses   a ValueError/NotImplementedError at the call that names a method that works
    WRONG / BIASED / ERROR   a wrong value or gradient, a biased estimate, or a raw error: a defect
    VACUOUS   jvp on a case whose true gradient is 0 (the case, not the estimator, needs fixing)

    python -m gradreg_fast.testing.conformance           # the whole matrix as a markdown table
    python -m gradreg_fast.testing.conformance --jvp-check ztest   # jvp cells by z-tests instead
    python -m gradreg_fast.testing.conformance --models third_party --out docs/models.md
                                # the third-party zoo (gradreg_fast.testing.third_party), into the page's
                                # generated section (between GENERATED_BEGIN and GENERATED_END)
"""
from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass

import torch

import gradreg_fast as gr
from gradreg_fast.testing import ground_truth, zoo

EXACT_RTOL = 1e-6
FD_SMOOTH_RTOL = 1e-3     # fd at its default step on twice continuously differentiable models (fp64)
JVP_Z = 3.5               # |z| above this fails
JVP_POWER = 0.025         # standard error at most 2.5% of the truth: a 10% bias gives z >= 4
JVP_MAX_CALLS = 400
JVP_N_PROJ = 2
JVP_REPEAT = 48           # jvp z-tests run on the zoo batch repeated 48 times: 48x the independent draws per call
JVP_CHECKS = ("fixed", "ztest")
KINDS = gr.KINDS                # the classifier kinds
GAN_KINDS = gr.GAN_KINDS       # on zoo.DISCRIMINATORS only (and the classifier KINDS on zoo.ZOO only)
METHODS = tuple(gr.METHODS)
GEN_SEED = 7
RNG_SEED = 123
REFUSAL = re.compile(r"method=['\"](exact|hvp|fd|jvp)['\"]")


@dataclass
class Cell:
    model: str
    kind: str
    method: str
    status: str
    value_err: float = float("nan")
    grad_err: float = float("nan")
    message: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("exact", "unbiased", "approx", "refuses")

    def symbol(self) -> str:
        if self.status == "exact":
            return "✓ exact"
        if self.status == "unbiased":
            return "✓ unbiased"
        if self.status == "approx":
            return _approx(self.model, self.grad_err)
        if self.status == "refuses":
            return "✗ refuses"
        return f"**{self.status}**"


def _approx(model: str, err: float) -> str:
    """fd's cell: the error measured here (fp64, tiny inputs, no kink crossed); on a piecewise-linear
    model a realistic step crosses kinks, and fd then gives the gradient of a finite-difference penalty
    (benchmarks/fd_accuracy.py measures how far that is from double backprop's) and fd warns
    (FDKinkWarning)."""
    if zoo.spec_of(model)["smooth"]:
        return f"≈ {err:.0e}"
    return f"≈ {err:.0e} kink-free; warns: FD penalty past kinks"


def _restore(model: torch.nn.Module, saved: dict) -> None:
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(saved[k])


class Matrix:
    """Runs cells, caching the zoo cases and their ground truths."""

    def __init__(self, dtype: torch.dtype = torch.float64, jvp_check: str = "fixed"):
        if jvp_check not in JVP_CHECKS:
            raise ValueError(f"jvp_check must be one of {JVP_CHECKS}, got {jvp_check!r}")
        self.dtype = dtype
        self.jvp_check = jvp_check
        self._cases: dict[str, tuple] = {}
        self._truth: dict[tuple, ground_truth.Truth] = {}

    def case(self, name: str):
        if name not in self._cases:
            case = zoo.make_case(name, self.dtype)
            saved = {k: b.detach().clone() for k, b in case.model.named_buffers()}
            self._cases[name] = (case, saved)
        return self._cases[name]

    def options(self, case, kind: str) -> dict:
        if kind == "spectreg":   # two per-sample projections, drawn here (independent of the library's RNG)
            g = torch.Generator().manual_seed(99)
            return {"projection": torch.randn(2, case.y.shape[0], case.k, generator=g, dtype=self.dtype)}
        if kind == "wgan_gp":    # the generated batch; ε comes from the call's generator (GEN_SEED)
            return {"fake": case.notes["fake"]}
        return {}

    def truth(self, name: str, kind: str, repeat: int = 1) -> ground_truth.Truth:
        key = (name, kind, repeat)
        if key not in self._truth:
            case, saved = self.case(name)
            _restore(case.model, saved)
            opts = self.options(case, kind)
            classes = None
            if kind == "random_onehot":   # the library's draw: torch.randint from the caller's generator
                classes = torch.randint(case.k, (case.y.shape[0],), generator=torch.Generator().manual_seed(GEN_SEED))
            eps = None
            if kind == "wgan_gp":   # the library's draw: torch.rand(B) in x's dtype from the caller's generator
                eps = torch.rand(zoo.BATCH, generator=torch.Generator().manual_seed(GEN_SEED), dtype=self.dtype)
            self._truth[key] = ground_truth.penalty(case, kind, projection=opts.get("projection"),
                                                    classes=classes, rng_seed=RNG_SEED, repeat=repeat, eps=eps)
            _restore(case.model, saved)
        return self._truth[key]

    def call(self, name: str, kind: str, method: str, gen_seed: int = GEN_SEED, repeat: int = 1, **extra):
        """gradreg_fast.penalty on the case: (value, gradients w.r.t. case.params)."""
        case, saved = self.case(name)
        _restore(case.model, saved)
        torch.manual_seed(RNG_SEED)
        x = ground_truth.repeated_batch(case.input(), repeat)
        y = ground_truth.repeated_batch(case.y, repeat) if kind not in GAN_KINDS else None
        if case.model_kwargs:
            extra["model_kwargs"] = ground_truth.repeated_kwargs(case.model_kwargs, case.y.shape[0], repeat)
        value = gr.penalty(kind, case.model, x, y, method=method,
                           generator=torch.Generator().manual_seed(gen_seed), **self.options(case, kind), **extra)
        grads = torch.autograd.grad(value, case.params, allow_unused=True)
        _restore(case.model, saved)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, case.params, strict=True)]
        return value.detach(), [g.detach() for g in grads]

    def run(self, name: str, kind: str, method: str) -> Cell:
        t0 = time.perf_counter()
        try:
            if method == "jvp" and self.jvp_check == "fixed":
                cell = self._run_jvp_fixed(name, kind)
            elif method == "jvp":
                self.call(name, kind, "jvp")     # a refusal surfaces here, before any ground truth
                cell = self._run_jvp_ztest(name, kind, self.truth(name, kind, JVP_REPEAT))
            else:
                truth = self.truth(name, kind)
                value, grads = self.call(name, kind, method)
                cell = self._compare(name, kind, method, truth, value, grads)
        except (ValueError, NotImplementedError) as exc:
            msg = str(exc)
            status = "refuses" if REFUSAL.search(msg) else "ERROR"
            cell = Cell(name, kind, method, status, message=f"{type(exc).__name__}: {msg}")
        except Exception as exc:  # a raw torch error: a defect
            cell = Cell(name, kind, method, "ERROR", message=f"{type(exc).__name__}: {exc}")
        cell.seconds = time.perf_counter() - t0
        return cell

    def jvp_truth(self, name: str, kind: str, gen_seed: int = GEN_SEED, n_proj: int = JVP_N_PROJ) -> ground_truth.Truth:
        """Plain double backprop's (1/n) Σ_j ‖J v_j‖² and its gradient at the tangents a jvp call with
        generator seed ``gen_seed`` draws (``ground_truth.jvp_tangents``)."""
        case, saved = self.case(name)
        _restore(case.model, saved)
        tangents = ground_truth.jvp_tangents(case.input(), torch.Generator().manual_seed(gen_seed), n_proj)
        truth = ground_truth.penalty(case, kind, rng_seed=RNG_SEED, tangents=tangents)
        _restore(case.model, saved)
        return truth

    def _run_jvp_fixed(self, name: str, kind: str) -> Cell:
        """jvp at fixed draws: the call's value and gradients against ``jvp_truth`` at the same draws."""
        value, grads = self.call(name, kind, "jvp", n_proj=JVP_N_PROJ)   # a refusal surfaces here
        truth = self.jvp_truth(name, kind)
        vacuous = _vacuous(name, kind, truth)
        if vacuous is not None:
            return vacuous
        cell = self._compare(name, kind, "jvp", truth, value, grads)
        if cell.status == "exact":
            cell.status = "unbiased"
            cell.message = (f"fixed draws ({JVP_N_PROJ} tangents): value and every parameter gradient equal "
                            f"double backprop's at the same tangents within {EXACT_RTOL:g}")
        return cell

    def _compare(self, name, kind, method, truth, value, grads) -> Cell:
        value_err = (abs(value - truth.value) / truth.value.abs().clamp_min(1e-300)).item()
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in truth.grads))
        per_param = [float((a - b).norm()) / max(float(b.norm()), 1e-8 * total, 1e-300)
                     for a, b in zip(grads, truth.grads, strict=True)]
        overall = math.sqrt(sum(float((a - b).pow(2).sum())
                                for a, b in zip(grads, truth.grads, strict=True))) / max(total, 1e-300)
        if method == "fd":
            ok = value_err <= EXACT_RTOL and all(math.isfinite(e) for e in per_param)
            return Cell(name, kind, method, "approx" if ok else "WRONG", value_err, overall)
        grad_err = max(per_param) if per_param else 0.0
        ok = value_err <= EXACT_RTOL and grad_err <= EXACT_RTOL
        return Cell(name, kind, method, "exact" if ok else "WRONG", value_err, grad_err)

    def _run_jvp_ztest(self, name, kind, truth) -> Cell:
        """z-tests of the mean over independent calls (each the mean of JVP_N_PROJ draws)."""
        vacuous = _vacuous(name, kind, truth)
        if vacuous is not None:   # the test would never be powered: it ran all JVP_MAX_CALLS calls
            return vacuous
        g_true = torch.cat([g.flatten() for g in truth.grads])
        unit = g_true / g_true.norm()
        rand = torch.randn(g_true.numel(), generator=torch.Generator().manual_seed(5), dtype=g_true.dtype)
        rand = rand / rand.norm()
        vals, along, across = [], [], []
        calls = 0
        while True:
            for _ in range(12):   # at least 12 calls: the standard error is estimated from them
                v, gs = self.call(name, kind, "jvp", gen_seed=10_000 + calls, n_proj=JVP_N_PROJ, repeat=JVP_REPEAT)
                flat = torch.cat([g.flatten() for g in gs])
                vals.append(float(v))
                along.append(float(flat @ unit))
                across.append(float(flat @ rand))
                calls += 1
            stats = [_mean_se(s) for s in (vals, along, across)]
            powered = (stats[0][1] <= JVP_POWER * abs(float(truth.value)) and
                       stats[1][1] <= JVP_POWER * float(g_true.norm()))
            if powered or calls >= JVP_MAX_CALLS:
                break
        truths = (float(truth.value), float(g_true.norm()), float(g_true @ rand))
        zs = [(m - t) / se if se > 0 else (0.0 if m == t else math.inf)
              for (m, se), t in zip(stats, truths, strict=True)]
        ok = powered and all(abs(z) < JVP_Z for z in zs)
        status = "unbiased" if ok else ("BIASED" if powered else "UNDERPOWERED")
        rel = abs(stats[1][0] - truths[1]) / truths[1]
        return Cell(name, kind, "jvp", status, abs(stats[0][0] - truths[0]) / abs(truths[0]), rel,
                    message=f"{calls} calls × {JVP_N_PROJ} draws × {JVP_REPEAT} copies; z value {zs[0]:+.2f}, "
                            f"along ∇ {zs[1]:+.2f}, random direction {zs[2]:+.2f}")


def _vacuous(name: str, kind: str, truth: ground_truth.Truth) -> Cell | None:
    """A VACUOUS cell when the ground truth's parameter gradient is all zeros (a layer initialized to zeros
    cuts x from the logits, torchvision ViT's head): any estimator returning zeros would match it."""
    if any(bool(g.any()) for g in truth.grads):
        return None
    return Cell(name, kind, "jvp", "VACUOUS", message="the ground truth's parameter gradient is 0: the case does "
                "not test the estimator (do the logits depend on x? a layer initialized to zeros?)")


def _mean_se(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(xs)))


def table(cells: list[Cell]) -> str:
    """Markdown: one row per (model, kind), one column per method."""
    by = {(c.model, c.kind, c.method): c for c in cells}
    models = list(dict.fromkeys(c.model for c in cells))
    kinds = list(dict.fromkeys(c.kind for c in cells))
    methods = [m for m in METHODS if any(c.method == m for c in cells)]
    lines = ["| model | layers | kind | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for m in models:
        for k in kinds:
            row = [by[(m, k, meth)].symbol() if (m, k, meth) in by else "" for meth in methods]
            lines.append(f"| {m} | {zoo.spec_of(m)['layers']} | {k} | " + " | ".join(row) + " |")
    return "\n".join(lines)


_SHORT_REASONS = (("serves frobreg, jacreg only", None), ("batch statistics", "batch statistics couple the samples"),
                  ("double backward", "an op has no double backward"),
                  ("torch.func", "a custom Function without forward-mode rule"),
                  ("forward mode", "an op without forward-mode rule"))


def _reason(message: str) -> str | None:
    for needle, short in _SHORT_REASONS:
        if needle in message:
            return short
    return message[:60]


def summary(cells: list[Cell]) -> str:
    """Markdown: one row per model, one column per method, over every kind the method serves."""
    models = list(dict.fromkeys(c.model for c in cells))
    methods = [m for m in METHODS if any(c.method == m for c in cells)]
    lines = ["| model | layers | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for m in models:
        row = []
        for meth in methods:
            group = [c for c in cells if c.model == m and c.method == meth]
            served = [c for c in group if not (c.status == "refuses" and _reason(c.message) is None)]
            reasons = {_reason(c.message) for c in served if c.status == "refuses"}
            statuses = {c.status for c in served}
            kinds = "" if len(served) == len(KINDS) or meth != "jvp" else f" ({', '.join(c.kind for c in served)})"
            if not served:
                row.append("")
            elif statuses == {"refuses"}:
                row.append("✗ " + "; ".join(sorted(reasons)))
            elif statuses == {"exact"}:
                row.append("✓ exact")
            elif statuses == {"unbiased"}:
                row.append("✓ unbiased" + kinds)
            elif statuses == {"approx"}:
                row.append(_approx(m, max(c.grad_err for c in served)))
            else:
                row.append("**" + ", ".join(sorted(statuses)) + "**")
        lines.append(f"| {m} | {zoo.spec_of(m)['layers']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


GENERATED_BEGIN = "<!-- conformance table: generated, do not edit -->"
GENERATED_END = "<!-- end of the generated conformance table -->"


def write_generated(path: str, text: str) -> None:
    """Write ``text`` to ``path``: between GENERATED_BEGIN and GENERATED_END when the file holds both (a
    page with prose around its table, docs/models.md), else as the whole file."""
    try:
        with open(path) as f:
            page = f.read()
    except FileNotFoundError:
        page = ""
    if GENERATED_BEGIN in page and GENERATED_END in page:
        head, rest = page.split(GENERATED_BEGIN, 1)
        text = head + GENERATED_BEGIN + "\n" + text + "\n" + GENERATED_END + rest.split(GENERATED_END, 1)[1]
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(zoo.ZOO + zoo.DISCRIMINATORS),
                    help="comma-separated names, or 'third_party': the third-party zoo's models installed here")
    ap.add_argument("--kinds", default=",".join(KINDS + GAN_KINDS),
                    help="classifier kinds run on the classifiers, GAN kinds on the discriminators")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--jvp-check", default="fixed", choices=JVP_CHECKS,
                    help="jvp cells: at fixed draws against double backprop (default, seconds) or by z-tests "
                         "over many calls (minutes per cell)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    mat = Matrix(jvp_check=a.jvp_check)
    cells = []
    names = a.models.split(",")
    if a.models == "third_party":
        from gradreg_fast.testing import third_party
        names = [n for n in third_party.NAMES if third_party.available(n)]
    for m in names:
        served = GAN_KINDS if m in zoo.DISCRIMINATORS else KINDS
        for k in [k for k in a.kinds.split(",") if k in served]:
            for meth in a.methods.split(","):
                c = mat.run(m, k, meth)
                cells.append(c)
                print(f"{m:20s} {k:14s} {meth:6s} {c.status:9s} value {c.value_err:.1e} grad {c.grad_err:.1e} "
                      f"{c.seconds:6.2f}s {c.message[:150]}", flush=True)
    md = summary(cells) + "\n\n" + table(cells)
    if a.out:
        command = "python -m gradreg_fast.testing.conformance" + (
            f" --models {a.models}" if a.models == "third_party" else "") + (
            f" --jvp-check {a.jvp_check}" if a.jvp_check != "fixed" else "") + f" --out {a.out}"
        write_generated(a.out, f"<!-- generated by: {command} -->\n<!-- torch {torch.__version__}, fp64 -->\n\n" + md)
    print(md)
    return 0 if all(c.ok for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
