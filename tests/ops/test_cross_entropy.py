"""Fused softmax cross-entropy on every backend against torch.nn.functional.cross_entropy and the
reference: values, first/second/third derivatives, opcheck, dtypes, layouts, bad input."""
import pytest
import torch
import torch.nn.functional as F

import gradreg_fast as gr
from conftest import TOLERANCES, assert_close_to_reference, backend_params
from gradreg_fast.ops import cross_entropy

SHAPES = [(5, 7), (1, 3), (4, 1), (3, 40), (2, 1100)]  # 1100 > one Triton tile of classes
F64 = TOLERANCES[torch.float64]
FUSED = [p for p in backend_params() if p.values[1] != "reference"]
OPS = {"cpp": ("cross_entropy", "cross_entropy_backward", "cross_entropy_hvp"),
       "cuda": ("cross_entropy", "cross_entropy_backward", "cross_entropy_hvp"),
       "triton": ("cross_entropy_triton", "cross_entropy_backward_triton", "cross_entropy_hvp_triton")}


def ops(backend):
    return [getattr(torch.ops.gradreg_fast, name) for name in OPS[backend]]


def data(B, K, device, dtype=torch.float64, scale=3.0):
    z = torch.randn(B, K, device=device) * scale
    return z.to(dtype), torch.randint(0, K, (B,), device=device)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_value_and_gradients_fp64(device, backend, shape):
    z, y = data(*shape, device)
    u = torch.randn(shape, dtype=torch.float64, device=device)
    zr = z.clone().requires_grad_(True)
    loss = cross_entropy(zr, y, backend=backend)
    assert loss.shape == (shape[0],) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(z, y, reduction="none"), **F64)
    (g,) = torch.autograd.grad(loss.sum(), zr, create_graph=True)
    (hvp,) = torch.autograd.grad((g * u).sum(), zr)
    zt = z.clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(F.cross_entropy(zt, y, reduction="sum"), zt, create_graph=True)
    (hvpt,) = torch.autograd.grad((gt * u).sum(), zt)
    torch.testing.assert_close(g, gt, **F64)
    torch.testing.assert_close(hvp, hvpt, **F64)
    torch.testing.assert_close(gr.reference.cross_entropy_grad(z, y), gt, **F64)
    torch.testing.assert_close(gr.reference.cross_entropy_hvp(z, u), hvpt, **F64)


@pytest.mark.parametrize("device,backend", backend_params())
def test_gradcheck_and_gradgradcheck(device, backend):
    z, y = data(4, 6, device, scale=1.0)
    z.requires_grad_(True)
    fn = lambda t: cross_entropy(t, y, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))


@pytest.mark.parametrize("device,backend", backend_params())
def test_third_order(device, backend):
    """gradgradcheck of the first derivative: exercises the backward of the Hessian-vector op."""
    z, y = data(3, 5, device, scale=1.0)
    z.requires_grad_(True)
    w = torch.randn(3, dtype=torch.float64, device=device)
    v = torch.randn(3, 5, dtype=torch.float64, device=device)

    def first_order(t):
        (g,) = torch.autograd.grad((cross_entropy(t, y, backend=backend) * w).sum(), t, create_graph=True)
        return (g * v).sum(1) + g.pow(2).sum(1)
    assert torch.autograd.gradcheck(first_order, (z,))
    assert torch.autograd.gradgradcheck(first_order, (z,))


@pytest.mark.parametrize("device,backend", FUSED)
def test_hvp_op_gradcheck(device, backend):
    """The Hessian-vector op on its own, in u, scale and logits (lse follows the logits)."""
    fwd, _bwd, hvp_op = ops(backend)
    z, y = data(3, 5, device, scale=1.0)
    u = torch.randn(3, 5, dtype=torch.float64, device=device)
    c = torch.randn(3, dtype=torch.float64, device=device)

    def fn(u_, c_, z_):
        lse = fwd(z_, y)[1]
        return hvp_op(u_, c_, z_, y, lse)
    args = tuple(t.clone().requires_grad_(True) for t in (u, c, z))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    hvp, dot = fn(u, c, z)
    p = torch.softmax(z, 1)
    torch.testing.assert_close(hvp, c[:, None] * gr.reference.cross_entropy_hvp(z, u), **F64)
    torch.testing.assert_close(dot, (gr.reference.cross_entropy_grad(z, y) * u).sum(1), **F64)
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("device,backend", FUSED)
def test_opcheck(device, backend):
    fwd, bwd, hvp = ops(backend)
    z, y = data(4, 6, device, dtype=torch.float32)
    loss, lse = fwd(z, y)
    torch.library.opcheck(fwd.default, (z, y))
    torch.library.opcheck(bwd.default, (torch.randn(4, device=device), z, y, lse))
    torch.library.opcheck(hvp.default, (torch.randn(4, 6, device=device), torch.randn(4, device=device), z, y, lse))


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("device,backend", backend_params())
def test_doubleback_penalty_matches_torch(device, backend):
    """DoubleBack mean_i ‖∂ℓ_i/∂x_i‖² through the op: value and parameter gradient (second order
    through the CE) equal those through F.cross_entropy's double backward."""
    torch.manual_seed(0)
    model = _MLP().double().to(device)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (5,), device=device)
    results = []
    for loss_fn in (lambda o, t: cross_entropy(o, t, backend=backend), None):
        value = gr.reference.doubleback(model, x, y, loss_fn=loss_fn)
        grads = torch.autograd.grad(value, list(model.parameters()))
        results.append((value, grads))
    (v_ours, g_ours), (v_ref, g_ref) = results
    torch.testing.assert_close(v_ours, v_ref, **F64)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, **F64)


def _loss_grad_hvp(fn, z: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fn's per-sample losses at a copy of z, their gradient (create_graph) and its product with u."""
    t = z.clone().requires_grad_(True)
    loss = fn(t)
    (g,) = torch.autograd.grad(loss.sum(), t, create_graph=True)
    (h,) = torch.autograd.grad((g * u.to(t.dtype)).sum(), t)
    return loss, g, h


def _against_torch(z, y, u, backend):
    """(loss, gradient, Hessian-vector product) of the op, of torch's composite in fp64 (the ground
    truth) and of torch's composite in z's dtype."""
    def torch_ce(t):
        return F.cross_entropy(t, y, reduction="none")
    return (_loss_grad_hvp(lambda t: cross_entropy(t, y, backend=backend), z, u),
            _loss_grad_hvp(torch_ce, z.double(), u), _loss_grad_hvp(torch_ce, z, u))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision(device, backend, dtype):
    """Loss, gradient and Hessian-vector product: error at most twice that of torch's composite
    in the same dtype (both against fp64)."""
    z, y = data(64, 10, device, dtype=dtype)
    u = torch.randn(64, 10, device=device).to(dtype)
    mine, exact, same = _against_torch(z, y, u, backend)
    loss, g, h = mine
    assert loss.dtype == torch.float32 and g.dtype == dtype and h.dtype == dtype
    for m, ex, sm in zip(mine, exact, same, strict=True):
        assert_close_to_reference(m, sm, ex)


@pytest.mark.parametrize("device,backend", backend_params())
def test_fp32_wide_range(device, backend):
    """fp32 logits spread over ±100 (exp arguments down to about -200, below the fp32 underflow of
    the CPU kernels' vectorized exp): loss, gradient and Hessian-vector product within twice the
    error of torch's fp32 composite (against fp64)."""
    z = torch.randn(64, 50, device=device) * 40
    y = torch.randint(0, 50, (64,), device=device)
    u = torch.randn(64, 50, device=device)
    mine, exact, same = _against_torch(z, y, u, backend)
    for m, ex, sm in zip(mine, exact, same, strict=True):
        assert torch.isfinite(m).all()
        assert_close_to_reference(m, sm, ex)


@pytest.mark.parametrize("device,backend", backend_params())
def test_non_contiguous_and_unchanged_inputs(device, backend):
    base, _ = data(7, 5, device)
    z = base.t().contiguous().t()          # (7, 5) with column-major strides
    y = torch.randint(0, 5, (14,), device=device)[::2]
    assert not z.is_contiguous() and not y.is_contiguous()
    zr = z.detach().requires_grad_(True)
    before = z.clone()
    loss = cross_entropy(zr, y, backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(z, y, reduction="none"), **F64)
    (g,) = torch.autograd.grad(loss.sum(), zr, create_graph=True)
    torch.testing.assert_close(g, gr.reference.cross_entropy_grad(z, y), **F64)
    u = torch.randn(5, 7, dtype=torch.float64, device=device).t()  # non-contiguous cotangent too
    (h,) = torch.autograd.grad((g * u).sum(), zr)
    torch.testing.assert_close(h, gr.reference.cross_entropy_hvp(z, u), **F64)
    assert torch.equal(z, before) and torch.equal(zr.detach(), before)  # nothing written into the logits


@pytest.mark.parametrize("device,backend", backend_params())
def test_extreme_logits(device, backend):
    """Stable log-sum-exp: huge logits and a -inf (masked) class give finite, correct results."""
    z = torch.tensor([[1e4, -1e4, 3.0], [0.5, float("-inf"), -2.0]], dtype=torch.float64, device=device)
    y = torch.tensor([1, 0], device=device)
    zr = z.clone().requires_grad_(True)
    loss = cross_entropy(zr, y, backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(z, y, reduction="none"), **F64)
    (g,) = torch.autograd.grad(loss.sum(), zr)
    zt = z.clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(F.cross_entropy(zt, y, reduction="sum"), zt)
    torch.testing.assert_close(g, gt, **F64)


@pytest.mark.parametrize("device,backend", backend_params())
def test_batch_of_one_and_empty_batch(device, backend):
    z, y = data(1, 9, device)
    torch.testing.assert_close(cross_entropy(z, y, backend=backend), F.cross_entropy(z, y, reduction="none"), **F64)
    empty = torch.randn(0, 5, device=device, requires_grad=True)
    loss = cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    assert loss.shape == (0,)
    (g,) = torch.autograd.grad(loss.sum(), empty, create_graph=True)
    assert g.shape == (0, 5)
    (h,) = torch.autograd.grad(g.sum(), empty, allow_unused=True, materialize_grads=True)
    assert h.shape == (0, 5)


@pytest.mark.parametrize("device,backend", backend_params())
def test_bad_input(device, backend):
    z, y = data(3, 4, device, dtype=torch.float32)
    with pytest.raises(TypeError, match="floating"):
        cross_entropy(torch.ones(3, 4, dtype=torch.long, device=device), y, backend=backend)
    with pytest.raises(TypeError, match="int64"):
        cross_entropy(z, y.float(), backend=backend)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        cross_entropy(z, y[:2], backend=backend)
    with pytest.raises(ValueError, match=r"shape \(B, K\)"):
        cross_entropy(z[0], y, backend=backend)
    if device == "cpu":  # on CUDA the check is an asynchronous device assertion
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            cross_entropy(z, torch.tensor([0, 4, 1], device=device), backend=backend)
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            cross_entropy(z, torch.tensor([0, -1, 1], device=device), backend=backend)


@pytest.mark.skipif(not gr.backends()["cpp"].available, reason="extension not built")
def test_cpp_ops_check_labels():
    """The C++ kernels check labels on their own (direct op calls, no Python wrapper)."""
    z = torch.randn(3, 4)
    bad = torch.tensor([0, 4, 1])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.gradreg_fast.cross_entropy(z, bad)
    lse = torch.logsumexp(z, 1)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.gradreg_fast.cross_entropy_backward(torch.ones(3), z, bad, lse)
    with pytest.raises(RuntimeError, match="shape of logits"):
        torch.ops.gradreg_fast.cross_entropy_hvp(torch.randn(3, 5), torch.ones(3), z,
                                                 torch.zeros(3, dtype=torch.long), lse)


def test_label_range_is_checked_again_after_an_in_place_change():
    """The labels' extremes are read once per unchanged tensor (one call checks them up to three
    times); an in-place change of the same tensor is seen by the next check."""
    from gradreg_fast.ops import cross_entropy
    logits = torch.randn(4, 3)
    y = torch.randint(3, (4,))
    cross_entropy(logits, y)
    y[1] = 7
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        cross_entropy(logits, y)
    y[1] = 2
    cross_entropy(logits, y)
    with torch.inference_mode():
        bad = torch.full((4,), 5)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        cross_entropy(logits, bad)
