"""The one launch point of the package's Triton kernels, and its optional launch recorder.

Every launcher calls ``launch_kernel(kernel, grid, *args, **kwargs)`` instead of ``kernel[grid](...)``.
With the environment variable ``GRADREG_RECORD_LAUNCHES=path`` set, each launch also appends one
JSON line to ``path`` describing its specialization (once per distinct specialization and file):

    {"kernel": "gradreg_fast.triton.sq_norm:sq_norm_rows_kernel",
     "args": [{"tensor": "float32", "align16": true}, ..., 1040, 1024, true], "options": {}}

``args`` lists the kernel's parameters in order: a tensor as its dtype and whether its address is a
multiple of 16 bytes; a constexpr as its exact value (a ``tl.dtype`` as ``{"tl_dtype": name}``); a
runtime int as a representative of its class — same value modulo 16, same sign, same integer range
(i32 / i64 / u64), and 0 and 1 kept as themselves — which is everything Triton specializes a kernel
on, so ``scripts/triton_aot.py`` can rebuild the launch with the installed Triton's own binder and
compile it ahead of time for a GPU target without a GPU. A runtime float is recorded as 0.5 (Triton
passes it as fp32 whatever its value). ``options`` holds launch options such as ``num_warps``.

The test suite records every launch (tests/conftest.py); tests/tooling/test_triton_aot.py compiles the table
``tests/triton_launches.jsonl`` for sm_80 and sm_90, and conftest compiles, at the end of the session,
any launched specialization that the table lacks.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch

RECORD_ENV = "GRADREG_RECORD_LAUNCHES"

_seen: dict[str, set[str]] = {}   # path -> lines already in that file (read once per process)
_constexpr_names: dict[Any, frozenset[str]] = {}


def _python_fn(kernel: Any) -> Any:
    """The undecorated Python function of a JITFunction or InterpretedFunction."""
    return getattr(kernel, "fn", kernel)


def kernel_id(kernel: Any) -> str:
    """'module:name' of a @triton.jit kernel (the key of the launch table)."""
    fn = _python_fn(kernel)
    return f"{fn.__module__}:{fn.__name__}"


def constexpr_names(kernel: Any) -> frozenset[str]:
    """Names of the kernel's ``tl.constexpr`` parameters (string annotations included)."""
    fn = _python_fn(kernel)
    if fn not in _constexpr_names:
        names = set()
        for p in inspect.signature(fn).parameters.values():
            ann = p.annotation
            text = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
            if ann is not inspect.Parameter.empty and "constexpr" in str(text):
                names.add(p.name)
        _constexpr_names[fn] = frozenset(names)
    return _constexpr_names[fn]


def int_class(v: int) -> int:
    """A representative of the specialization class of a runtime int: v itself for 0 and 1, else
    a fixed value with v's residue modulo 16, sign and integer range (i32, i64, u64)."""
    if v in (0, 1):
        return v
    r = v % 16
    if -2**31 <= v < 2**31:
        return 32 + r if v > 0 else -48 + r
    if -2**63 <= v < 2**63:
        return 2**40 + r if v > 0 else -2**40 - 32 + r
    return 2**63 + 32 + r


def _encode(value: Any, constexpr: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "align16": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if constexpr else int_class(value)
    if isinstance(value, float):
        return value if constexpr else 0.5
    name = getattr(value, "name", None)
    if constexpr and type(value).__name__ == "dtype" and isinstance(name, str):
        return {"tl_dtype": name}
    raise TypeError(f"gradreg_fast.triton._launch: cannot record an argument of type {type(value).__name__} "
                    f"({value!r}); extend _encode in gradreg_fast/triton/_launch.py")


def describe(kernel: Any, args: tuple, kwargs: dict) -> dict:
    """The launch's specialization as a JSON-able dict (see the module docstring)."""
    names = list(inspect.signature(_python_fn(kernel)).parameters)
    if len(args) > len(names):
        raise TypeError(f"{kernel_id(kernel)} takes {len(names)} arguments, got {len(args)}")
    bound = dict(zip(names, args, strict=False))
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound.update({k: v for k, v in kwargs.items() if k in names})
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{kernel_id(kernel)}: missing arguments {missing}")
    cx = constexpr_names(kernel)
    return {"kernel": kernel_id(kernel), "args": [_encode(bound[n], n in cx) for n in names],
            "options": {k: _encode(v, True) for k, v in sorted(options.items())}}


def record(path: str, entry: dict) -> None:
    """Append ``entry`` to the JSONL file ``path`` unless that file already holds it."""
    line = json.dumps(entry, sort_keys=True)
    seen = _seen.get(path)
    if seen is None:
        seen = set()
        if os.path.exists(path):
            with open(path) as f:
                seen = {ln.strip() for ln in f if ln.strip()}
        _seen[path] = seen
    if line in seen:
        return
    seen.add(line)
    with open(path, "a") as f:  # one short write per line: appends from several processes stay whole
        f.write(line + "\n")


def launch_kernel(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> Any:
    """``kernel[grid](*args, **kwargs)``, recorded first when GRADREG_RECORD_LAUNCHES is set."""
    path = os.environ.get(RECORD_ENV)
    if path:
        record(path, describe(kernel, args, kwargs))
    return kernel[grid](*args, **kwargs)
