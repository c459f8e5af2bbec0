"""fd_direction on every backend against the reference."""
import math

import pytest
import torch

import gradreg_fast as gr
from conftest import TOLERANCES, assert_close_to_reference, backend_params
from gradreg_fast.ops import fd_direction

SHAPES = [(5, 7), (3, 2, 4, 5), (1, 33), (4, 1)]


def expected(x, g, h):
    """Independent formula in fp64: x + h g/‖g‖ per sample (x where ‖g‖ = 0)."""
    rows = g.double().reshape(g.shape[0], -1)
    n = rows.norm(dim=1)
    d = torch.where(n[:, None] > 0, rows / n.clamp_min(1e-300)[:, None], torch.zeros_like(rows))
    return (x.double().reshape(rows.shape) + h * d).reshape(x.shape), n


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_value_fp64(device, backend, shape):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    out, n = fd_direction(x, g, 0.3, backend=backend)
    ref_out, ref_n = expected(x, g, 0.3)
    assert out.shape == x.shape and out.dtype == x.dtype and n.shape == (shape[0],) and n.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, **TOLERANCES[torch.float64])
    torch.testing.assert_close(n, ref_n, **TOLERANCES[torch.float64])
    # and the library's reference agrees with the independent formula
    r_out, r_n = gr.reference.fd_direction(x, g, 0.3)
    torch.testing.assert_close(r_out, ref_out, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device,backend", backend_params())
def test_zero_row_no_nan(device, backend):
    x = torch.randn(4, 6, dtype=torch.float64, device=device)
    g = torch.randn(4, 6, dtype=torch.float64, device=device)
    g[2] = 0
    out, n = fd_direction(x, g, -0.5, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(n).all()
    assert n[2] == 0 and torch.equal(out[2], x[2])
    torch.testing.assert_close(out, expected(x, g, -0.5)[0], **TOLERANCES[torch.float64])
    xr, gr_ = x.clone().requires_grad_(True), g.clone().requires_grad_(True)
    o, nn_ = fd_direction(xr, gr_, -0.5, backend=backend)
    dx, dg = torch.autograd.grad((o * torch.randn_like(o)).sum() + nn_.sum(), (xr, gr_))
    assert torch.isfinite(dx).all() and torch.isfinite(dg).all()
    if backend != "reference":
        assert torch.equal(dg[2], torch.zeros_like(dg[2]))  # the op's documented value at ‖g‖ = 0


@pytest.mark.parametrize("device,backend", backend_params())
def test_gradcheck_and_gradgradcheck(device, backend):
    x = torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, device=device)

    def fn(a, b):
        out, n = fd_direction(a, b, 0.7, backend=backend)
        return out, n * w  # both outputs in the check
    assert torch.autograd.gradcheck(fn, (x, g))
    assert torch.autograd.gradgradcheck(fn, (x, g))


@pytest.mark.parametrize("device,backend", backend_params())
def test_gradient_matches_reference(device, backend):
    x = torch.randn(4, 9, dtype=torch.float64, device=device)
    g = torch.randn(4, 9, dtype=torch.float64, device=device)
    go, gn = torch.randn(4, 9, dtype=torch.float64, device=device), torch.randn(4, dtype=torch.float64, device=device)
    grads = []
    for fn in (lambda a, b: fd_direction(a, b, 0.2, backend=backend),
               lambda a, b: gr.reference.fd_direction(a, b, 0.2)):
        a, b = x.clone().requires_grad_(True), g.clone().requires_grad_(True)
        out, n = fn(a, b)
        grads.append(torch.autograd.grad((out * go).sum() + (n * gn).sum(), (a, b)))
    for mine, ref in zip(*grads, strict=True):
        torch.testing.assert_close(mine, ref, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device,backend", [p for p in backend_params() if p.values[1] != "reference"])
def test_opcheck(device, backend):
    op = {"cpp": "fd_direction", "cuda": "fd_direction", "triton": "fd_direction_triton"}[backend]
    x, g = torch.randn(4, 3, 5, device=device), torch.randn(4, 3, 5, device=device)
    torch.library.opcheck(getattr(torch.ops.gradreg_fast, op).default, (x, g, 0.25))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision(device, backend, dtype):
    x = torch.randn(6, 300, device=device).to(dtype)
    g = (torch.randn(6, 300, device=device) * 40).to(dtype)  # ‖g‖² ≈ 5e5: overflows an fp16 sum
    out, n = fd_direction(x, g, 0.5, backend=backend)
    assert out.dtype == dtype and n.dtype == torch.float32
    exact_out, exact_n = expected(x, g, 0.5)
    same_out, same_n = gr.reference.fd_direction(x.float(), g.float(), 0.5)
    assert_close_to_reference(out, same_out.to(dtype), exact_out)
    torch.testing.assert_close(n.double(), exact_n, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(n).all()


@pytest.mark.parametrize("device,backend", backend_params())
def test_non_contiguous_and_channels_last(device, backend):
    base_x = torch.randn(4, 6, 5, 3, dtype=torch.float64, device=device)
    base_g = torch.randn(4, 6, 5, 3, dtype=torch.float64, device=device)
    for view in (lambda t: t.transpose(1, 3), lambda t: t[:, ::2], lambda t: t.to(memory_format=torch.channels_last)):
        x, g = view(base_x), view(base_g)
        bx, bg = x.clone(), g.clone()
        out, n = fd_direction(x, g, 0.1, backend=backend)
        ref_out, ref_n = expected(x, g, 0.1)
        torch.testing.assert_close(out, ref_out, **TOLERANCES[torch.float64])
        torch.testing.assert_close(n, ref_n, **TOLERANCES[torch.float64])
        assert torch.equal(x, bx) and torch.equal(g, bg)  # inputs untouched


@pytest.mark.parametrize("device,backend", backend_params())
def test_batch_of_one_and_empty_batch(device, backend):
    x = torch.randn(1, 17, dtype=torch.float64, device=device)
    g = torch.randn(1, 17, dtype=torch.float64, device=device)
    out, n = fd_direction(x, g, 1.0, backend=backend)
    torch.testing.assert_close(out, expected(x, g, 1.0)[0])
    ex = torch.randn(0, 5, device=device, requires_grad=True)
    eg = torch.randn(0, 5, device=device, requires_grad=True)
    out, n = fd_direction(ex, eg, 1.0, backend=backend)
    assert out.shape == (0, 5) and n.shape == (0,)
    dx, dg = torch.autograd.grad(out.sum() + n.sum(), (ex, eg))
    assert dx.shape == (0, 5) and dg.shape == (0, 5)


@pytest.mark.parametrize("device,backend", backend_params())
def test_bad_input(device, backend):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(TypeError, match="floating"):
        fd_direction(torch.ones(3, 4, dtype=torch.long, device=device), x, 0.1, backend=backend)
    with pytest.raises(ValueError, match="same shape"):
        fd_direction(x, torch.randn(3, 5, device=device), 0.1, backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        fd_direction(x, x.double(), 0.1, backend=backend)
    for bad in (math.inf, math.nan, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            fd_direction(x, x, bad, backend=backend)
    with pytest.raises(TypeError, match="Python float"):
        fd_direction(x, x, torch.tensor(0.1), backend=backend)
    with pytest.raises(ValueError, match="batch dimension"):
        fd_direction(torch.tensor(1.0, device=device), torch.tensor(1.0, device=device), 0.1, backend=backend)


@pytest.mark.skipif(not gr.backends()["cpp"].available, reason="extension not built")
def test_cpp_op_checks_h():
    """The C++ kernel checks on its own (direct op call, no Python wrapper)."""
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="finite"):
        torch.ops.gradreg_fast.fd_direction(x, x, math.inf)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.gradreg_fast.fd_direction(x, torch.randn(2, 4), 0.1)


@pytest.mark.skipif(not gr.backends()["triton"].available, reason="triton backend not available here")
def test_triton_split_path():
    """The two-kernel path (split reduction + elementwise) used for a few long rows on GPUs."""
    from gradreg_fast.triton.fd_direction import fd_direction as launch
    from gradreg_fast.triton.sq_norm import BLOCK
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 2 * BLOCK + 5, dtype=torch.float64, device=device)
    g = torch.randn(2, 2 * BLOCK + 5, dtype=torch.float64, device=device)
    g[1] = 0
    out, n = launch(x, g, 0.3, split=3)
    ref_out, ref_n = expected(x, g, 0.3)
    torch.testing.assert_close(out, ref_out, **TOLERANCES[torch.float64])
    torch.testing.assert_close(n, ref_n, **TOLERANCES[torch.float64])
