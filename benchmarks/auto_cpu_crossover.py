#!/usr/bin/env python
"""Where backend="auto" switches from an op's pure-PyTorch reference to its C++ kernel on the CPU.

For each op of gradreg_fast.ops._registry.AUTO_CPU_REFERENCE and a range of input sizes, times what a
penalty step does with the op (one thread, process CPU time, repetitions of the two backends
interleaved): its forward, a create_graph backward and the double backward,

    s = op(z); (g,) = autograd.grad(s.sum(), z, create_graph=True); (g * v).sum().backward()

(project: of tanh(z), since project is linear) with backend="cpp" and with what auto runs on small
inputs ("ref": the reference; for project the op's small_cpu composite, out · r with r drawn by the
gaussian_like kernel, since its reference generates r in Python-level Philox). The C++ op pays a
fixed cost per call that the composite does not (torch.library's Python autograd wrappers), so the
composite wins on small inputs; the
table shows where, and AUTO_CPU_REFERENCE holds the sizes auto uses (docs/backends.md).

    python benchmarks/auto_cpu_crossover.py            (writes results/auto_cpu_crossover.txt)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # benchmarks/: harness
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split

import torch  # noqa: E402

import gradreg_fast as gr  # noqa: E402
from gradreg_fast.ops._registry import AUTO_CPU_REFERENCE  # noqa: E402
from harness.results import command_line, cpu_name, write_text  # noqa: E402
from harness.timing import CPU_CLOCK, time_interleaved  # noqa: E402

# (rows, columns) of each op's input: the step benchmark's sizes (logits 50x10, an input gradient
# 50x784 or 50x3x32x32) and up
SHAPES = {"cross_entropy": [(50, 10), (256, 10), (50, 100), (256, 100), (50, 1000), (256, 1000), (1024, 1000),
                            (64, 32000)],
          "sq_norm": [(50, 784), (50, 1568), (256, 784), (50, 3072), (256, 3072), (1024, 3072)],
          # SpectReg's projection of the logits (50x10), per-sample and shared r
          "project": [(50, 10), (256, 100), (50, 1000), (256, 1000), (1024, 1000)]}


@contextlib.contextmanager
def small_input_path(op: str):
    """backend="auto" runs what it runs on small CPU inputs (the reference, or the op's small_cpu
    composite) at every size inside."""
    limit = AUTO_CPU_REFERENCE[op]
    AUTO_CPU_REFERENCE[op] = 1 << 62
    try:
        yield
    finally:
        AUTO_CPU_REFERENCE[op] = limit


def step(op: str, rows: int, cols: int, backend: str):
    """One call of ``op`` on a (rows, cols) input: backend "cpp", or "reference": auto's small-input path."""
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(rows, cols, generator=g)
    v = torch.randn(rows, cols, generator=g)
    y = torch.randint(cols, (rows,), generator=g)

    def run():
        with small_input_path(op) if backend == "reference" else contextlib.nullcontext():
            once()

    def once():
        z = z0.clone().requires_grad_(True)
        backend_arg = "cpp" if backend == "cpp" else "auto"
        if op == "sq_norm":
            s = gr.ops.sq_norm(z, backend=backend_arg)
        elif op == "project":
            s = gr.ops.project(z.tanh(), 1, 0, backend=backend_arg)
        else:
            s = gr.ops.cross_entropy(z, y, backend=backend_arg)
        (grad,) = torch.autograd.grad(s.sum(), z, create_graph=True)
        (grad * v).sum().backward()
    return run


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions (median)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="the two smallest sizes of each op, 3 reps")
    args = ap.parse_args(argv)
    if not gr.backends()["cpp"].available:
        raise SystemExit(f"the C++ kernels are unavailable: {gr.backends()['cpp'].reason}")
    torch.set_num_threads(1)
    lines = [f"# {command_line('auto_cpu_crossover.py', argv)}",
             f"# {cpu_name()}, 1 thread, {CPU_CLOCK}, median of {args.reps}; forward + create_graph backward "
             "+ double backward per call",
             f"{'op':14s} {'shape':>12s} {'numel':>9s} {'cpp us':>9s} {'ref us':>9s} {'ref/cpp':>8s}  auto runs"]
    for op, shapes in SHAPES.items():
        for rows, cols in shapes[:2] if args.quick else shapes:
            calls = max(1, int(2e6 // (rows * cols)))   # ~ms per timed repetition on small inputs
            fns = {b: step(op, rows, cols, b) for b in ("cpp", "reference")}
            t = time_interleaved(fns, "cpu", 3 if args.quick else args.reps, warmup=1,
                                 calls={b: calls for b in fns})   # seconds per call
            cpp, ref = t["cpp"] * 1e6, t["reference"] * 1e6
            auto = "reference" if rows * cols <= AUTO_CPU_REFERENCE[op] else "cpp"
            lines.append(f"{op:14s} {f'{rows}x{cols}':>12s} {rows * cols:9d} {cpp:9.1f} {ref:9.1f} "
                         f"{ref / cpp:8.2f}  {auto}")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if not args.quick:
        write_text(os.path.join(args.out, "auto_cpu_crossover.txt"), text)
    return text


if __name__ == "__main__":
    main()
