"""The per-sample squared norm op on every backend against the reference."""
import pytest
import torch

import gradreg_fast as gr
from conftest import TOLERANCES, assert_close_to_reference, backend_params
from gradreg_fast.ops import sq_norm

SHAPES = [(5, 7), (3, 2, 4, 5), (1, 33), (4, 1)]


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_value_fp64(device, backend, shape):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    out = sq_norm(x, backend=backend)
    assert out.shape == (shape[0],) and out.dtype == torch.float64
    torch.testing.assert_close(out, x.reshape(shape[0], -1).pow(2).sum(1), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device,backend", backend_params())
def test_gradcheck_and_gradgradcheck(device, backend):
    x = torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda t: sq_norm(t, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device,backend", backend_params())
def test_backward_op_gradgradcheck(device, backend):
    """Second order through the backward op itself, in both of its inputs."""
    x = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, device=device)

    def first_order(t):
        (g,) = torch.autograd.grad(sq_norm(t, backend=backend).sum(), t, create_graph=True)
        return (g * w).sum() + sq_norm(g, backend=backend).sum()
    assert torch.autograd.gradcheck(first_order, (x,))
    assert torch.autograd.gradgradcheck(first_order, (x,))


@pytest.mark.parametrize("device,backend", [p for p in backend_params() if p.values[1] in ("cpp", "cuda")])
def test_opcheck(device, backend):
    x = torch.randn(4, 3, 5, device=device)
    torch.library.opcheck(torch.ops.gradreg_fast.sq_norm.default, (x,))
    torch.library.opcheck(torch.ops.gradreg_fast.sq_norm_backward.default,
                          (torch.randn(4, device=device), x))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_against_fp32(device, backend, dtype):
    """fp32 accumulation: error at most twice that of the reference composite in the same dtype."""
    x = (torch.randn(6, 300, device=device) * 3).to(dtype)
    out = sq_norm(x, backend=backend)
    assert out.dtype == torch.float32
    exact = x.double().pow(2).sum(1)
    same_dtype_ref = x.pow(2).sum(1)  # the naive composite, accumulating in the low dtype
    assert_close_to_reference(out, same_dtype_ref, exact)
    # gradients stay in the input dtype
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(sq_norm(xr, backend=backend).sum(), xr)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), 2 * x.double(), **TOLERANCES[dtype])


@pytest.mark.parametrize("device,backend", backend_params())
def test_non_contiguous_and_channels_last(device, backend):
    base = torch.randn(4, 6, 5, 3, dtype=torch.float64, device=device)
    for x in (base.transpose(1, 3), base[:, ::2], base.to(memory_format=torch.channels_last)):
        before = x.clone()
        torch.testing.assert_close(sq_norm(x, backend=backend), gr.reference.sq_norm(x), **TOLERANCES[torch.float64])
        assert torch.equal(x, before)
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(sq_norm(xr, backend=backend).sum(), xr)
        torch.testing.assert_close(g, 2 * x, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device,backend", backend_params())
def test_batch_of_one_and_empty_batch(device, backend):
    x = torch.randn(1, 17, dtype=torch.float64, device=device)
    torch.testing.assert_close(sq_norm(x, backend=backend), x.pow(2).sum(1, keepdim=False))
    empty = torch.randn(0, 5, device=device, requires_grad=True)
    out = sq_norm(empty, backend=backend)
    assert out.shape == (0,)
    (g,) = torch.autograd.grad(out.sum(), empty)
    assert g.shape == (0, 5)


@pytest.mark.parametrize("device,backend", backend_params())
def test_bad_input(device, backend):
    with pytest.raises(TypeError, match="floating"):
        sq_norm(torch.arange(6, device=device).reshape(2, 3), backend=backend)
    with pytest.raises(TypeError, match="floating"):
        sq_norm(torch.ones(2, 3, dtype=torch.bool, device=device), backend=backend)
    with pytest.raises(ValueError, match="batch dimension"):
        sq_norm(torch.tensor(3.0, device=device), backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*reference"):
        sq_norm(torch.randn(2, 3), backend="fast")
