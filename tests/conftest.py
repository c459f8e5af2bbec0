"""Shared fixtures and tolerances.

Triton kernels run in the interpreter when no CUDA GPU is visible: TRITON_INTERPRET must be set
before triton is imported, so it is set here, before any test module imports gradreg_fast.triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import gradreg_fast

# Every Triton launch is recorded (gradreg_fast/triton/_launch.py). tests/tooling/test_triton_aot.py compiles the
# specializations of LAUNCH_TABLE for sm_80 and sm_90; at the end of an interpreted run, any launched
# specialization that the table lacks is compiled for both here, and one that does not compile fails
# the session. GRADREG_RECORD_LAUNCHES=tests/triton_launches.jsonl pytest ... adds them to the table.
LAUNCH_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_launches.jsonl")
_RECORD = "GRADREG_RECORD_LAUNCHES"
_CHECK_LAUNCHES = None
if os.environ.get(_RECORD):
    os.environ[_RECORD] = os.path.abspath(os.environ[_RECORD])  # subprocesses run elsewhere
elif os.environ.get("TRITON_INTERPRET") == "1":
    import tempfile
    _fd, _CHECK_LAUNCHES = tempfile.mkstemp(prefix="gradreg_launches_", suffix=".jsonl")
    os.close(_fd)
    os.environ[_RECORD] = _CHECK_LAUNCHES  # inherited by the tests' subprocesses


def pytest_sessionfinish(session, exitstatus):
    if _CHECK_LAUNCHES is None:
        return
    import subprocess
    import sys

    from scripts import load_script
    missing = load_script("scripts/triton_aot.py", "triton_aot").unlisted(_CHECK_LAUNCHES, LAUNCH_TABLE)
    if not missing:
        os.unlink(_CHECK_LAUNCHES)
        return
    with open(_CHECK_LAUNCHES, "w") as f:
        f.write("\n".join(missing) + "\n")
    env = {k: v for k, v in subprocess_env().items() if k not in ("TRITON_INTERPRET", _RECORD)}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "triton_aot.py"), "triton", _CHECK_LAUNCHES],
                         env=env, capture_output=True, text=True, cwd=os.path.dirname(_CHECK_LAUNCHES))
    os.unlink(_CHECK_LAUNCHES)
    print(f"\n{len(missing)} launched Triton specialization(s) are not in {LAUNCH_TABLE}; compiled here for "
          f"sm_80/sm_90: {run.stdout.strip()}\n{run.stderr.strip()[-3000:] if run.returncode else ''}"
          f"\nAdd them to the table: rerun "
          f"the tests with GRADREG_RECORD_LAUNCHES=tests/triton_launches.jsonl, then regenerate the report: "
          f"python scripts/triton_aot.py triton tests/triton_launches.jsonl "
          f"--report benchmarks/results/gpu_resources_triton.md")
    if run.returncode != 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_sessionstart(session):
    """GRADREG_REQUIRE_EXT=1 (set by scripts/test.sh): the C++ backend must be there, so that a
    broken or missing build fails the run instead of quietly shrinking the backend matrix."""
    status = gradreg_fast.backends()["cpp"]
    if os.environ.get("GRADREG_REQUIRE_EXT") == "1" and not status.available:
        raise pytest.UsageError(f"GRADREG_REQUIRE_EXT=1 but the cpp backend is unavailable: {status.reason} "
                                f"(gradreg_fast imported from {gradreg_fast.__file__})")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(*, source_tree: bool = True, **extra: str) -> dict:
    """Environment for a test's subprocess. The gradreg_fast this process imported (the installed
    one, with its built extension) comes first on PYTHONPATH, then the source tree (for the
    benchmarks/ and tests/ helpers): a subprocess that found the source tree's gradreg_fast first
    would run without the extension (it lives in site-packages after ``pip install .``).
    ``source_tree=False`` leaves the source tree out: a script then runs as a user runs it
    (``python benchmarks/x.py`` after ``pip install .``), which catches imports that only work
    from the checkout's root."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(gradreg_fast.__file__)))
    paths = [package_parent] + ([ROOT] if source_tree else [])
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if source_tree or
              os.path.abspath(p or ".") != ROOT]
    unique = list(dict.fromkeys(p for p in paths if p))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(unique), **extra}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Absolute/relative tolerances per dtype for kernel-vs-reference comparisons (values of order 1).
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def available_backends(device: str) -> list[str]:
    """Backends that can run on ``device`` here (reference always)."""
    status = gradreg_fast.backends()
    if device == "cuda":
        wanted = ["reference", "cuda", "triton"]
    else:
        wanted = ["reference", "cpp", "triton"]
    return [b for b in wanted if status[b].available]


def backend_params():
    """(device, backend) pairs for parametrize: every available backend on every device."""
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in available_backends(d)]


def assert_close_to_reference(out, ref_same_dtype, ref_exact, factor: float = 2.0, floor: float = 1e-6):
    """flash-attention rule: the kernel's error against the exact (fp32/fp64) reference is at most
    ``factor`` times the error of the reference computed in the kernel's own dtype (plus a floor)."""
    err = (out.double() - ref_exact.double()).abs().max().item()
    ref_err = (ref_same_dtype.double() - ref_exact.double()).abs().max().item()
    # plus a few units in the last place of the output: when both are at the rounding level of the
    # output dtype (fp32 accumulation of fp32 data), their ratio is noise
    if out.is_floating_point():
        floor = max(floor, 8 * torch.finfo(out.dtype).eps * ref_exact.double().abs().max().item())
    assert err <= factor * ref_err + floor, f"kernel error {err:.3g} > {factor} x reference error {ref_err:.3g}"
