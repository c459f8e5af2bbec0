"""The fused bias + activation op on every backend against the reference composite."""
import os
import re

import pytest
import torch

import gradreg_fast as gr
from conftest import TOLERANCES, assert_close_to_reference, backend_params, subprocess_env
from gradreg_fast._bias_act_spec import NO_SECOND, TABLE, from_output
from gradreg_fast.ops import ACTIVATIONS, bias_act

WITH_SECOND = [a for a in ACTIVATIONS if a not in NO_SECOND]
EXT_PARAMS = [p for p in backend_params() if p.values[1] in ("cpp", "cuda")]
FAST_PARAMS = [p for p in backend_params() if p.values[1] != "reference"]


def _alpha(act):
    # non-default alphas, so that the parameter is really passed through
    return {"leaky_relu": 0.2, "elu": 0.7}.get(act)


def _inputs(shape, dim, device, dtype=torch.float64, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul_(1.5).to(device=device, dtype=dtype)
    b = torch.randn(shape[dim], generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if with_bias else None
    return x, b


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fp64_value_gradcheck_gradgradcheck(device, backend, act, with_bias):
    x, b = _inputs((2, 3, 2) if backend != "triton" else (2, 3), 1, device, with_bias=with_bias)
    alpha = _alpha(act)
    torch.testing.assert_close(bias_act(x, b, act, alpha=alpha, backend=backend),
                               gr.reference.bias_act(x, b, act, alpha=alpha), **TOLERANCES[torch.float64])
    inputs = (x.requires_grad_(True),) + ((b.requires_grad_(True),) if with_bias else ())
    fn = lambda x, *b: bias_act(x, b[0] if b else None, act, alpha=alpha, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    if with_bias:  # the second-order chain through x and b (without bias it is a sub-case)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device,backend", FAST_PARAMS)
@pytest.mark.parametrize("act", WITH_SECOND)
def test_third_order(device, backend, act):
    """The second-derivative op is differentiable again: gradgradcheck of the input gradient."""
    x, b = _inputs((2, 3), 1, device)
    w = torch.randn(2, 3, dtype=torch.float64, device=device)
    x.requires_grad_(True)
    b.requires_grad_(True)

    def input_grad(x, b):
        y = bias_act(x, b, act, alpha=_alpha(act), backend=backend)
        (gx,) = torch.autograd.grad(y, x, w, create_graph=True)
        return gx
    assert torch.autograd.gradgradcheck(input_grad, (x, b))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "silu"])
def test_double_backward_matches_reference(device, backend, act):
    """The parameter gradient of a gradient penalty through the op equals the composite's."""
    x, b = _inputs((3, 5), 1, device)

    def penalty_grads(be):
        xr, br = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = bias_act(xr, br, act, backend=be) if be else gr.reference.bias_act(xr, br, act)
        (gx,) = torch.autograd.grad((y ** 2).sum(), xr, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (xr, br))
    for got, want in zip(penalty_grads(backend), penalty_grads(None), strict=True):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("act", ["linear", "relu", "leaky_relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_zero_second_derivative_gives_zeros(device, backend, act, layout):
    """act'' = 0: the input gradient's derivative with respect to x and b is zero, returned as zeros
    for relu and leaky_relu (as PyTorch's own relu does, so allow_unused is not needed), while for
    linear the input gradient IS the cotangent (unused x and b, as for PyTorch's x + b); the
    cotangent's derivative is act'(z)·w as in the composite."""
    unused = {"allow_unused": True, "materialize_grads": True} if act == "linear" else {}
    x, b = _inputs((2, 3, 2, 2), 1, device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(x.shape, dtype=torch.float64, device=device)

    def second(be):
        xr, br = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
        v.requires_grad_(True)
        y = bias_act(xr, br, act, alpha=_alpha(act), backend=be) if be else \
            gr.reference.bias_act(xr, br, act, alpha=_alpha(act))
        (gx,) = torch.autograd.grad(y, xr, v, create_graph=True)
        return torch.autograd.grad(gx, (xr, br, v), w, **unused)
    got, want = second(backend), second(None)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, **TOLERANCES[torch.float64])
    assert not got[0].any() and not got[1].any()


@pytest.mark.parametrize("device,backend", EXT_PARAMS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_opcheck(device, backend, act):
    alpha = float(_alpha(act) or 0.0)
    code = ACTIVATIONS.index(act)
    x, b = _inputs((3, 4, 2), 1, device, dtype=torch.float32)
    ops = torch.ops.gradreg_fast
    y = ops.bias_act(x, b, code, 1, alpha)
    grad, gg = torch.randn_like(x), torch.randn_like(x)
    saved = (None, None, y) if from_output(act, alpha) else (x, b, None)
    torch.library.opcheck(ops.bias_act.default, (x, b, code, 1, alpha))
    torch.library.opcheck(ops.bias_act.default, (x.to(memory_format=torch.channels_last)
                                                 if x.dim() == 4 else x.transpose(0, 2), None, code, 0, alpha))
    torch.library.opcheck(ops.bias_act_grad.default, (grad,) + saved + (code, 1, alpha))
    torch.library.opcheck(ops.bias_act_grad2.default, (gg, grad) + saved + (code, 1, alpha))


@pytest.mark.parametrize("device,backend", FAST_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_low_precision(device, backend, act, dtype):
    """Forward, backward and double backward: error at most about twice that of the composite
    computed in the same dtype, both measured against the fp64 composite (flash-attention rule)."""
    x, b = _inputs((4, 32), 1, device, dtype=dtype, seed=1)
    v = torch.randn(4, 32, device=device, dtype=torch.float64).to(dtype)
    w = torch.randn(4, 32, device=device, dtype=torch.float64).to(dtype)
    alpha = _alpha(act)

    def passes(fn, x, b, v, w):
        x, b, v = (t.clone().requires_grad_(True) for t in (x, b, v))
        y = fn(x, b)
        gx, gb = torch.autograd.grad(y, (x, b), v, create_graph=True)
        dd = torch.autograd.grad((gx * w).sum(), (x, b, v), allow_unused=True)
        dd = [torch.zeros_like(t) if d is None else d for d, t in zip(dd, (x, b, v), strict=True)]
        return [y, gx, gb] + dd

    ours = passes(lambda x, b: bias_act(x, b, act, alpha=alpha, backend=backend), x, b, v, w)
    ref = passes(lambda x, b: gr.reference.bias_act(x, b, act, alpha=alpha), x, b, v, w)
    exact = passes(lambda x, b: gr.reference.bias_act(x, b, act, alpha=alpha),
                   *(t.double() for t in (x, b, v, w)))
    for name, o, r, e in zip(["y", "grad_x", "grad_b", "dd_x", "dd_b", "dd_v"], ours, ref, exact, strict=True):
        assert o.dtype == dtype, name
        scale = max(e.abs().max().item(), 1.0)
        assert_close_to_reference(o, r, e, floor=4 * torch.finfo(dtype).eps * scale)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "elu"])
def test_layouts(device, backend, act):
    """Non-contiguous and channels_last inputs, any bias dim; inputs are never modified."""
    base, _ = _inputs((2, 3, 4, 5), 1, device)
    cases = [(base.to(memory_format=torch.channels_last), 1), (base.transpose(1, 3), 1),
             (base[:, :, ::2], 1), (base, 3), (base.transpose(0, 2), -1), (base[..., 0], 2)]
    for x, dim in cases:
        b = torch.randn(x.shape[dim], dtype=torch.float64, device=device)
        x0, b0 = x.clone(), b.clone()
        xr, br = x.detach().requires_grad_(True), b.clone().requires_grad_(True)
        out = bias_act(xr, br, act, dim=dim, backend=backend)
        want = gr.reference.bias_act(x, b, act, dim=dim)
        torch.testing.assert_close(out, want, **TOLERANCES[torch.float64])
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() and backend != "reference":
            assert out.is_contiguous(memory_format=torch.channels_last)
        v = torch.randn_like(want)
        got = torch.autograd.grad(out, (xr, br), v)
        xw, bw = x.detach().requires_grad_(True), b.clone().requires_grad_(True)
        exp = torch.autograd.grad(gr.reference.bias_act(xw, bw, act, dim=dim), (xw, bw), v)
        for g_, e_ in zip(got, exp, strict=True):
            torch.testing.assert_close(g_, e_, **TOLERANCES[torch.float64])
        assert torch.equal(x, x0) and torch.equal(b, b0)


@pytest.mark.parametrize("device,backend", backend_params())
def test_batch_of_one_and_empty(device, backend):
    x, b = _inputs((1, 7), 1, device)
    torch.testing.assert_close(bias_act(x, b, "silu", backend=backend), gr.reference.bias_act(x, b, "silu"))
    xe = torch.randn(0, 7, dtype=torch.float64, device=device, requires_grad=True)
    be = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    out = bias_act(xe, be, "gelu", backend=backend)
    assert out.shape == (0, 7)
    gx, gb = torch.autograd.grad(out, (xe, be), torch.ones_like(out), create_graph=True)
    assert gx.shape == (0, 7) and torch.equal(gb, torch.zeros_like(gb))
    (dd,) = torch.autograd.grad(gx.sum() + gb.sum(), xe, allow_unused=True)
    assert dd is None or dd.shape == (0, 7)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "elu"])
def test_saves_only_what_is_needed(act):
    """relu/leaky_relu/tanh/sigmoid save the output only; the others save x and b."""
    if not gr.backends()["cpp"].available:
        pytest.skip("needs the C++ backend: " + gr.backends()["cpp"].reason)
    x, b = _inputs((3, 4), 1, "cpu")
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bias_act(x, b, act, backend="cpp")
    if act in ("relu", "leaky_relu", "tanh", "sigmoid"):
        assert len(saved) == 1 and torch.equal(saved[0], y)
    else:
        assert len(saved) == 2 and torch.equal(saved[0], x) and torch.equal(saved[1], b)


@pytest.mark.parametrize("device,backend", backend_params())
def test_bad_input(device, backend):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(TypeError, match="floating"):
        bias_act(torch.arange(6, device=device).reshape(2, 3), backend=backend)
    with pytest.raises(ValueError, match=r"b must have shape \(3,\)"):
        bias_act(x, torch.zeros(2, device=device), backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        bias_act(x, torch.zeros(3, dtype=torch.float64, device=device), backend=backend)
    with pytest.raises(ValueError, match=f"unknown activation 'swish'.*{', '.join(ACTIVATIONS)}"):
        bias_act(x, act="swish", backend=backend)
    with pytest.raises(ValueError, match="alpha applies to leaky_relu and elu"):
        bias_act(x, act="tanh", alpha=0.1, backend=backend)
    with pytest.raises(ValueError, match="dim"):
        bias_act(x, torch.zeros(3, device=device), dim=2, backend=backend)


def test_wrong_device_for_backend():
    meta = torch.randn(2, 3, device="meta")  # stands in for a GPU tensor on a CPU-only machine
    if gr.backends()["cpp"].available:
        with pytest.raises(RuntimeError, match="'cpp' runs on CPU tensors"):
            bias_act(meta, backend="cpp")
    if torch.cuda.is_available() and gr.backends()["cpp"].available:
        with pytest.raises(RuntimeError, match="'cpp' runs on CPU tensors"):
            bias_act(torch.randn(2, 3, device="cuda"), backend="cpp")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        bias_act(torch.randn(2, 3), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        bias_act(torch.randn(2, 3), backend="fast")
    with pytest.raises(ValueError, match="b is on"):
        bias_act(torch.randn(2, 3), torch.zeros(3, device="meta"))


_BASELINE_SCRIPT = r"""
import sys, torch
from gradreg_fast.ops import ACTIVATIONS, bias_act
x, b, v, w = torch.load(sys.argv[1])
out = {}
for act in ACTIVATIONS:
    xr, br, vr = (t.clone().requires_grad_(True) for t in (x, b, v))
    y = bias_act(xr, br, act, backend="cpp")
    (gx,) = torch.autograd.grad(y, xr, vr, create_graph=True)
    (ggx,) = torch.autograd.grad(gx, xr, w, allow_unused=True, materialize_grads=True)
    out[act] = (y.detach(), gx.detach(), ggx)
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(not gr.backends()["cpp"].available, reason="the extension is not built")
def test_cpu_baseline_loops_match_reference(tmp_path):
    """The C++ element loops exist twice (baseline x86-64 and AVX2+FMA, chosen at run time); this
    machine runs one of them in-process, and GRADREG_CPU_BASELINE=1 forces the baseline copy in a
    subprocess. Both against the fp64 reference, forward / backward / double backward (fp32; the
    low-precision dtypes are covered by the flash-attention rule tests above)."""
    import subprocess
    import sys
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32
    x, v, w = (torch.randn(64, 37, generator=g).mul_(2) for _ in range(3))
    b = torch.randn(37, generator=g)
    torch.save((x, b, v, w), tmp_path / "in.pt")
    run = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         cwd=tmp_path, env=subprocess_env(GRADREG_CPU_BASELINE="1"), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    baseline = torch.load(tmp_path / "out.pt")
    for act in ACTIVATIONS:
        xr, br, vr = (t.double().requires_grad_(True) for t in (x, b, v))
        y = gr.reference.bias_act(xr, br, act)
        (gx,) = torch.autograd.grad(y, xr, vr, create_graph=True)
        (ggx,) = torch.autograd.grad(gx, xr, w.double(), allow_unused=True, materialize_grads=True)
        xs, bs, vs = (t.clone().requires_grad_(True) for t in (x, b, v))
        ys = bias_act(xs, bs, act, backend="cpp")
        (gxs,) = torch.autograd.grad(ys, xs, vs, create_graph=True)
        (ggxs,) = torch.autograd.grad(gxs, xs, w, allow_unused=True, materialize_grads=True)
        for name, got_base, got_here, want in (("forward", baseline[act][0], ys, y),
                                               ("backward", baseline[act][1], gxs, gx),
                                               ("double backward", baseline[act][2], ggxs, ggx)):
            for got in (got_base, got_here):
                assert got.dtype == dtype
                torch.testing.assert_close(got.double(), want.detach(), **TOLERANCES[dtype],
                                           msg=lambda m, act=act, name=name: f"{act} {name}: {m}")


def test_cpp_activation_list_matches_the_table():
    """csrc/bias_act.h's GRADREG_ACTIVATIONS rows are the table's rows, in its order (the codes):
    enumerator, act' from the output, act'' != 0, takes an alpha."""
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "bias_act.h")) as f:
        header = f.read()
    block = re.search(r"#define GRADREG_ACTIVATIONS\(X\)((?:.*\\\n)*.*\n)", header)
    assert block, "GRADREG_ACTIVATIONS not found in csrc/bias_act.h"
    rows = re.findall(r"X\((k\w+), (true|false), (true|false), (true|false)\)", block.group(1))
    want = [(a.cpp, a.saves != "input", a.second, a.default_alpha is not None) for a in TABLE]
    assert [(name, y == "true", second == "true", alpha == "true") for name, y, second, alpha in rows] == want
