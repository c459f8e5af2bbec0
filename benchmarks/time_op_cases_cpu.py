"""Stopgap until benchmarks/bench_ops.py lands: interleaved medians of one op-case module on one
CPU thread, fp32, one million elements. Usage (repo root): python benchmarks/time_op_cases_cpu.py <op> [reps]."""
import importlib, sys, time, statistics
import torch
sys.path.insert(0, '.')
torch.set_num_threads(1)
mod = importlib.import_module(f"benchmarks.op_cases.{sys.argv[1]}")
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 15
for c in mod.cases(torch.device('cpu'), torch.float32, 1_000_000):
    ts = {k: [] for k in c.run}
    for f in c.run.values(): f()
    for _ in range(reps):
        for k, f in c.run.items():  # interleaved
            t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
    print(c.op, c.pass_name, {k: round(v, 2) for k, v in med.items()}, 'ratio reference/cpp = %.2f' % (med['reference'] / med['cpp']))
