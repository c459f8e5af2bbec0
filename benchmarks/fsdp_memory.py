"""Peak memory per rank of one penalized training step: DDP vs FSDP2 (fully_shard), every method.

    python benchmarks/fsdp_memory.py                 # launches torchrun with 2 gloo ranks on the CPU
    python benchmarks/fsdp_memory.py --hidden 1024 --out benchmarks/results/fsdp_memory.md

The model is an MLP d_in -> hidden -> hidden -> hidden -> 10 (tanh), fp32, trained with Adam on a
FrobReg-regularized loss (lam 0.01; every method serves FrobReg), batch --batch per rank. For each
engine (DDP; FSDP2 with every Linear and the root in fully_shard) and method (none = plain
cross-entropy, exact, hvp, fd, jvp) one rank process builds the model, takes one warm-up step (so
that Adam's state exists), resets the kernel's peak-RSS counter (/proc/self/clear_refs) and takes
--steps more (after one throwaway round of both engines, so that one-time allocations count
nowhere); the figure is the peak resident memory during those steps minus the resident memory
before the model was built: parameters, gradients, optimizer state, communication buffers and the
step's activations and temporaries, in MiB. glibc's malloc is told to serve every allocation above
64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and RSS
follows the live tensors. The step time (median of --steps) is printed beside it, both engines
measured side by side in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/: harness
import harness  # noqa: E402,F401  (gradreg_fast: the installed package, else this source tree)

# isort: split

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import gradreg_fast as gr  # noqa: E402
from gradreg_fast.testing.torchrun import exit_worker  # noqa: E402
from harness.results import write_text  # noqa: E402

METHODS = ("none", "exact", "hvp", "fd", "jvp")
ENGINES = ("ddp", "fsdp")
MIB = 1024.0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)


def make_model(args) -> nn.Module:
    torch.manual_seed(0)
    h = args.hidden
    return nn.Sequential(nn.Linear(args.d_in, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(),
                         nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))


def wrap(model: nn.Module, engine: str) -> nn.Module:
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def measure(engine: str, method: str, args, x, y) -> tuple[float, float]:
    gc.collect()
    base = _status_kib("VmRSS")
    model = wrap(make_model(args), engine)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    crit = None if method == "none" else gr.GradRegLoss("frobreg", lam=0.01, method=method, generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y) if crit is None else crit(model, x, y)
        loss.backward()
        opt.step()

    step()                      # warm-up: Adam's state, FSDP's lazy init, DDP's buckets
    gc.collect()
    dist.barrier()
    _reset_peak()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    model = opt = crit = None   # freed before the next measurement (step's closure holds them)
    gc.collect()
    dist.barrier()
    return (peak - base) / MIB, statistics.median(times)


def worker(args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.d_in, generator=g)
    y = torch.randint(10, (args.batch,), generator=g)
    n_params = sum(p.numel() for p in make_model(args).parameters())
    for engine in ENGINES:      # throwaway round: one-time allocations (gloo buffers, lazy imports,
        measure(engine, "exact", args, x, y)   # kernels' caches) must not count against the first row
    rows = {}
    for method in args.methods:
        for engine in ENGINES:
            mem, sec = measure(engine, method, args, x, y)
            both = [None] * world
            dist.all_gather_object(both, (mem, sec))
            rows[(engine, method)] = (max(m for m, _ in both), max(s for _, s in both))
    if rank == 0:
        p_mib = n_params * 4 / MIB / MIB
        lines = [
            f"MLP {args.d_in}-{args.hidden}-{args.hidden}-{args.hidden}-10 (tanh, fp32): {n_params / 1e6:.2f} M "
            f"parameters = {p_mib:.1f} MiB (P); FrobReg lam 0.01, Adam, batch {args.batch} per rank, "
            f"{world} gloo ranks, 1 thread each, torch {torch.__version__}",
            f"command: python benchmarks/fsdp_memory.py --hidden {args.hidden} --batch {args.batch} "
            f"--steps {args.steps} --methods {','.join(args.methods)}",
            "",
            "| method | DDP peak MiB/rank | FSDP2 peak MiB/rank | FSDP2 / DDP | DDP s/step | FSDP2 s/step |",
            "|---|---|---|---|---|---|",
        ]
        for method in args.methods:
            (dm, ds), (fm, fs) = rows[("ddp", method)], rows[("fsdp", method)]
            lines.append(f"| {method} | {dm:.0f} ({dm / p_mib:.1f} P) | {fm:.0f} ({fm / p_mib:.1f} P) | "
                         f"{fm / dm:.2f} | {ds:.3f} | {fs:.3f} |")
        text = "\n".join(lines)
        print(text, flush=True)
        if args.out:
            write_text(args.out, text + "\n")
    exit_worker()   # the results are written (gloo's teardown on torch 2.14.1: see exit_worker)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--d-in", dest="d_in", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    ap.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    ap.add_argument("--methods", type=lambda v: tuple(v.split(",")), default=METHODS,
                    help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    if args.worker:
        worker(args)
        return
    if not sys.platform.startswith("linux"):
        sys.exit("fsdp_memory.py reads /proc/self/status: Linux only")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           os.path.abspath(__file__), "--worker"] + [a for a in sys.argv[1:] if a != "--worker"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
