"""The op registry: every op family of gradreg_fast is declared once, here is what is done with it.

A family (sq_norm, fd_direction, cross_entropy, philox, bias_act) is one ``declare`` call in its
module gradreg_fast/ops/<family>.py, naming for each of its operators

    schema      the operator's schema, as csrc/gradreg.cpp defines it for the C++/CUDA kernels
                (tests/ops/test_registry.py checks that the two agree)
    fake        its fake (meta) kernel: output shapes and dtypes, for torch.compile
    triton      its Triton launcher, "module:function" (imported, and triton with it, when it runs)
    reference   its pure-PyTorch implementation (for the operators the public wrappers call)

and one autograd rule for the family: given one backend's operators by name, the backward formula
and setup_context of each operator. The registry then

- defines the Triton operators ``gradreg_fast::<name>_triton`` from the same schemas;
- registers the fake kernels and the autograd rule on the Triton operators, and on the extension's
  operators when gradreg_fast._C is loaded and has the whole family;
- answers ``implementation(op, backend, device, numel)``: the callable that runs ``op`` on the backend
  a call chooses (``gradreg_fast._backend.resolve_backend``, which caches its answer per requested
  backend and device type; "auto" on a small CPU input of an op in ``AUTO_CPU_REFERENCE``: the
  reference, or the op's ``small_cpu`` composite), or raises the one "no implementation" error.

Adding an op: one ``declare`` plus its kernels (csrc/cpu, csrc/cuda, gradreg_fast/triton) and its
schema in csrc/gradreg.cpp.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradreg_fast._backend import BACKENDS, EXTENSION_LOADED, requested_backend, resolve_backend

NAMESPACE = "gradreg_fast"
REBUILD = "rebuild it from these sources (pip install --no-build-isolation .)"


@dataclass(frozen=True)
class Op:
    schema: str
    fake: Callable
    triton: str
    reference: Callable | None = None
    # what backend "auto" runs on small CPU inputs (AUTO_CPU_REFERENCE) in place of the C++ kernel, when
    # that is not the reference: composite torch ops around another of the family's kernels (None: the reference)
    small_cpu: Callable | None = None

    @property
    def name(self) -> str:
        return self.schema.split("(", 1)[0]


# op name -> backend -> the callable running it there (None: not available in this installation)
IMPLEMENTATIONS: dict[str, dict[str, Callable | None]] = {}
# op name -> what backend "auto" runs on its small CPU inputs (AUTO_CPU_REFERENCE): its Op's small_cpu, else
# its reference
SMALL_CPU: dict[str, Callable | None] = {}
# family name -> its operators
FAMILIES: dict[str, tuple[Op, ...]] = {}


def no_implementation(op: str, backend: str, device: torch.device, fix: str) -> RuntimeError:
    """The one error for an op that the chosen backend cannot run."""
    return RuntimeError(f"gradreg_fast: no implementation of {op} for backend {backend!r} on device "
                        f"{device.type}: {fix}")


def _fix(op: str, backend: str) -> str:
    if backend in ("cpp", "cuda"):
        return f"the extension gradreg_fast._C was built from older sources without {op}; {REBUILD}"
    return f"gradreg_fast declares no {backend} implementation of {op}; choose another backend"


def _launcher(target: str) -> Callable:
    module, function = target.split(":")

    def run(*args):
        return getattr(importlib.import_module(module), function)(*args)
    return run


def _extension_ops(ops: tuple[Op, ...]) -> dict | None:
    """The extension's operators of a family, or None when the extension is not loaded or was
    built from sources that lack one of them (its backends then report that at the call)."""
    if not EXTENSION_LOADED:
        return None
    try:
        return {op.name: getattr(getattr(torch.ops, NAMESPACE), op.name) for op in ops}
    except (AttributeError, RuntimeError):
        return None


def _register(ops: tuple[Op, ...], backend_ops: dict, suffix: str, autograd: Callable) -> None:
    for op in ops:
        torch.library.register_fake(f"{NAMESPACE}::{op.name}{suffix}")(op.fake)
    for name, (backward, setup_context) in autograd(backend_ops).items():
        torch.library.register_autograd(f"{NAMESPACE}::{name}{suffix}", backward, setup_context=setup_context)


def declare(family: str, ops: tuple[Op, ...], autograd: Callable[[dict], dict]) -> None:
    """Defines the family's Triton operators and registers fake kernels, autograd and the
    implementation table of every backend (see the module docstring)."""
    if family in FAMILIES:
        raise RuntimeError(f"gradreg_fast: op family {family!r} is declared twice")
    FAMILIES[family] = ops
    triton_ops = {op.name: torch.library.custom_op(f"{NAMESPACE}::{op.name}_triton", _launcher(op.triton),
                                                   mutates_args=(), schema=op.schema[len(op.name):])
                  for op in ops}
    _register(ops, triton_ops, "_triton", autograd)
    extension = _extension_ops(ops)
    if extension is not None:
        _register(ops, extension, "", autograd)
    for op in ops:
        ext = extension[op.name] if extension is not None else None
        IMPLEMENTATIONS[op.name] = {"reference": op.reference, "cpp": ext, "cuda": ext, "triton": triton_ops[op.name]}
        assert set(IMPLEMENTATIONS[op.name]) == set(BACKENDS)
        SMALL_CPU[op.name] = op.small_cpu or op.reference


# op -> the largest input (number of elements) on which backend "auto" runs the op's pure-PyTorch
# reference on CPU tensors instead of the C++ kernel. The C++ op pays a fixed cost per call that the
# composite does not (torch.library's Python autograd wrappers around its forward, backward and double
# backward: 40-90 us per op and training step), which outweighs the kernel's gain on small inputs:
# forward + create_graph backward + double backward on one thread (docs/backends.md, "Which kernel
# auto runs on the CPU"). A backend named by the caller (backend="cpp", GRADREG_BACKEND=cpp) always
# runs its own kernel.
AUTO_CPU_REFERENCE: dict[str, int] = {"cross_entropy": 2 ** 18, "sq_norm": 2 ** 16, "project": 2 ** 16}


def implementation(op: str, backend: str | None, device: torch.device, numel: int | None = None) -> Callable:
    """The callable running ``op`` for a call on ``device`` with ``backend=`` (None: the scoped
    backend, GRADREG_BACKEND, else auto) on an input of ``numel`` elements (None: unknown); raises
    when that backend cannot run it."""
    name = resolve_backend(backend, device)
    if (name == "cpp" and numel is not None and numel <= AUTO_CPU_REFERENCE.get(op, -1)
            and requested_backend(backend) == "auto"):
        return SMALL_CPU[op]   # small input: the composite is faster on the CPU (AUTO_CPU_REFERENCE)
    impl = IMPLEMENTATIONS[op][name]
    if impl is None:
        raise no_implementation(op, name, device, _fix(op, name))
    return impl
