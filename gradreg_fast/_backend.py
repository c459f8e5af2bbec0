"""Backends: which implementations of the ops exist here, and which one a call uses.

Backends:
    "reference"  pure PyTorch (gradreg_fast.reference), always available, twice differentiable.
    "cpp"        C++ CPU kernels of the extension gradreg_fast._C.
    "cuda"       CUDA kernels of the extension (built with GRADREG_CUDA=1 or auto on a CUDA torch).
    "triton"     Triton kernels: on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

Choice: the ``backend=`` argument of an op, else the ``backend=`` of the enclosing gr.penalty /
GradRegLoss call (``use_backend``), else the GRADREG_BACKEND environment variable, else
"auto" (CUDA tensors: cuda, then triton, then reference; CPU tensors: cpp, then reference, except
for the ops of ``gradreg_fast.ops._registry.AUTO_CPU_REFERENCE`` on inputs up to their size there,
which run their reference: below it the kernel's fixed cost per call outweighs its gain).
An explicitly requested backend that cannot run raises; it never falls back silently.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import importlib.util
import os
import warnings
from typing import NamedTuple

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _load_extension() -> tuple[bool, str]:
    try:
        from gradreg_fast import _build_info  # written by setup.py
    except ImportError:
        _build_info = None
    if _build_info is not None and not _build_info.extension:
        return False, ("gradreg_fast was installed with GRADREG_SKIP_EXT=1; reinstall without it "
                       "(pip install --no-build-isolation .) to build the C++/CUDA kernels")
    try:
        from gradreg_fast import _C  # noqa: F401  (loading it registers the ops)
    except ImportError as exc:
        hint = ""
        if _build_info is not None and _build_info.torch_version not in (None, torch.__version__):
            hint = (f" (built against torch {_build_info.torch_version}, running torch "
                    f"{torch.__version__}: rebuild with pip install --no-build-isolation .)")
        return False, (f"the extension gradreg_fast._C could not be loaded: {exc}{hint}; build it with "
                       "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)")
    return True, "extension gradreg_fast._C loaded"


EXTENSION_LOADED, EXTENSION_REASON = _load_extension()
if not EXTENSION_LOADED and os.environ.get("GRADREG_REQUIRE_EXT") == "1":
    # set by scripts/test.sh and scripts/bench.sh (and inherited by their subprocesses): a copy of
    # the package without its extension (a source tree shadowing the installed one) fails loudly
    raise ImportError(f"gradreg_fast: GRADREG_REQUIRE_EXT=1 but the C++ extension is unavailable: "
                      f"{EXTENSION_REASON} (gradreg_fast imported from {os.path.dirname(__file__)})")
if not EXTENSION_LOADED:
    warnings.warn(f"gradreg_fast: C++/CUDA kernels unavailable: {EXTENSION_REASON}. "
                  "The pure-PyTorch reference backend is used.", RuntimeWarning, stacklevel=2)


def _has_kernel(op: str, key: str) -> bool:
    return EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"gradreg_fast::{op}", key)


def cuda_kernels_compiled() -> bool:
    """True when the extension was built with its CUDA kernels (registered for the CUDA key)."""
    return _has_kernel("sq_norm", "CUDA")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed: pip install triton"
    return True, "triton importable"


def _major_minor(dist: str) -> tuple[int, int] | None:
    """(major, minor) of an installed distribution, None when it is not installed or unparsable."""
    try:
        parts = importlib.metadata.version(dist).split(".")
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
        return None


@functools.cache
def interpreter_incompatibility() -> str | None:
    """Why the installed Triton interpreter cannot run our kernels here, or None.

    Triton up to 3.6 converts a runtime scalar to an int with int() of a 1-element array, which NumPy
    2.4 turned into an error (TypeError: only 0-dimensional arrays can be converted to Python
    scalars) in every kernel that loops over a runtime bound; Triton 3.7 fixed it. Compiled Triton on
    a GPU is not affected.
    """
    triton_v, numpy_v = _major_minor("triton"), _major_minor("numpy")
    if triton_v is not None and numpy_v is not None and triton_v < (3, 7) and numpy_v >= (2, 4):
        return (f"the Triton {triton_v[0]}.{triton_v[1]} interpreter fails with NumPy "
                f"{numpy_v[0]}.{numpy_v[1]} (int() of a 1-element array, an error since NumPy 2.4): "
                "pip install 'numpy<2.4' or 'triton>=3.7'")
    return None


def backends() -> dict[str, BackendStatus]:
    """Each backend with whether it can run here and why (or why not)."""
    status = {"reference": BackendStatus(True, "pure PyTorch, always available")}
    status["cpp"] = BackendStatus(_has_kernel("sq_norm", "CPU"),
                                  "C++ CPU kernels registered" if _has_kernel("sq_norm", "CPU")
                                  else EXTENSION_REASON if not EXTENSION_LOADED
                                  else "the extension has no CPU kernels")
    if not EXTENSION_LOADED:
        status["cuda"] = BackendStatus(False, EXTENSION_REASON)
    elif not cuda_kernels_compiled():
        status["cuda"] = BackendStatus(False, "the extension was built without CUDA kernels: reinstall "
                                       "with a CUDA build of torch and GRADREG_CUDA=1")
    elif not torch.cuda.is_available():
        status["cuda"] = BackendStatus(False, "CUDA kernels are compiled but no CUDA GPU is visible")
    else:
        status["cuda"] = BackendStatus(True, "CUDA kernels registered and a GPU is visible")
    ok, why = _triton_importable()
    if not ok:
        status["triton"] = BackendStatus(False, why)
    elif torch.cuda.is_available():
        status["triton"] = BackendStatus(True, "triton on CUDA GPUs")
    elif triton_interpret():
        broken = interpreter_incompatibility()
        status["triton"] = BackendStatus(broken is None, broken or "triton interpreter on the CPU "
                                         "(TRITON_INTERPRET=1, slow)")
    else:
        status["triton"] = BackendStatus(False, "no CUDA GPU; set TRITON_INTERPRET=1 before importing "
                                         "triton to run the kernels in the (slow) interpreter")
    return status


# The backend= of gr.penalty / GradRegLoss: the default of every op called inside ``use_backend``,
# between an op's own backend= and GRADREG_BACKEND. An op's backward runs the kernels of the backend
# its forward chose, so the choice holds through loss.backward() too.
_SCOPED_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("gradreg_fast_backend",
                                                                            default=None)


def check_backend(backend, argument: str = "backend") -> str | None:
    """``backend`` validated as ``GRADREG_BACKEND`` is at run time: None (the default), "auto", or a
    name from BACKENDS that can run here. Raises TypeError/ValueError naming ``argument``."""
    if backend is None:
        env = os.environ.get("GRADREG_BACKEND")
        if env:   # the default the call falls back to: checked here too, named as the variable
            check_backend(env, "the environment variable GRADREG_BACKEND")
        return None
    if not isinstance(backend, str):
        raise TypeError(f"{argument} must be a string, one of {', '.join(BACKENDS + ('auto',))} "
                        f"(or None), got {type(backend).__name__}")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"{argument}={backend!r} is not a backend; choose one of "
                         f"{', '.join(BACKENDS + ('auto',))} (or None: GRADREG_BACKEND, else auto)")
    if backend != "auto":
        status = backends()[backend]
        if not status.available:
            runnable = [b for b, s in backends().items() if s.available]
            raise ValueError(f"{argument}={backend!r} cannot run here: {status.reason} (runnable: "
                             f"{', '.join(runnable + ['auto'])}); an explicit backend never falls back")
    return backend


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Ops called inside (with backend=None) use ``backend``; None leaves the default as it is."""
    if backend is None:
        yield
        return
    token = _SCOPED_BACKEND.set(backend)
    try:
        yield
    finally:
        _SCOPED_BACKEND.reset(token)


# (backend asked for, device type) -> the backend it resolves to: an op call costs a dict look-up,
# not a new backends(). Only answers are kept (errors are raised again, with the call's own wording).
_RESOLVED: dict[tuple[str, str, bool], str] = {}


def clear_caches() -> None:
    """Forget what the backend checks found (they are read once per process): for tests that
    change what ``backends()`` depends on."""
    _RESOLVED.clear()
    interpreter_incompatibility.cache_clear()


def requested_backend(backend: str | None) -> str:
    """The backend a call asks for: its ``backend=``, else the scoped one (``use_backend``), else
    GRADREG_BACKEND, else "auto" (not checked here: ``resolve_backend`` does)."""
    if backend is not None:
        return backend
    scoped = _SCOPED_BACKEND.get()
    return scoped if scoped is not None else os.environ.get("GRADREG_BACKEND", "auto")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend a call on ``device`` uses; raises when an explicit choice cannot run there."""
    name = requested_backend(backend)
    key = (name, device.type, triton_interpret())
    resolved = _RESOLVED.get(key)
    if resolved is None:
        explicit = backend is not None or _SCOPED_BACKEND.get() is not None
        resolved = _RESOLVED[key] = _resolve(name, device, "backend=" if explicit else "GRADREG_BACKEND=")
    return resolved


def _resolve(name: str, device: torch.device, source: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r} ({source}{name}); choose one of "
                         f"{', '.join(BACKENDS + ('auto',))}")
    status = backends()
    if name == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpp", "reference")
        return next(b for b in order if status[b].available)
    if not status[name].available:
        raise RuntimeError(f"gradreg_fast: backend {name!r} ({source}{name}) is not available: "
                           f"{status[name].reason}")
    if name == "cpp" and device.type != "cpu":
        raise RuntimeError(f"gradreg_fast: backend 'cpp' runs on CPU tensors, got a tensor on {device}; "
                           "use backend='cuda' or 'triton' for GPU tensors")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"gradreg_fast: backend 'cuda' runs on CUDA tensors, got a tensor on {device}; "
                           "use backend='cpp' for CPU tensors")
    if name == "triton" and device.type != "cuda" and not triton_interpret():
        raise RuntimeError("gradreg_fast: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
                           "(set before triton is imported)")
    return name


# torch.compile traces the op wrappers with fullgraph=True only if the backend choice is a constant
# to dynamo (backends() is not traceable). This is exactly what torch.compiler.assume_constant_result
# does (torch 2.1-2.14); calling it here would import torch._dynamo (~1.5 s) at `import gradreg_fast`.
# Consequence: a compiled function keeps the backend chosen when it was traced.
resolve_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]
requested_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]
