"""Every Triton specialization the library launches compiles for sm_80 and sm_90 — without a GPU.

The interpreter that runs the Triton kernels in these tests accepts code that the real compiler
rejects (and the reverse). tests/triton_launches.jsonl lists every specialization the test suite
launched (recorded by gradreg_fast/triton/_launch.py; conftest compiles any launch missing from it at
the end of the session); here each one is compiled for both targets by Triton's own compiler, LLVM
and ptxas (scripts/triton_aot.py, a developer tool outside the package), and checked for spills.
Plus: the recorder keeps what Triton specializes on, the launch sites all go through it, the committed
resource report matches the table, the ptxas parser and the occupancy bound, and scripts/gpu_check.sh's commands exist.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile

import pytest
import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from conftest import LAUNCH_TABLE, ROOT, subprocess_env
from gradreg_fast.triton import _launch
from scripts import load_script

aot = load_script("scripts/triton_aot.py", "triton_aot")

REPORT = os.path.join(ROOT, "benchmarks", "results", "gpu_resources_triton.md")
TRITON_DIR = os.path.join(ROOT, "gradreg_fast", "triton")


def _compile_env() -> dict:
    """A subprocess environment for real (not interpreted) Triton."""
    return {k: v for k, v in subprocess_env().items() if k not in ("TRITON_INTERPRET", _launch.RECORD_ENV)}


def _aot(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    # not from the checkout's root: the source tree's gradreg_fast has no built extension after
    # `pip install .` (CI's install); subprocess_env puts the installed one first on PYTHONPATH
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "triton_aot.py"), *args], env=_compile_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    run = _aot("triton", LAUNCH_TABLE, "--jobs", "2", "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr[-5000:]
    print(run.stdout)
    return json.loads(out.read_text())["rows"]


@pytest.mark.slow      # with the next test, 270 s of AOT compiles in the shared fixture (--durations); CI runs both
def test_every_launched_specialization_compiles_for_sm80_and_sm90(compiled):
    failed = [r for r in compiled if not r["ok"]]
    assert not failed, failed[:3]
    table_kernels = {e["kernel"].split(":")[1] for e in aot.load_table(LAUNCH_TABLE)}
    per_arch = {a: [r for r in compiled if r["arch"] == a] for a in (80, 90)}
    for arch, rows in per_arch.items():
        assert {r["kernel"] for r in rows} == table_kernels, arch
    assert len(per_arch[80]) == len(per_arch[90]) > 0
    # the binder saw distinct specializations: one row per (kernel, specialization text) and arch
    assert len({(r["kernel"], r["spec"]) for r in per_arch[90]}) == len(per_arch[90])


@pytest.mark.slow
def test_no_unexplained_spill(compiled):
    """A spill fails unless scripts/triton_aot.py's EXPLAINED_SPILLS explains it for that kernel and size."""
    bad = [(r["kernel"], r["arch"], r["spec"], r["spill_stores"], r["spill_loads"])
           for r in aot.unexplained_spills(compiled)]
    assert not bad, bad


def test_committed_report_matches_the_launch_table():
    with open(REPORT) as f:
        text = f.read()
    assert aot.table_digest(LAUNCH_TABLE) in text, (
        f"{REPORT} was generated from another launch table: regenerate it with "
        "python scripts/triton_aot.py triton tests/triton_launches.jsonl --jobs 2 "
        "--report benchmarks/results/gpu_resources_triton.md")
    assert "0 failed to compile;" in text and "UNEXPLAINED" not in text
    assert "(0 unexplained;" in text or "0 with a spill." in text


def test_a_spill_is_detected(tmp_path):
    """Ground truth by construction: capping registers at 32 (Triton's maxnreg option) forces ptxas to
    spill the fp64 GELU double backward, which needs far more."""
    entry = next(e for e in aot.load_table(LAUNCH_TABLE) if e["kernel"].endswith(":bias_act_kernel")
                 and e["args"][9:12] == [6, 2, True] and e["args"][0]["tensor"] == "float64")
    table = tmp_path / "capped.jsonl"
    table.write_text(json.dumps(dict(entry, options={"maxnreg": 32})) + "\n")
    out = tmp_path / "rows.json"
    run = _aot("triton", str(table), "--arch", "90", "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["regs"] <= 32 and row["spill"] and row["spill_stores"] > 0 and row["spill_loads"] > 0, row


# -- the recorder keeps exactly what Triton specializes on ----------------------------------------------

def _probe(x_ptr, y_ptr, n, m, s, f, BLOCK: tl.constexpr):
    pass


def _random_int(rng: random.Random) -> int:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice([0, 1, 2, 15, 16, 17, -1, -16, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**63 - 1,
                           2**63, 2**64 - 1, -2**63])
    if kind == 1:
        return rng.randrange(2, 5000)
    if kind == 2:
        return 16 * rng.randrange(1, 2**20)
    if kind == 3:
        return rng.randrange(2**31, 2**63)
    if kind == 4:
        return -rng.randrange(2, 2**63)
    return rng.randrange(2**63, 2**64)


def test_recorded_launch_rebuilds_to_triton_s_own_specialization():
    """describe() then aot._arguments() gives, through Triton's binder, the specialization of the
    original arguments: random ints of every range and residue, tensors of every dtype and alignment."""
    fn = JITFunction(_probe)
    binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    rng = random.Random()
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32,
              torch.uint8]
    for _ in range(300):
        tensors = []
        for _ in range(2):
            t = torch.empty(64, dtype=rng.choice(dtypes))
            tensors.append(t[rng.randrange(4):])  # misaligned unless the offset is 0
        args = (*tensors, _random_int(rng), _random_int(rng), _random_int(rng), rng.random())
        kwargs = {"BLOCK": rng.choice([16, 64, 1024])}
        entry = _launch.describe(fn, args, kwargs)
        json.loads(json.dumps(entry))  # JSON-able
        rebuilt_args, rebuilt_kwargs = aot._arguments(entry, fn)
        assert binder(*rebuilt_args, **rebuilt_kwargs)[1] == binder(*args, **kwargs)[1], (args, entry)


def test_record_appends_each_specialization_once(tmp_path):
    from gradreg_fast.triton.sq_norm import sq_norm_rows_kernel
    path = str(tmp_path / "launches.jsonl")
    x, out = torch.randn(3, 40), torch.empty(3)
    for n in (40, 56, 40):  # 40 and 56 are the same class (≡ 8 mod 16), 40 ≠ 1024 below
        _launch.record(path, _launch.describe(sq_norm_rows_kernel, (x, out, n, 1024), {"BLOCK": 1024,
                                                                                       "ATOMIC": False}))
    _launch.record(path, _launch.describe(sq_norm_rows_kernel, (x, out, 1024, 1024), {"BLOCK": 1024,
                                                                                      "ATOMIC": False}))
    lines = open(path).read().splitlines()
    assert len(lines) == 2
    assert aot.unlisted(path, path) == []
    other = tmp_path / "one.jsonl"
    other.write_text(lines[0] + "\n")
    assert aot.unlisted(path, str(other)) == [json.dumps(json.loads(lines[1]), sort_keys=True)]


def test_every_launch_site_goes_through_launch_kernel():
    """All @triton.jit kernels that no other kernel calls are launched by launch_kernel(kernel, ...),
    never kernel[grid](...), and every one of them is in the launch table."""
    launched, jit, called, direct = set(), {}, set(), []
    for path in sorted(glob.glob(os.path.join(TRITON_DIR, "*.py"))):
        tree = ast.parse(open(path).read())
        module = "gradreg_fast.triton." + os.path.basename(path)[:-3]
        for f in tree.body:
            if isinstance(f, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in f.decorator_list):
                jit[f.name] = module
                called |= {n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and not path.endswith("_launch.py"):
                direct.append(f"{path}:{node.lineno}: {ast.unparse(node.func)}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "launch_kernel":
                launched.add(f"{module}:{ast.unparse(node.args[0])}")
    kernels = {f"{module}:{name}" for name, module in jit.items() if name not in called}
    assert not direct, direct
    assert launched == kernels
    assert {e["kernel"] for e in aot.load_table(LAUNCH_TABLE)} == kernels


# -- CUDA kernels: the ptxas -v parser and the occupancy bound -------------------------------------------

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z9my_kernelIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z9my_kernelIfEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 1 barriers, 32 bytes smem, 368 bytes cmem[0]
[3/5] /usr/local/cuda/bin/nvcc ... other build output
ptxas info    : Function properties for _Z6helperv
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z9my_kernelIdEvPT_' for 'sm_80'
ptxas info    : Function properties for _Z9my_kernelIdEvPT_
    24 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, 368 bytes cmem[0]
"""


def test_ptxas_log_parser():
    rows = aot.parse_ptxas_log(PTXAS_LOG)
    assert rows == [
        {"name": "_Z9my_kernelIfEvPT_", "arch": "sm_90", "regs": 30, "smem": 32, "stack": 0,
         "spill_stores": 0, "spill_loads": 0},
        {"name": "_Z9my_kernelIdEvPT_", "arch": "sm_80", "regs": 255, "smem": 0, "stack": 24,
         "spill_stores": 20, "spill_loads": 12},
    ]
    text = aot.cuda_report(rows, 256, "test")
    assert "void my_kernel<float>(float*)" in text and "20 / 12 SPILL" in text and "1 with a spill" in text
    # per kernel: both instantiations, 255 registers at 8 warps per block -> 1 block = 8 of 64 warps
    assert "| my_kernel | 2 | 255 | 12% (registers) | 30 | 100% (warps) | 24 | 1 |" in text
    assert aot._kernel_name("void ns::(anonymous namespace)::k2<16, c10::Half, float>(float const*, long)") == "k2"


@pytest.mark.parametrize("regs, smem, warps, blocks, limiter", [
    (32, 0, 4, 16, "warps"),            # 32·32 = 1024 regs/warp: 64 warps fit, the warp slots limit
    (64, 0, 8, 4, "registers"),         # 2048 regs/warp -> 32 warps -> 4 blocks of 8 (50 %)
    (250, 0, 4, 2, "registers"),        # 8000 -> 8192 regs/warp -> 8 warps -> 2 blocks (12.5 %)
    (33, 0, 1, 32, "blocks"),           # 1-warp blocks: the 32-block limit
    (16, 100 * 1024, 4, 2, "shared memory"),  # (102400 + 1024) B per block: 2 fit in 228 KiB
])
def test_occupancy_bound_h100(regs, smem, warps, blocks, limiter):
    assert aot.occupancy_bound(regs, smem, warps) == (blocks, limiter)


def test_cuda_report_block_size_is_the_kernels():
    """scripts/cuda_build_check.sh reports occupancy for 256-thread blocks: every CUDA source says so."""
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        src = open(path).read()
        assert re.search(r"constexpr int kThreads = 256;", src), path
        launches = re.findall(r"<<<[^>]*>>>", src)
        assert launches and all(", kThreads," in ln for ln in launches), (path, launches)
    script = open(os.path.join(ROOT, "scripts", "cuda_build_check.sh")).read()
    assert "GRADREG_PTXAS_VERBOSE=1" in script and "--threads 256" in script
    assert 'scripts/triton_aot.py" cuda' in script


# -- scripts/gpu_check.sh ---------------------------------------------------------------------------------

def _load_parser(path: str):
    """The benchmark script as a module (for its parse_args), without running its main()."""
    name = "_gpu_check_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(path))
        del sys.modules[name]
    return module


def test_gpu_check_dry_run_commands_exist(tmp_path, monkeypatch):
    """--dry-run prints every command scripts/gpu_check.sh would run; each benchmark command line must
    parse with that benchmark's own argument parser (told that a GPU is visible, as on the GPU machine),
    and pytest must get the tests folder."""
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"],
                         env={**subprocess_env(), "OUT": str(tmp_path / "gpu")}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    commands = [shlex.split(ln[2:]) for ln in run.stdout.splitlines() if ln.startswith("+ ")]
    assert commands, run.stdout
    scripts = {}
    for cmd in commands:
        if cmd[0] == "python" and cmd[1].endswith(".py"):
            path = os.path.join(ROOT, cmd[1])
            assert os.path.exists(path), cmd
            scripts.setdefault(cmd[1], []).append(cmd[2:])
            if "--out" in cmd:
                assert cmd[cmd.index("--out") + 1].startswith(str(tmp_path / "gpu")), cmd
    assert set(scripts) == {"benchmarks/bench_ops.py", "benchmarks/bench_step.py", "scripts/triton_aot.py"}
    assert all(argv[0] == "cuda" for argv in scripts.pop("scripts/triton_aot.py")), commands
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for script, argvs in scripts.items():
        module = _load_parser(os.path.join(ROOT, script))
        for argv in argvs:
            args = module.parse_args(argv)
            assert args.device == "cuda", (script, argv)
    step = _load_parser(os.path.join(ROOT, "benchmarks", "bench_step.py"))
    for argv in scripts["benchmarks/bench_step.py"]:
        args = step.parse_args(argv)
        assert set(args.models.split(",")) <= {"lenet", "mlp", "resnet"}, argv
        if args.penalties:
            assert set(args.penalties.split(",")) <= set(step.gr.KINDS), argv
    pytests = [c for c in commands if c[:3] == ["python", "-m", "pytest"]]
    assert len(pytests) == 1 and "tests" in pytests[0], pytests
    assert any("pip" in c and "install" in c and "GRADREG_CUDA=1" in c for c in commands), commands
    assert not os.path.exists(tmp_path / "gpu" / "tests.txt")  # a dry run runs nothing
