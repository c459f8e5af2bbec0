"""fd's step check (issue 23 defect 5): on a smooth model whose curvature makes the default step coarse
(EfficientNet-B0 in fp64: gradient error 1.6e-2 to 4.4e-1 against the stated 3e-3, no warning), fd now
estimates its truncation error by halving the step, once per model and kind, and warns (FDStepWarning)
naming exact/hvp and a smaller fd_h. Ground truth: plain fp64 double backprop."""
import re
import warnings

import pytest
import torch
from torch import nn

import gradreg_fast as gr
from gradreg_fast.penalties import estimators


def _model(gain: float) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        m[0].weight.mul_(gain)   # curvature of the first layer's tanh grows as gain²
    return m


def _truth(model, x):
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    g = torch.stack([torch.autograd.grad(out[:, k].sum(), xr, create_graph=True)[0] for k in range(3)])
    return torch.autograd.grad(g.pow(2).sum((0, 2)).mean(), list(model.parameters()), allow_unused=True,
                               materialize_grads=True)


def _fd(model, x, **opts):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        value = gr.penalty("frobreg", model, x, method="fd", **opts)
        grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True, materialize_grads=True)
    return grads, [str(w.message) for w in seen if issubclass(w.category, gr.FDStepWarning)]


def _rel(a, b):
    num = sum(float((p - q).pow(2).sum()) for p, q in zip(a, b, strict=True))
    return (num / sum(float(q.pow(2).sum()) for q in b)) ** 0.5


def test_fd_warns_when_its_step_is_too_coarse_for_the_model():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = _model(300.0)
    grads, step = _fd(model, x)
    err = _rel(grads, _truth(model, x))
    assert err > estimators.FD_STATED_RTOL   # the case: the default step is too coarse here
    assert len(step) == 1 and "method='exact'" in step[0] and "method='hvp'" in step[0] and "fd_h=0.0001" in step[0]
    estimate = float(re.search(r"relative error is ([0-9.e+-]+),", step[0]).group(1))
    assert err / 2 <= estimate <= 2 * err, (estimate, err)
    assert _fd(model, x)[1] == []                      # once per model and kind
    grads, step = _fd(_model(300.0), x, fd_h=1e-4)     # the step the warning points to
    assert step == [] and _rel(grads, _truth(model, x)) <= estimators.FD_STATED_RTOL


@pytest.mark.parametrize("gain", [1.0, 3.0])
def test_fd_step_check_is_quiet_where_fd_is_accurate(gain):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = _model(gain)
    grads, step = _fd(model, x)
    assert step == [] and _rel(grads, _truth(model, x)) <= estimators.FD_STATED_RTOL
