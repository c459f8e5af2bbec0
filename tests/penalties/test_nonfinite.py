"""NaN/Inf inputs and parameters, and zero input gradients, for every (kind, method) served.

Policy (docs/scaling.md, gradreg_fast/penalties/guards.py): documented propagation, never a silently finite
wrong answer. A NaN or ±Inf in x, or a NaN in the model output (a NaN parameter gives one),
makes the penalty NaN and sends NaN into the parameter gradients. Zero input gradients (a dead
ReLU layer) give exactly 0 and no NaN.
"""
import pytest
import torch
from torch import nn

import gradreg_fast as gr
from method_matrix import served_pairs


def _model(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), act(), nn.Linear(10, 10), act(), nn.Linear(10, 4)).double()


def _data(batch=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 6, generator=g, dtype=torch.float64), torch.randint(4, (batch,), generator=g)


def _run(kind, method, model, x, y):
    p = gr.penalty(kind, model, x, y, method=method, generator=torch.Generator().manual_seed(2))
    gs = torch.autograd.grad(p, list(model.parameters()), allow_unused=True, materialize_grads=True)
    return p, gs


def _poison_x(where):
    def f(model, x):
        x = x.clone()
        x[2, 3] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[where]
        return model, x
    return f


def _poison_param(value):
    def f(model, x):
        with torch.no_grad():
            model[2].weight[1, 4] = value
        return model, x
    return f


CASES = {
    "x-nan": _poison_x("nan"),
    "x-inf": _poison_x("inf"),
    "x--inf": _poison_x("-inf"),
    "param-nan": _poison_param(float("nan")),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh], ids=["relu", "tanh"])
@pytest.mark.parametrize("kind,method", served_pairs())
def test_nonfinite_propagates(kind, method, act, case):
    model, x = CASES[case](_model(act), _data()[0])
    y = _data()[1]
    x_before = x.clone()
    p, gs = _run(kind, method, model, x, y)
    assert torch.isnan(p), f"penalty {p.item()} is finite for a non-finite {case}"
    assert any(not torch.isfinite(g).all() for g in gs), "no NaN reached the parameter gradients"
    assert torch.equal(x.isnan(), x_before.isnan()) and torch.equal(x.nan_to_num(), x_before.nan_to_num())


def test_relu_jacobian_ignores_activation_values():
    """Why the guard is needed: a ReLU network's input Jacobian depends on its masks only, so the
    plain FrobReg computation on a NaN input is finite (and meaningless)."""
    model = _model(nn.ReLU)
    x = _data()[0].clone()
    x[2, 3] = float("nan")
    xr = x.requires_grad_(True)
    out = model(xr)
    (g,) = torch.autograd.grad(out[:, 0].sum(), xr)
    assert torch.isfinite(g).all()
    assert torch.isnan(gr.penalty("frobreg", model, x))


def test_inf_logits_masked_are_not_flagged():
    """±Inf in the output alone (masked logits) is legitimate and left to the arithmetic: the
    penalty of a model whose masked class is -inf equals that of the model without that class."""
    base = _model(nn.Tanh)
    x, _ = _data()

    def masked(z):
        out = base(z)
        return torch.cat([out[:, :3], torch.full_like(out[:, 3:], float("-inf"))], dim=1)

    def dropped(z):
        return base(z)[:, :3]

    p = gr.penalty("jacreg", masked, x)
    assert torch.isfinite(p)
    torch.testing.assert_close(p, gr.penalty("jacreg", dropped, x))


@pytest.mark.parametrize("kind,method", served_pairs())
def test_zero_input_gradient_gives_zero_and_no_nan(kind, method):
    """A first layer whose ReLUs are all dead: output constant in x, every input gradient 0."""
    model = _model(nn.ReLU)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    x, y = _data()
    p, gs = _run(kind, method, model, x, y)
    assert p.item() == 0.0
    for g in gs:
        assert torch.isfinite(g).all()
        assert g.abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_factor_flags_only_nonfinite_inputs_near_the_float_range(dtype):
    """The guard's factor is exactly 1 for finite x at the ends of its dtype's range (no overflow in
    the check itself) and NaN as soon as x holds a NaN or ±Inf, or u a NaN (not for ±Inf in u)."""
    from gradreg_fast.penalties.guards import nonfinite_factor
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big, 1.0], [0.5, -big, big]], dtype=dtype)
    u = torch.tensor([[1.0], [float("-inf")]], dtype=torch.float32)
    like = torch.zeros((), dtype=torch.float32)
    assert nonfinite_factor(x, u, like).item() == 1.0
    for bad in (float("nan"), float("inf"), float("-inf")):
        xb = x.clone()
        xb[1, 0] = bad
        assert torch.isnan(nonfinite_factor(xb, u, like))
    assert torch.isnan(nonfinite_factor(x, torch.tensor([[float("nan")], [0.0]]), like))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_host_guard_agrees_with_the_device_factor(dtype):
    """The CPU guard (read on the host, no multiply when finite) flags exactly what the device factor
    flags, and leaves a finite penalty as the very same tensor."""
    from gradreg_fast.penalties.guards import guard_nonfinite, nonfinite_factor
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big, 1.0], [0.5, -big, big]], dtype=dtype)
    u = torch.tensor([[1.0], [float("-inf")]], dtype=torch.float32)
    p = torch.rand((), dtype=torch.float32) + 0.5
    assert guard_nonfinite(p, x, u) is p
    cases = []
    for bad in (float("nan"), float("inf"), float("-inf")):
        xb = x.clone()
        xb[0, 2] = bad
        cases.append((xb, u))
    cases.append((x, torch.tensor([[float("nan")], [0.0]])))
    for xb, ub in cases:
        assert torch.isnan(nonfinite_factor(xb, ub, p))
        assert torch.isnan(guard_nonfinite(p, xb, ub))
