"""Ahead-of-time compilation of the recorded Triton launches for NVIDIA GPUs, on a machine without one.

A developer tool (tests/tooling/test_triton_aot.py, scripts/cuda_build_check.sh, scripts/gpu_check.sh run it),
not part of the installed package: nothing in gradreg_fast imports it. It needs gradreg_fast importable
(the kernels it compiles are looked up by module name).

The launch table (``tests/triton_launches.jsonl``, written by gradreg_fast/triton/_launch.py while the
test suite runs) holds every specialization the library launched. Each one is rebuilt with the
installed Triton's own argument binder (the code path of ``kernel[grid](...)``: same signature,
same ``tt.divisibility`` attributes, same constexprs) and compiled with ``triton.compile`` for a
``GPUTarget("cuda", arch, 32)``: Triton's code generator, LLVM and the ptxas shipped in the triton
wheel run exactly as on a GPU machine, only the launch is missing. Registers per thread, stack
frame and static shared memory come from the cubin (``cuobjdump --dump-resource-usage``, from the
wheel); spill stores/loads from the ptxas -v log of the same compilation (its register count must
equal the cubin's); Triton's own shared memory request is in the metadata. A stack
frame without spills is a local array: 56 bytes in the kernels calling tl.sin/tl.cos on fp64 is
libdevice's argument reduction table for large arguments.

Occupancy bound on an H100 (compute capability 9.0; CUDA occupancy calculator rules): per SM at
most 64 resident warps, 32 blocks, 65536 registers allocated per warp in units of 256
(regs/warp = ceil(32·regs / 256)·256) and 228 KiB of shared memory (1 KiB reserved per block,
allocated in units of 128 B). Resident blocks per SM

    blocks = min(32, ⌊64 / W⌋, ⌊⌊65536 / regs_per_warp⌋ / W⌋, ⌊233472 / smem_per_block⌋),

W = warps per block, and the bound is blocks · W / 64 of the SM's warp slots. It is an upper
bound on occupancy (the launch grid may have fewer blocks), not a measurement.

    python scripts/triton_aot.py triton tests/triton_launches.jsonl --jobs 2 \
        --report benchmarks/results/gpu_resources_triton.md
    python scripts/triton_aot.py cuda build.log --report benchmarks/results/gpu_resources_cuda.md

The second parses the ``nvcc -Xptxas -v`` output of a CUDA build (scripts/cuda_build_check.sh).

Run it without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)

# Spills found and explained by reading the SASS (cuobjdump -sass) of every flagged specialization:
# kernel -> (most spill bytes, stores + loads, seen in one specialization, allowed up to; why).
# tests/tooling/test_triton_aot.py fails on any other spill.
EXPLAINED_SPILLS = {
    "_project_kernel": (64, "Values live across the calls to libdevice's out-of-line fp64 sin/cos argument "
                            "reduction (a subroutine with its own stack frame, for |θ| beyond the inline "
                            "path's range, which θ in [0, 2π) never reaches): the call ABI saves them, "
                            "stored once before the K loop and reloaded inside it, 4-16 bytes each way"),
    "sq_norm_rows_kernel": (32, "On sm_80 with fp64 only: ptxas keeps 32 registers and spills two fp64 partial sums "
                                "in the remainder block after the unrolled main loop (once per program, 16 bytes "
                                "each way)"),
}

# H100 (compute capability 9.0) per-SM limits used by the occupancy bound (see the module docstring)
SM_WARPS, SM_BLOCKS, SM_REGS, REG_UNIT = 64, 32, 65536, 256
SM_SMEM, SMEM_RESERVED, SMEM_UNIT = 228 * 1024, 1024, 128


def load_table(path: str) -> list[dict]:
    """The launch table's entries (one JSON object a line), in file order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table_digest(path: str) -> str:
    """sha256 of the table's set of entries (order and duplicates do not matter)."""
    lines = sorted({json.dumps(e, sort_keys=True) for e in load_table(path)})
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def unlisted(recorded_path: str, table_path: str) -> list[str]:
    """Entries recorded in ``recorded_path`` that the table ``table_path`` lacks (JSON lines)."""
    if not os.path.exists(recorded_path):
        return []
    table = {json.dumps(e, sort_keys=True) for e in load_table(table_path)}
    return sorted({json.dumps(e, sort_keys=True) for e in load_table(recorded_path)} - table)


def occupancy_bound(regs: int, smem: int, num_warps: int) -> tuple[int, str]:
    """(resident blocks per SM on an H100, the limiting resource) for one kernel."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    smem_block = -(-(smem + SMEM_RESERVED) // SMEM_UNIT) * SMEM_UNIT
    limits = {"blocks": SM_BLOCKS, "warps": SM_WARPS // num_warps,
              "registers": (SM_REGS // regs_per_warp) // num_warps, "shared memory": SM_SMEM // smem_block}
    limiter = min(limits, key=lambda k: (limits[k], k != "warps"))
    return limits[limiter], limiter


def _jit_function(name: str):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("scripts/triton_aot.py compiles for a GPU target: unset TRITON_INTERPRET "
                           "(under the interpreter the kernels are Python functions)")
    module, attr = name.split(":")
    return getattr(importlib.import_module(module), attr)


def _arguments(entry: dict, fn) -> tuple[list, dict]:
    """Stand-ins for the recorded arguments: CPU tensors of the recorded dtype and alignment (Triton
    specializes a pointer on its element type and on address % 16 only), ints of the recorded class."""
    import torch
    import triton.language as tl

    def value(v):
        if isinstance(v, dict) and "tensor" in v:
            dtype = getattr(torch, v["tensor"])
            t = torch.empty(16, dtype=dtype)
            return t if v["align16"] else t[1:]  # element size < 16: one element in is misaligned
        if isinstance(v, dict) and "tl_dtype" in v:
            return tl.dtype(v["tl_dtype"])
        return v

    names = fn.arg_names
    if len(entry["args"]) != len(names):
        raise ValueError(f"{entry['kernel']}: the table has {len(entry['args'])} arguments, the kernel "
                         f"{len(names)} ({names}); re-record the launch table")
    cx = {p.name for p in fn.params if p.is_constexpr}
    args = [value(v) for n, v in zip(names, entry["args"], strict=False) if n not in cx]
    kwargs = {n: value(v) for n, v in zip(names, entry["args"], strict=False) if n in cx}
    kwargs.update({k: value(v) for k, v in entry.get("options", {}).items()})
    return args, kwargs


def _source(entry: dict, arch: int):
    """(ASTSource, options dict, target, spec text) of one table entry, built as ``kernel[grid]`` would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(entry["kernel"])
    if not hasattr(fn, "_pack_args") or not hasattr(fn, "params"):
        raise RuntimeError(f"triton {triton.__version__}: JITFunction has no _pack_args/params; "
                           "scripts/triton_aot.py supports triton 3.6-3.9")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args, kwargs = _arguments(entry, fn)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    spec = []
    for name, (ty, sp) in zip(fn.arg_names, specialization, strict=False):
        if ty == "constexpr":
            spec.append(f"{name}={getattr(sp, 'name', sp)}")
        elif ty.startswith("*"):
            spec.append(f"{ty[1:]}{'' if sp == 'D' else '(unaligned)'}")
        else:
            spec.append(f"{name}:{ty}{'/16' if sp == 'D' else ''}")
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, target, " ".join(spec)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's one function, from the wheel's cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {k: int(fields[k]) for k in ("REG", "STACK", "SHARED", "LOCAL")}


def _compile_logged(src, target, options: dict, arch: int):
    """``triton.compile`` plus the ptxas -v log of that very compilation (parsed, one row).

    Triton runs ptxas with -v and drops the log unless knobs.nvidia.dump_ptxas_log is set, and a
    cache hit runs no ptxas at all; so the first compilation of a specialization is forced
    (knobs.compilation.always_compile) with the log printed and captured, and the log is kept
    beside Triton's cache under a key of the source, options, target and triton version."""
    import triton
    from triton import knobs

    key = hashlib.sha256(json.dumps([src.hash(), options, arch, triton.__version__], sort_keys=True,
                                    default=str).encode()).hexdigest()
    log_path = os.path.join(knobs.cache.dir, "gradreg_ptxas", key + ".log")
    if os.path.exists(log_path):
        compiled = triton.compile(src, target=target, options=options)
        with open(log_path) as f:
            log = f.read()
    else:
        saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                compiled = triton.compile(src, target=target, options=options)
        finally:
            knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
        log = buf.getvalue()
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        tmp = f"{log_path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(log)
        os.replace(tmp, log_path)
    rows = parse_ptxas_log(log)
    if len(rows) != 1:
        raise RuntimeError(f"expected one kernel in the ptxas -v log, got {len(rows)}: {log[-2000:]}")
    return compiled, rows[0]


def compile_entry(entry: dict, arch: int) -> dict:
    """Compile one table entry for sm_<arch>; the result row (``ok`` False with the error on failure)."""

    row = {"kernel": entry["kernel"].split(":")[1], "arch": arch, "ok": False}
    t0 = time.perf_counter()
    try:
        src, options, target, spec = _source(entry, arch)
        row["spec"] = spec
        compiled, pv = _compile_logged(src, target, options, arch)
        res = _resource_usage(compiled.asm["cubin"])
        if pv["regs"] != res["REG"]:
            raise RuntimeError(f"ptxas log says {pv['regs']} registers, the cubin {res['REG']}")
        md = compiled.metadata
        smem = int(md.shared) + res["SHARED"]
        blocks, limiter = occupancy_bound(res["REG"], smem, md.num_warps)
        spill = pv["spill_stores"] + pv["spill_loads"]
        row.update(ok=True, regs=res["REG"], stack=res["STACK"], local=res["LOCAL"],
                   spill_stores=pv["spill_stores"], spill_loads=pv["spill_loads"], spill=spill > 0, smem=smem,
                   num_warps=md.num_warps, blocks=blocks, occupancy=blocks * md.num_warps / SM_WARPS,
                   limiter=limiter)
    except Exception as exc:  # reported per entry; main() exits non-zero
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _compile_job(job: tuple[dict, int]) -> dict:
    return compile_entry(*job)


def compile_table(entries: list[dict], archs=ARCHS, jobs: int = 1) -> list[dict]:
    """Every distinct specialization compiled once per arch: entries that Triton's binder maps to the
    same compiled kernel (same ASTSource hash) share one compilation. One row per (specialization, arch)."""
    work = {}
    for e in entries:
        for a in archs:
            try:
                key = (_source(e, a)[0].hash(), a)
            except Exception:  # compile_entry reports the error in its row
                key = (json.dumps(e, sort_keys=True), a)
            work.setdefault(key, (e, a))
    if jobs <= 1:
        return [compile_entry(e, a) for e, a in work.values()]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_job, work.values(), chunksize=4))


def unexplained_spills(rows: list[dict]) -> list[dict]:
    """Rows with a spill that EXPLAINED_SPILLS does not cover (other kernel, or more bytes)."""
    return [r for r in rows if r.get("spill") and r["spill_stores"] + r["spill_loads"]
            > EXPLAINED_SPILLS.get(r["kernel"], (0, ""))[0]]


def _arch_cells(kernel_rows: list[dict], archs: list, occupancy) -> list[str]:
    """A kernel's per-arch cells of a report's "Per kernel" table: its most registers, and its lowest
    ``occupancy(row)`` with that row's limiting resource."""
    cells = []
    for a in archs:
        ka = [r for r in kernel_rows if r["arch"] == a]
        worst = min(ka, key=occupancy) if ka else None
        cells += [str(max(r["regs"] for r in ka)) if ka else "-",
                  f"{occupancy(worst):.0%} ({worst['limiter']})" if worst else "-"]
    return cells


def triton_report(rows: list[dict], table_path: str, command: str) -> str:
    """The resource report (markdown): a per-kernel summary and one line per specialization."""
    import triton

    archs = sorted({r["arch"] for r in rows})
    kernels = sorted({r["kernel"] for r in rows})
    ok = [r for r in rows if r["ok"]]
    spills = [r for r in ok if r["spill"]]
    out = [
        "# Triton kernels: GPU resources (ahead-of-time compilation, no GPU)",
        "",
        f"Generated by `{command}` with triton {triton.__version__}; launch table sha256 "
        f"`{table_digest(table_path)}`.",
        "Every specialization the test suite launched, compiled for " + ", ".join(f"sm_{a}" for a in archs) + ".",
        "regs: registers per thread; stack: stack frame bytes per thread; spill: ptxas spill stores + loads "
        "(bytes per thread, flagged SPILL); smem: shared memory bytes per block; occupancy: the H100 bound",
        "(resident warps / 64 per SM, limiting resource in brackets; rules in scripts/triton_aot.py). An A100 "
        "has the same warp, block and register limits and 164 KiB of shared memory per SM, so the bound is the",
        f"same there while smem stays small (largest here: {max((r['smem'] for r in ok), default=0)} bytes).",
        "",
        f"{len(rows) // max(len(archs), 1)} specializations of {len(kernels)} kernels; "
        f"{len(rows) - len(ok)} failed to compile; {len(spills)} with a spill"
        + (f" ({len(unexplained_spills(rows))} unexplained; see Spills below)." if spills else "."),
        "",
        "## Per kernel",
        "",
        "| kernel | specializations | " + " | ".join(f"sm_{a} regs (max) | sm_{a} min occupancy" for a in archs)
        + " | spills |",
        "|---|---|" + "---|---|" * len(archs) + "---|",
    ]
    for k in kernels:
        kr = [r for r in ok if r["kernel"] == k]
        cells = _arch_cells(kr, archs, lambda r: r["occupancy"])
        n_spill = sum(r["spill"] for r in kr)
        n_spec = len({r["spec"] for r in kr})
        out.append(f"| {k} | {n_spec} | " + " | ".join(cells) + f" | {n_spill or 'none'} |")
    out += ["", "## Per specialization", "",
            "| kernel | specialization | warps | " + " | ".join(f"sm_{a} regs / stack / spill / smem / occupancy"
                                                              for a in archs) + " |",
            "|---|---|---|" + "---|" * len(archs)]
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["kernel"], r.get("spec", "?")), {})[r["arch"]] = r
    for (k, spec), per in sorted(by_key.items()):
        cells = []
        for a in archs:
            r = per.get(a)
            if r is None or not r["ok"]:
                cells.append("FAILED" if r is not None else "-")
                continue
            spill = r["spill_stores"] + r["spill_loads"]
            cells.append(f"{r['regs']} / {r['stack']} / {spill}{' SPILL' if r['spill'] else ''} / {r['smem']} / "
                         f"{r['occupancy']:.0%}")
        warps = next((r["num_warps"] for r in per.values() if r["ok"]), "-")
        out.append(f"| {k} | `{spec}` | {warps} | " + " | ".join(cells) + " |")
    # specializations that differ only in the integer type (i32/i64) of an argument: Triton types a
    # Python int by its value, so e.g. a seed word at or above 2**31 compiles another variant
    by_shape: dict[tuple, set] = {}
    for r in ok:
        if r["arch"] == archs[-1]:
            by_shape.setdefault((r["kernel"], re.sub(r":i(32|64)", ":int", r["spec"])), set()).add(r["spec"])
    extra = {k: sum(len(v) - 1 for (kk, _), v in by_shape.items() if kk == k) for k in kernels}
    if any(extra.values()):
        out += ["", "## Variants by integer type", "",
                "Triton types a runtime Python int by its value (i32 below 2**31, else i64), so the same launch "
                "compiles a new variant when an argument crosses 2**31 (on a GPU: a JIT compilation at its first "
                "use). Specializations that differ from another only in such a type: "
                + ", ".join(f"{k} {n}" for k, n in sorted(extra.items()) if n) + "."]
    if spills:
        out += ["", "## Spills", ""]
        for k in sorted({r["kernel"] for r in spills}):
            worst = max(r["spill_stores"] + r["spill_loads"] for r in spills if r["kernel"] == k)
            why = EXPLAINED_SPILLS.get(k, (0, "UNEXPLAINED"))[1]
            out.append(f"- {k}: {sum(r['kernel'] == k for r in spills)} (specialization, arch) pairs, at most "
                       f"{worst} bytes per thread (stores + loads). {why}.")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        out += ["", "## Failed to compile", ""] + [f"- {r['kernel']} sm_{r['arch']} `{r.get('spec', '?')}`: "
                                                   f"{r['error']}" for r in failed]
    return "\n".join(out) + "\n"


def parse_ptxas_log(text: str) -> list[dict]:
    """Kernels in the output of ``nvcc -Xptxas -v`` (one row per entry function and arch):
    name (mangled), arch, regs, smem (static bytes), stack, spill_stores, spill_loads (bytes)."""
    rows, current, props = [], None, {}
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2)}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = {"for": m.group(1)}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and props:
            props.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            row = dict(current, regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0,
                       stack=0, spill_stores=0, spill_loads=0)
            if props.get("for") == current["name"]:
                row.update({k: props[k] for k in ("stack", "spill_stores", "spill_loads") if k in props})
            rows.append(row)
            current, props = None, {}
    return rows


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def _kernel_name(demangled: str) -> str:
    """The function's own name in a demangled signature ('ns::f<int, float>(float*)' -> 'f')."""
    plain = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    head = re.split(r"[<(]", plain, maxsplit=1)[0]
    return head.rsplit("::", 1)[-1]


def cuda_report(rows: list[dict], threads: int, generated_by: str) -> str:
    """The CUDA kernels' resource report (markdown) from parse_ptxas_log rows: per kernel, then per
    template instantiation and arch."""
    names = _demangle([r["name"] for r in rows])
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    archs = sorted({r["arch"] for r in rows})
    warps = threads // 32
    for name, r in zip(names, rows, strict=True):
        r["demangled"], r["kernel"] = name, _kernel_name(name)
        r["blocks"], r["limiter"] = occupancy_bound(r["regs"], r["smem"], warps)
    out = ["# CUDA kernels: GPU resources (ptxas -v of the CUDA build, no GPU)", "",
           f"Generated by `{generated_by}`: the ptxas report of every kernel instantiation in csrc/cuda/*.cu, "
           f"for {', '.join(archs)}.",
           f"Every kernel launches {threads} threads per block ({warps} warps, kThreads in csrc/cuda/*.cu); "
           "occupancy is the H100 bound of scripts/triton_aot.py for that block size.",
           "regs: registers per thread; smem: static shared memory bytes per block; stack, spill stores / loads: "
           "bytes per thread (ptxas).", "",
           f"{len(rows)} (instantiation, arch) pairs of {len({r['kernel'] for r in rows})} kernels; "
           f"{len(spills)} with a spill.", "",
           "## Per kernel", "",
           "| kernel | instantiations | " + " | ".join(f"{a} regs (max) | {a} min occupancy" for a in archs)
           + " | max stack | spills |",
           "|---|---|" + "---|---|" * len(archs) + "---|---|"]
    for k in sorted({r["kernel"] for r in rows}):
        kr = [r for r in rows if r["kernel"] == k]
        cells = _arch_cells(kr, archs, lambda r: r["blocks"] * warps / SM_WARPS)
        n_spill = sum(bool(r["spill_stores"] or r["spill_loads"]) for r in kr)
        out.append(f"| {k} | {len({r['demangled'] for r in kr})} | " + " | ".join(cells)
                   + f" | {max(r['stack'] for r in kr)} | {n_spill or 'none'} |")
    out += ["", "## Per instantiation", "",
            "| kernel | arch | regs | smem | stack | spill stores / loads | occupancy |",
            "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["demangled"], r["arch"])):
        spill = f"{r['spill_stores']} / {r['spill_loads']}" + (" SPILL" if r["spill_stores"] or r["spill_loads"]
                                                               else "")
        out.append(f"| `{r['demangled']}` | {r['arch']} | {r['regs']} | {r['smem']} | {r['stack']} | {spill} | "
                   f"{r['blocks'] * warps / SM_WARPS:.0%} ({r['limiter']}) |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description="GPU resource reports without a GPU: compile every recorded "
                                 "Triton launch for GPU targets (triton), or parse the CUDA build's ptxas -v "
                                 "output (cuda).")
    sub = ap.add_subparsers(dest="what", required=True)
    tp = sub.add_parser("triton", help="compile the launch table for sm_80/sm_90 and report")
    tp.add_argument("table", help="launch table (JSONL from GRADREG_RECORD_LAUNCHES)")
    tp.add_argument("--arch", type=int, action="append", help="compute capability x10, repeatable "
                    f"(default: {', '.join(map(str, ARCHS))})")
    tp.add_argument("--jobs", type=int, default=1, help="parallel compile processes (default 1)")
    tp.add_argument("--json", help="write the per-specialization rows to this JSON file")
    tp.add_argument("--report", help="write the markdown resource report to this file")
    cp = sub.add_parser("cuda", help="parse a CUDA build log made with GRADREG_PTXAS_VERBOSE=1 and report")
    cp.add_argument("log", help="build log holding the ptxas -v output")
    cp.add_argument("--threads", type=int, default=256, help="threads per block of every kernel (default 256)")
    cp.add_argument("--report", help="write the markdown resource report to this file")
    cp.add_argument("--generated-by", help="how the build log was made, for the report's header "
                    "(default: this command)")
    args = ap.parse_args(argv)
    command = "python scripts/triton_aot.py " + " ".join(argv)
    if args.what == "cuda":
        with open(args.log, errors="replace") as f:
            rows = parse_ptxas_log(f.read())
        if not rows:
            print(f"no ptxas -v output in {args.log} (build with GRADREG_PTXAS_VERBOSE=1 and pip install -v)",
                  file=sys.stderr)
            return 1
        n_spill = sum(bool(r["spill_stores"] or r["spill_loads"]) for r in rows)
        print(f"{len(rows)} CUDA kernel instantiations, max {max(r['regs'] for r in rows)} registers, "
              f"{n_spill} with a spill")
        if args.report:
            with open(args.report, "w") as f:
                f.write(cuda_report(rows, args.threads, args.generated_by or command))
        return 0
    archs = tuple(args.arch or ARCHS)
    entries = load_table(args.table)
    if not entries:
        ap.error(f"{args.table} holds no launches")
    t0 = time.perf_counter()
    rows = compile_table(entries, archs, args.jobs)
    elapsed = time.perf_counter() - t0
    failed = [r for r in rows if not r["ok"]]
    n_spill = sum(r.get("spill", False) for r in rows)
    print(f"compiled {len(rows) - len(failed)}/{len(rows)} (specialization, arch) pairs for "
          f"{', '.join(f'sm_{a}' for a in archs)} in {elapsed:.1f} s; {n_spill} with a spill, "
          f"{len(unexplained_spills(rows))} unexplained")
    for r in failed:
        print(f"FAILED {r['kernel']} sm_{r['arch']} {r.get('spec', '?')}: {r['error']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": elapsed, "rows": rows}, f, indent=1)
    if args.report:
        with open(args.report, "w") as f:
            f.write(triton_report(rows, args.table, command))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
