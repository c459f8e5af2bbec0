"""End-to-end training-step benchmark: what a gradient penalty costs per step, in time and memory.

For each model × batch size × penalty × method it measures, interleaved (one repetition of every
variant, then the next round), median over the rounds:

    plain   forward, cross-entropy, backward, optimizer step (Adam)
    naive   the same plus the penalty written the obvious way in PyTorch: create_graph=True input
            gradient (a Python loop over the K classes for FrobReg/JacReg), (CE + λ·P).backward()
    ours    gradreg_fast.GradRegLoss(kind, λ, method=..., every=...)(model, x, y).backward()
            (every=k: one repetition is k consecutive steps, and the time is their average;
            exact/fused: on gradreg_fast.fuse(model, activations="all"), every activation fused)

and reports each time as a ratio to the plain step and to the naive step of the same penalty, plus
peak memory. Memory: CUDA: torch.cuda.max_memory_allocated over one step (after warm-up), minus the
memory allocated before it. CPU: there is no allocator peak counter (and ru_maxrss is dominated by
the interpreter's and torch's own footprint), so the step runs once more under a TorchDispatchMode
that sees every op output (forward, autograd's backward ops, optimizer) and counts each new tensor
storage until it is freed: the peak of live tensor bytes created during the step, which includes
what autograd saves for the backward and the gradients. By default (--memory exact) plain, naive
and method="exact" are measured.

Usage (from the repository root):

    python benchmarks/bench_step.py                    # the full CPU table (one thread)
    python benchmarks/bench_step.py --quick --out /tmp/r  # seconds, for CI
    python benchmarks/bench_step.py --device cuda --amp bf16   # CUDA events, bf16 autocast
    python benchmarks/bench_step.py --model mypkg.nets:make_net --input-shape 3,32,32 --batch 64
    python benchmarks/bench_step.py --models dcgan_d --batch 64 --tag gan   # a GAN discriminator step

The discriminator step (``--models dcgan_d``, the GAN kinds r1 and wgan_gp only) is the loss on a real
and a generated batch: plain = softplus(D(fake)) + softplus(−D(real)) without penalty; naive = the
penalty by hand (create_graph); ours = gr.penalty(kind, D, real, ...) per method, "exact/every16" =
StyleGAN2's lazy R1, "exact/shared" = R1 through gr.penalties.penalty_from_output on the loss's own
D(real) (one forward of the real batch instead of two).

Outputs: a printed table, and bench_step_<device>[_<tag>].csv/.json/.png under --out
(default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/: harness, step_cases
import harness  # noqa: E402  (gradreg_fast: the installed package, else this source tree)

# isort: split

import torch  # noqa: E402

import gradreg_fast as gr  # noqa: E402
from harness.backends import compiled_backend  # noqa: E402
from harness.memory import cuda_peak_bytes, live_tensor_peak_bytes  # noqa: E402
from harness.progress import progress_bar  # noqa: E402
from harness.results import command_line, cpu_name, utc_now  # noqa: E402
from harness.timing import CPU_CLOCK, probe, time_interleaved  # noqa: E402
from step_cases import (  # noqa: E402
    METHODS,
    QUICK_METHODS,
    QUICK_PENALTIES,
    Variant,
    calls_per_rep,
    make_step,
    setup,
    variants_for,
)
from step_report import build_rows, format_table, write  # noqa: E402

_ROOT = Path(harness.ROOT)


def time_group(variants: list[Variant], device: str, reps: int, warmup: int, input_shape, amp, progress,
               refused: dict) -> dict:
    """Median seconds per variant, repetitions interleaved across the variants of one model/batch.
    A variant the library refuses for this model (a ValueError naming the method that works, e.g.
    jvp with batch statistics) is not timed: its key and the reason go into ``refused``."""
    v0 = variants[0]
    model, opt, x, y = setup(v0.model, v0.batch, device, input_shape)
    steps = {v.key: make_step(v, model, opt, x, y, amp) for v in variants}
    for k, exc in probe(steps, ValueError).items():   # the first warm-up step; a refusal shows here
        refused[k] = str(exc).splitlines()[0]
        progress.update(reps)
    return time_interleaved(steps, device, reps, warmup=max(0, warmup - 1), rotate=False, progress=progress,
                            calls={v.key: calls_per_rep(v) for v in variants})


def memory_mib(v: Variant, device: str, input_shape, amp) -> float:
    """MiB over one step (every=k: the k calls of one schedule period), after two warm-up steps: the
    CUDA allocator's growth, or on the CPU the peak live tensor storage created during the step."""
    model, opt, x, y = setup(v.model, v.batch, device, input_shape)
    step = make_step(v, model, opt, x, y, amp)
    step()
    step()

    def period():
        for _ in range(calls_per_rep(v)):
            step()
    peak = cuda_peak_bytes(period, device) if device.startswith("cuda") else live_tensor_peak_bytes(period)
    return peak / 2**20


# --------------------------------------------------------------------------------------- main


def steady_heap() -> str:
    """glibc's malloc told to keep what the process frees (see --steady-heap); the setting, for the results."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        raise SystemExit(f"--steady-heap needs glibc's mallopt: {exc}") from exc
    settings = {-3: 2**30, -1: 2**30, -2: 2**28}   # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD (bytes)
    if not all(mallopt(k, v) == 1 for k, v in settings.items()):
        raise SystemExit("--steady-heap: mallopt refused a setting")
    return "steady (mallopt: M_MMAP_THRESHOLD=1 GiB, M_TRIM_THRESHOLD=1 GiB, M_TOP_PAD=256 MiB)"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (CUDA events, max_memory_allocated); default: cuda when a GPU is visible")
    ap.add_argument("--models", default="lenet,mlp,resnet,vit", help="comma list of lenet, mlp, resnet, vit")
    ap.add_argument("--model", default=None, help="a user model as module:callable (replaces --models)")
    ap.add_argument("--input-shape", default=None, help="per-sample input shape for --model, e.g. 3,32,32")
    ap.add_argument("--batch", default="50", help="comma list of batch sizes (the paper's 50 by default; e.g. 50,256)")
    ap.add_argument("--penalties", default=None, help=f"comma list of {', '.join(gr.KINDS)} (default: all; "
                    f"--quick: {QUICK_PENALTIES}); {', '.join(gr.GAN_KINDS)} on --models dcgan_d (a D step)")
    ap.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default: all; "
                    f"--quick: {QUICK_METHODS})")
    ap.add_argument("--reps", type=int, default=11, help="interleaved repetitions (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype")
    ap.add_argument("--memory", default=None, choices=["none", "exact", "all"],
                    help="peak memory of: no variant / plain, naive and exact (default; none with "
                         "--quick) / every variant")
    ap.add_argument("--quick", action="store_true", help="seconds: LeNet batch 16, 3 reps, a few variants")
    ap.add_argument("--smoke", action="store_true",
                    help="every default (model x penalty x method) cell once at batch 2, no timing claims: "
                         "a crash in any cell fails (CI)")
    ap.add_argument("--steady-heap", action="store_true",
                    help="CPU, glibc: keep freed memory in the process (mallopt: no mmap for large blocks, no "
                         "trimming), so that a step reuses memory instead of faulting fresh pages in from the "
                         "kernel, whose cost on a VM varies over hours and weighs more on the step that "
                         "allocates more (naive double backprop)")
    ap.add_argument("--out", default=str(_ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.smoke:   # every cell of the default run, once, tiny
        args.batch, args.reps, args.warmup = "2", 1, 0
        args.memory = args.memory or "none"
        args.tag = args.tag or "smoke"
    if args.quick:   # small sizes; penalties and methods given on the command line are kept
        args.models, args.batch, args.reps, args.warmup = "lenet", "16", 3, 1
        args.penalties = args.penalties or QUICK_PENALTIES
        args.methods = args.methods or QUICK_METHODS
        args.memory = args.memory or "none"
        args.tag = args.tag or "quick"
    args.penalties = args.penalties or ",".join(gr.KINDS + gr.GAN_KINDS)   # each on its own models
    args.methods = args.methods or ",".join(METHODS)
    args.memory = args.memory or "exact"
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    ext = gr.backends()[compiled_backend(device)]
    if os.environ.get("GRADREG_REQUIRE_EXT") == "1" and not ext.available:
        raise SystemExit(f"GRADREG_REQUIRE_EXT=1 but the compiled kernels are unavailable: {ext.reason} "
                         f"(gradreg_fast from {gr.__file__})")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    heap = steady_heap() if args.steady_heap else "default"
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    input_shape = [int(s) for s in args.input_shape.split(",")] if args.input_shape else None
    if args.model and input_shape is None:
        raise SystemExit("--model module:callable needs --input-shape (per sample, e.g. 3,32,32)")
    models = [args.model] if args.model else args.models.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    penalties = [gr.penalties.check_kind(k) for k in args.penalties.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")

    groups = [variants_for(m, b, penalties, methods) for m in models for b in batches]
    total = sum(len(g) for g in groups) * args.reps
    progress = progress_bar(total=total, desc="bench_step", unit="step", file=sys.stderr)
    times, memory, refused = {}, {}, {}
    for group in groups:
        times.update(time_group(group, device, args.reps, args.warmup, input_shape, amp, progress, refused))
    progress.close()
    groups = [[v for v in g if v.key not in refused] for g in groups]
    for k, why in refused.items():
        print(f"refused (not timed): {k}: {why}")
    if args.memory != "none":
        for group in groups:
            for v in group:
                if args.memory == "exact" and v.impl == "ours" and v.method != "exact":
                    continue
                memory[v.key] = memory_mib(v, device, input_shape, amp)
    variants = [v for g in groups for v in g]
    rows = build_rows(variants, times, memory)
    table = format_table(rows)
    print(table)

    backends = {name: st.available for name, st in gr.backends().items()}
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    meta = dict(command=command_line("bench_step.py", argv),
                device=device, device_name=dev_name, threads=args.threads if device == "cpu" else None,
                amp=args.amp, torch=torch.__version__, reps=args.reps, gradreg_fast=gr.__file__, heap=heap,
                backends=backends, refused=refused,
                memory=("cuda max_memory_allocated growth over one step" if device.startswith("cuda") else
                        "peak live tensor storage created during one step (TorchDispatchMode accounting)"),
                clock="CUDA events" if device.startswith("cuda") else CPU_CLOCK,
                load_average=os.getloadavg(), time=utc_now())
    out = Path(args.out)
    stem = f"bench_step_{device.split(':')[0]}" + (f"_{args.tag}" if args.tag else "")
    write(out, stem, meta, rows, table)
    print(f"wrote {out / stem}.{{json,csv,txt,png}}")
    return rows


if __name__ == "__main__":
    main()
