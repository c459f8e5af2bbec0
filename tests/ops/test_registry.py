"""The op registry (gradreg_fast/ops/_registry.py), the backend resolution cache, and the package's
import graph."""
import ast
import os

import pytest
import torch

import gradreg_fast as gr
from conftest import ROOT
from gradreg_fast import _backend
from gradreg_fast.ops import _registry


def _declared():
    return [op for ops in _registry.FAMILIES.values() for op in ops]


def test_every_schema_op_is_declared_once():
    names = [op.name for op in _declared()]
    assert len(names) == len(set(names))
    in_namespace = {n.split("::", 1)[1].removesuffix("_triton") for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("gradreg_fast::")}
    assert in_namespace == set(names)


@pytest.mark.parametrize("op", [op.name for op in _declared()])
def test_declared_schema_is_the_extension_s_and_the_triton_op_s(op):
    """The schema written in the declaration is csrc/gradreg.cpp's (when the extension is loaded) and
    the Triton op's (defined from it)."""
    schema = next(o.schema for o in _declared() if o.name == op)
    triton_schema = str(getattr(torch.ops.gradreg_fast, f"{op}_triton").default._schema)
    assert triton_schema == f"gradreg_fast::{op}_triton{schema[len(op):]}"
    if _backend.EXTENSION_LOADED:
        assert str(getattr(torch.ops.gradreg_fast, op).default._schema) == f"gradreg_fast::{schema}"


def test_every_op_has_every_backend_and_the_entry_ops_a_reference():
    for op, table in _registry.IMPLEMENTATIONS.items():
        assert set(table) == set(gr.BACKENDS), op
    for op in ("sq_norm", "fd_direction", "cross_entropy", "project", "gaussian_like", "bias_act"):
        assert _registry.IMPLEMENTATIONS[op]["reference"] is not None, op


def test_missing_implementation_error_names_op_backend_device_and_fix(monkeypatch):
    """An extension built from older sources (an op missing) gives the one registry error."""
    if not gr.backends()["cpp"].available:
        pytest.skip("the extension is not built")
    for op, call in (("sq_norm", lambda: gr.ops.sq_norm(torch.randn(2, 3), backend="cpp")),
                     ("bias_act", lambda: gr.ops.bias_act(torch.randn(2, 3), act="tanh", backend="cpp")),
                     ("project", lambda: gr.ops.project(torch.randn(2, 3), 1, 0, backend="cpp"))):
        monkeypatch.setitem(_registry.IMPLEMENTATIONS[op], "cpp", None)
        with pytest.raises(RuntimeError, match=f"no implementation of {op} for backend 'cpp' on device cpu: "
                                               r".*pip install --no-build-isolation \."):
            call()


def _runs_kernel(t: torch.Tensor) -> bool:
    """Whether t came out of one of the library's custom ops (its autograd node), not a composite."""
    return "gradreg_fast" in t.grad_fn.name()


@pytest.mark.parametrize("op", sorted(_registry.AUTO_CPU_REFERENCE))
def test_auto_runs_the_reference_on_small_cpu_inputs_and_a_named_backend_its_kernel(op, monkeypatch):
    """backend="auto" on the CPU: the op's reference up to AUTO_CPU_REFERENCE[op] elements, the C++
    kernel above; backend="cpp" (argument or GRADREG_BACKEND) runs the kernel at every size."""
    if not gr.backends()["cpp"].available:
        pytest.skip("the extension is not built")
    monkeypatch.delenv("GRADREG_BACKEND", raising=False)
    limit = _registry.AUTO_CPU_REFERENCE[op]

    def call(numel, backend=None):
        z = torch.randn(1, numel, requires_grad=True)
        if op == "sq_norm":
            return gr.ops.sq_norm(z, backend=backend)
        if op == "project":
            return gr.ops.project(z, 1, 0, backend=backend)
        return gr.ops.cross_entropy(z, torch.zeros(1, dtype=torch.long), backend=backend)

    small, large = call(limit), call(limit + 1)
    assert not _runs_kernel(small) and _runs_kernel(large)
    assert not _runs_kernel(call(limit, "auto"))
    assert _runs_kernel(call(limit, "cpp")) and _runs_kernel(call(3, "cpp"))
    monkeypatch.setenv("GRADREG_BACKEND", "cpp")
    assert _runs_kernel(call(3))
    with _backend.use_backend("auto"):
        assert not _runs_kernel(call(3))


def test_resolution_is_cached_per_backend_and_device_type(monkeypatch):
    calls = []
    real = _backend.backends
    monkeypatch.setattr(_backend, "backends", lambda: calls.append(1) or real())
    _backend.clear_caches()
    try:
        for _ in range(3):
            assert _backend.resolve_backend("reference", torch.device("cpu")) == "reference"
            gr.ops.sq_norm(torch.randn(2, 3), backend="reference")
        assert len(calls) == 1
        with pytest.raises(ValueError, match="unknown backend"):   # errors are raised, never cached
            _backend.resolve_backend("fast", torch.device("cpu"))
    finally:
        _backend.clear_caches()


def _imports(path: str, module: str, modules: set[str]) -> set[str]:
    """gradreg_fast modules that ``module`` (file ``path``) imports, at module level or in a function."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != module}


def test_no_import_cycle_between_modules():
    """Between the package's modules (not counting a package's __init__, which imports its modules):
    no module imports, directly or through others, a module that imports it."""
    files = {}
    for folder, _, names in os.walk(os.path.join(ROOT, "gradreg_fast")):
        for name in names:
            if name.endswith(".py") and name != "__init__.py":
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3]
                files[rel.replace(os.sep, ".")] = os.path.join(folder, name)
    modules = set(files)
    graph = {m: _imports(p, m, modules) for m, p in files.items()}

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False
    cycles = sorted(m for m in modules if reaches(m, m, set()))
    assert not cycles, f"modules on an import cycle: {cycles}"
