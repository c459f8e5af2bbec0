"""Activations whose backward torch cannot differentiate again (issue 23: nn.Hardsigmoid, the
squeeze-excite gate of MobileNetV3, made exact refuse and hvp/jvp raise a raw NotImplementedError).
The library runs the forwards it differentiates twice with twice-differentiable twins swapped in
(gradreg_fast._twins); the zoo's hard_se_block runs the whole conformance matrix."""
import inspect

import pytest
import torch
from torch import nn

import gradreg_fast as gr
from gradreg_fast.penalties.core import second_order
from gradreg_fast.testing import ground_truth, zoo

# constructor arguments for the activation modules that need some
_ARGS = {"Threshold": (0.1, 20.0), "Softmax": (), "Softmin": (), "LogSoftmax": (), "GLU": ()}
_SKIP = {"MultiheadAttention", "Module", "Softmax2d"}   # not elementwise activations / need 3-D inputs


def _activation_modules():
    mod = nn.modules.activation
    return sorted(n for n, c in vars(mod).items()
                  if inspect.isclass(c) and issubclass(c, nn.Module) and c.__module__ == mod.__name__
                  and n not in _SKIP)


@pytest.mark.parametrize("name", _activation_modules())
def test_every_torch_activation_is_twice_differentiable_in_second_order(name):
    """Every activation module of torch.nn, under the context the library runs its second-order
    forwards in: double backward and forward-over-reverse both exist and are right (gradgradcheck)."""
    cls = getattr(nn, name)
    m = cls(*_ARGS.get(name, ())).double()
    if name in ("Softmax", "Softmin", "LogSoftmax", "GLU"):
        m = cls(dim=-1)
    m.eval()   # RReLU draws its slopes in training mode
    g = torch.Generator().manual_seed(0)
    # away from the kinks (|z| = 3, 0, thresholds) so that finite differences are meaningful
    x = (torch.rand(4, 6, generator=g, dtype=torch.float64) * 7 - 3.5)
    x = torch.where((x.abs() - 3).abs() < 0.05, x + 0.1, x)
    x = torch.where(x.abs() < 0.05, x + 0.1, x).requires_grad_(True)
    with second_order():
        assert torch.autograd.gradgradcheck(m, (x,), check_fwd_over_rev=True)


def test_hardsigmoid_twin_outputs_unchanged():
    x = torch.randn(1000, dtype=torch.float32) * 4
    with second_order():
        y = nn.Hardsigmoid()(x)
    torch.testing.assert_close(y, torch.nn.functional.hardsigmoid(x), rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["exact", "hvp"])
def test_hardsigmoid_model_exact_and_hvp(method):
    """exact refused ('an op in the model has none'), hvp raised NotImplementedError (forward AD with
    aten::hardsigmoid_backward): now both equal plain double backprop of the composite twin to 1e-6."""
    case = zoo.make_case("hard_se_block")
    for kind in ("doubleback", "frobreg"):
        truth = ground_truth.penalty(case, kind)
        value = gr.penalty(kind, case.model, case.input(), case.y, method=method)
        grads = torch.autograd.grad(value, case.params, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(value, truth.value, rtol=1e-6, atol=0)
        for a, b in zip(grads, truth.grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


def test_hardsigmoid_jvp_runs():
    case = zoo.make_case("hard_se_block")
    value = gr.penalty("frobreg", case.model, case.input(), method="jvp", generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(value, case.params, allow_unused=True, materialize_grads=True)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)


def test_exact_logits_form_names_hardsigmoid():
    """With precomputed logits the forward was the caller's: exact refuses naming the op and the fix."""
    case = zoo.make_case("hard_se_block")
    x = case.input().requires_grad_(True)
    crit = gr.GradRegLoss("frobreg", lam=1.0)
    with pytest.raises(ValueError, match="hardsigmoid.*crit\\(model, x, y\\).*method='fd'"):
        crit(case.model(x), case.y, inputs=x)
    crit(case.model, case.input(), case.y).backward()   # the model form swaps the twin in
