"""Public API contract: caller's tensors untouched, backends reported, explicit backends never fall back."""
import os
import subprocess
import sys

import pytest
import torch

import gradreg_fast as gr
from conftest import subprocess_env
from gradreg_fast.testing.zoo import make_small as make

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout


@pytest.mark.parametrize("kind", gr.KINDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_caller_state_untouched(kind, requires_grad):
    model, x, y = make("cnn", seed=1)
    x = x.clone().requires_grad_(requires_grad)
    before = x.detach().clone()
    pen = gr.penalty(kind, model, x, y, generator=torch.Generator().manual_seed(0))
    pen.backward()
    assert torch.equal(x.detach(), before)
    assert x.requires_grad == requires_grad
    if not requires_grad:
        assert x.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.dim() > 1)


def test_upstream_gradients_flow_when_x_requires_grad():
    """x produced by an upstream layer: the penalty also trains that layer (a tanh model, whose
    Jacobian varies with its input; a ReLU net's is piecewise constant in x)."""
    model, x, y = make("tanh", seed=2)
    encoder = torch.nn.Linear(12, 12).double()
    pen = gr.penalty("frobreg", model, encoder(x))
    pen.backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


def test_backends_report():
    status = gr.backends()
    assert set(status) == set(gr.BACKENDS)
    assert status["reference"].available
    for s in status.values():
        assert isinstance(s.available, bool) and s.reason


def test_explicit_unavailable_backend_raises():
    status = gr.backends()
    x = torch.randn(2, 3)
    for name, s in status.items():
        if not s.available:
            with pytest.raises(RuntimeError, match=f"backend '{name}'.*not available"):
                gr.ops.sq_norm(x, backend=name)
    if status["cpp"].available and torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="runs on CPU tensors"):
            gr.ops.sq_norm(x.cuda(), backend="cpp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check applies without a GPU")
@pytest.mark.parametrize("triton_v,numpy_v,broken", [((3, 6), (2, 4), True), ((3, 6), (2, 3), False),
                                                     ((3, 7), (2, 5), False)])
def test_incompatible_triton_interpreter_is_reported(monkeypatch, triton_v, numpy_v, broken):
    """Triton 3.6's interpreter cannot run with NumPy >= 2.4: the backend says so and how to fix it,
    and an explicit backend='triton' raises with that reason instead of a TypeError deep in triton."""
    from gradreg_fast import _backend
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_major_minor", {"triton": triton_v, "numpy": numpy_v}.get)
    monkeypatch.setattr(_backend, "_triton_importable", lambda: (True, "triton importable"))
    _backend.clear_caches()
    try:
        status = gr.backends()["triton"]
        assert status.available is not broken
        if broken:
            assert "numpy<2.4" in status.reason and "triton>=3.7" in status.reason
            with pytest.raises(RuntimeError, match="not available.*numpy<2.4"):
                gr.ops.sq_norm(torch.randn(2, 3), backend="triton")
    finally:
        _backend.clear_caches()


def test_env_backend_choice(monkeypatch):
    monkeypatch.setenv("GRADREG_BACKEND", "reference")
    assert gr._backend.resolve_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("GRADREG_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        gr.ops.sq_norm(torch.randn(2, 3))


def test_cpp_backend_present_in_this_build():
    """The test environment is built with the extension; its absence must fail loudly here."""
    if os.environ.get("GRADREG_EXPECT_NO_EXT") == "1":
        pytest.skip("GRADREG_EXPECT_NO_EXT=1: testing a pure-Python install")
    assert gr.backends()["cpp"].available, gr.backends()["cpp"].reason


def test_triton_backend_runs_in_this_environment():
    """The test environment installs triton (scripts/setup_env.sh) and conftest sets TRITON_INTERPRET=1
    without a GPU: the Triton kernels must be testable here, or every Triton test would silently
    drop out of the parametrized matrix."""
    status = gr.backends()["triton"]
    assert status.available, f"the Triton kernels cannot be tested here: {status.reason}"


def test_missing_extension_warns_once_and_reports():
    """A pure-Python install (simulated by blocking gradreg_fast._C) imports, warns once, and works."""
    code = (
        "import sys, warnings\n"
        "sys.modules['gradreg_fast._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import gradreg_fast as gr\n"
        "    import gradreg_fast.ops\n"
        "msgs = [str(m.message) for m in w if 'gradreg_fast' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "s = gr.backends()\n"
        "assert not s['cpp'].available and 'could not be loaded' in s['cpp'].reason, s\n"
        "import torch\n"
        "m = torch.nn.Linear(3, 2).double(); x = torch.randn(4, 3, dtype=torch.float64)\n"
        "assert gr.penalty('frobreg', m, x).item() > 0\n"
        "try:\n"
        "    gr.ops.sq_norm(x, backend='cpp')\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    env = subprocess_env()
    env.pop("GRADREG_REQUIRE_EXT", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_require_ext_makes_a_missing_extension_an_import_error():
    """GRADREG_REQUIRE_EXT=1 (the test and benchmark scripts set it): no warning and fallback, but an
    ImportError that names the variable, the cause and where the package was imported from."""
    code = ("import sys\n"
            "sys.modules['gradreg_fast._C'] = None\n"
            "import gradreg_fast\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(GRADREG_REQUIRE_EXT="1"),
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError: gradreg_fast: GRADREG_REQUIRE_EXT=1 but the C++ extension is unavailable" in out.stderr
    assert "could not be loaded" in out.stderr and "imported from" in out.stderr
