#!/usr/bin/env python
"""Microbenchmarks of every op: each backend against the reference composite, side by side.

Collects the cases of every module in benchmarks/op_cases/ (interface: op_cases/__init__.py) and,
per case and backend, measures

- the median time: CPU with torch.set_num_threads(1) and time.perf_counter; CUDA with CUDA events
  after a warm-up. Repetitions of the backends are interleaved (round robin, rotating the order),
  so drifts of the machine hit all of them alike;
- the peak memory: on CUDA torch.cuda.max_memory_allocated above what was allocated before the
  call; on the CPU it is NOT measured (PyTorch's CPU allocator keeps no peak counter; the column
  stays empty);
- the achieved bandwidth bytes_moved / time, and the bandwidth of a device-to-device copy of a
  tensor of numel elements of the same dtype measured the same way (the % column).

Prints a table (fastest backend of each case marked *, speed-up = reference time / time) and
writes benchmarks/results/ops_<device>.csv and .json (or under --out).

    python benchmarks/bench_ops.py --device cpu --ops bias_act
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16
    python benchmarks/bench_ops.py --quick --ops bias_act --out /tmp/x     (smoke test)
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # benchmarks/: harness, op_cases
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split

import torch  # noqa: E402

import op_cases  # noqa: E402
from harness.memory import cuda_peak_bytes  # noqa: E402
from harness.results import command_line, cpu_name, utc_now, write_csv, write_json  # noqa: E402
from harness.timing import probe, time_interleaved  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--numel", type=int, default=1_000_000, help="elements of the main input (default 1e6)")
    p.add_argument("--ops", default="", help="comma-separated op modules or op names to run (default: all)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per backend (default 25, quick 3)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CI smoke test)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of the CSV/JSON files")
    args = p.parse_args(argv)
    if args.quick:
        args.numel = min(args.numel, 4096)
    if args.reps is None:
        args.reps = 3 if args.quick else 25
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    return args


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def copy_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    """Bytes per second of dst.copy_(src) (read + write) for numel elements."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, device, max(reps, 5), warmup=3)["copy"]
    return 2 * numel * src.element_size() / t


def load_case_modules(selected: list[str]):
    modules = []
    for info in sorted(pkgutil.iter_modules(op_cases.__path__), key=lambda m: m.name):
        if selected and not any(s == info.name or s.startswith(info.name + "[") for s in selected):
            continue
        modules.append((info.name, importlib.import_module(f"op_cases.{info.name}")))
    return modules


def run(args) -> tuple[list[dict], dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(1)
    selected = [s.strip() for s in args.ops.split(",") if s.strip()]
    copy_bw = copy_bandwidth(args.numel, dtype, device, args.reps)
    rows, errors = [], []
    for mod_name, mod in load_case_modules(selected):
        try:
            cases = mod.cases(device, dtype, args.numel)
        except Exception as exc:  # one broken module must not hide the others
            errors.append(f"{mod_name}: cases() failed: {exc!r}")
            traceback.print_exc()
            continue
        for case in cases:
            if selected and not any(s in (mod_name, case.op) for s in selected):
                continue
            fns = dict(case.run)
            failed = {be: repr(exc) for be, exc in probe(fns).items()}
            errors += [f"{case.op} {case.pass_name} {be}: {why}" for be, why in failed.items()]
            times = time_interleaved(fns, device, args.reps, warmup=1 if args.quick else 3)
            ref_t = times.get("reference")
            best = min(times, key=times.get) if times else None
            for be in case.run:
                t = times.get(be)
                gbs = case.bytes_moved / t / 1e9 if t else None
                rows.append(dict(
                    op=case.op, pass_name=case.pass_name, backend=be, numel=case.numel,
                    dtype=args.dtype, device=device.type, time_ms=t * 1e3 if t else None,
                    speedup=(ref_t / t) if (t and ref_t) else None, bytes_moved=case.bytes_moved,
                    gbps=gbs, pct_copy=(100 * gbs * 1e9 / copy_bw) if gbs else None,
                    peak_mb=cuda_peak_bytes(fns[be], device) / 2**20 if be in fns and device.type == "cuda" else None,
                    fastest=be == best, error=failed.get(be)))
    meta = dict(device=device.type, device_name=device_name(device), dtype=args.dtype, numel=args.numel,
                reps=args.reps, threads=torch.get_num_threads(), torch=torch.__version__,
                copy_gbps=copy_bw / 1e9, command=command_line("bench_ops.py"), time=utc_now(), errors=errors,
                memory="peak bytes above the allocation before the call (CUDA); not measured on the CPU")
    return rows, meta


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def print_table(rows, meta):
    print(f"# {meta['device_name']} ({meta['device']}), {meta['dtype']}, numel {meta['numel']}, "
          f"{meta['threads']} thread(s), median of {meta['reps']}; copy bandwidth {meta['copy_gbps']:.1f} GB/s")
    head = f"{'op':<22} {'pass':<16} {'backend':<10} {'ms':>9} {'speed-up':>8} {'GB/s':>8} {'%copy':>6} {'peak MB':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mark = "*" if r["fastest"] else " "
        if r["error"]:
            print(f"{r['op']:<22} {r['pass_name']:<16} {r['backend']:<10} ERROR {r['error'][:60]}")
            continue
        print(f"{r['op']:<22} {r['pass_name']:<16} {r['backend']:<10} {_fmt(r['time_ms'], '9.3f')}{mark}"
              f"{_fmt(r['speedup'], '7.2f')}x {_fmt(r['gbps'], '8.2f')} {_fmt(r['pct_copy'], '6.1f')} "
              f"{_fmt(r['peak_mb'], '8.1f')}")


def write_results(rows, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"ops_{meta['device']}")
    fields = ["op", "pass_name", "backend", "numel", "dtype", "device", "time_ms", "speedup", "bytes_moved",
              "gbps", "pct_copy", "peak_mb", "fastest", "error"]
    write_csv(stem + ".csv", rows, fields, lineterminator="\r\n")   # as the ops tables have always been
    write_json(stem + ".json", dict(meta=meta, rows=rows))
    return stem


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, meta = run(args)
    print_table(rows, meta)
    stem = write_results(rows, meta, args.out)
    print(f"wrote {stem}.csv and {stem}.json")
    if not rows:
        print("no benchmark case matched --ops", args.ops, file=sys.stderr)
        return 1
    if meta["errors"]:
        print("errors:\n  " + "\n  ".join(meta["errors"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
