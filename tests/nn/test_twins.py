"""Activations whose backward torch cannot differentiate again (issue 23: nn.Hardsigmoid, the
squeeze-excite gate of MobileNetV3, made exact refuse and hvp/jvp raise a raw NotImplementedError).
The library runs the forwards it differentiates twice with twice-differentiable twins swapped in
(gradreg_fast._twins); the zoo's hard_se_block runs the whole conformance matrix."""
import inspect

import pytest
import torch
from torch import nn

import gradreg_fast as gr
from gradreg_fast import _twins
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
        for a, b in zip(grads, truth.grads, strict=True):
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


class _FunctionalGate(nn.Module):
    """A user's squeeze-excite gate calling F.hardsigmoid (no nn.Hardsigmoid module to find), with
    dropout and BatchNorm in training mode (the side effects a re-run must not double)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.bn(self.lin(x))
        return self.head(self.drop(h * torch.nn.functional.hardsigmoid(h)))


class _ComposedGate(_FunctionalGate):
    def forward(self, x):   # the same function in plain ops: the ground truth's twin
        h = self.bn(self.lin(x))
        return self.head(self.drop(h * (torch.nn.functional.relu6(h + 3) / 6)))


def _counting_mode(monkeypatch):
    entered = []
    make = _twins.twice_differentiable

    def counting():
        entered.append(1)
        return make()
    monkeypatch.setattr(_twins, "twice_differentiable", counting)
    return entered


def test_twin_mode_entered_only_for_models_that_need_it(monkeypatch):
    """The twins' mode adds Python work to every torch call of a forward, so exact runs a model without
    hardsigmoid without it; a functional F.hardsigmoid is found in the forward's graph, that forward is
    run again with the twins as the first ran (same dropout mask, BatchNorm statistics updated once), and
    the model is remembered. Gradients equal plain double backprop of the composite twin (fp64)."""
    entered = _counting_mode(monkeypatch)
    plain = zoo.make_case("lenet")
    gr.penalty("frobreg", plain.model, plain.input(), plain.y).backward()
    assert not entered

    torch.manual_seed(0)
    model = _FunctionalGate().double().train()
    truth_model = _ComposedGate().double().train()
    truth_model.load_state_dict(model.state_dict())
    x = torch.randn(6, 5, dtype=torch.float64)
    for call in range(2):
        torch.manual_seed(10 + call)
        value = gr.penalty("frobreg", model, x, method="exact")
        grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True, materialize_grads=True)
        torch.manual_seed(10 + call)
        xt = x.clone().requires_grad_(True)
        out = truth_model(xt)
        g = torch.stack([torch.autograd.grad(out[:, k].sum(), xt, create_graph=True)[0] for k in range(3)])
        truth = g.pow(2).sum((0, 2)).mean()
        tgrads = torch.autograd.grad(truth, list(truth_model.parameters()), allow_unused=True,
                                     materialize_grads=True)
        torch.testing.assert_close(value, truth, rtol=1e-6, atol=0)
        for a, b in zip(grads, tgrads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(model.bn.running_mean, truth_model.bn.running_mean, rtol=1e-12, atol=0)
        assert model.bn.num_batches_tracked.item() == call + 1
        assert _twins.needed(model)
    assert len(entered) == 2   # the first call: found after its first forward; the second: directly


def test_twin_mode_for_hvp_found_from_the_callers_graph(monkeypatch):
    entered = _counting_mode(monkeypatch)
    torch.manual_seed(0)
    model = _FunctionalGate().double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    params = list(model.parameters())
    exact = torch.autograd.grad(gr.penalty("frobreg", model, x), params, allow_unused=True, materialize_grads=True)
    hvp = torch.autograd.grad(gr.penalty("frobreg", model, x, method="hvp"), params, allow_unused=True,
                              materialize_grads=True)
    for a, b in zip(hvp, exact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert entered
    entered.clear()
    plain = zoo.make_case("smooth_mlp")
    gr.penalty("frobreg", plain.model, plain.input(), plain.y, method="hvp").backward()
    assert not entered


class _DropoutAttention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (on the CPU torch picks its fused flash kernel,
    which has no double backward), with dropout on the projections."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head, self.drop = nn.Linear(4, 12), nn.Linear(4, 3), nn.Dropout(0.3)
        self.forwards, self.gate, self.composite = 0, False, False

    def forward(self, x):
        self.forwards += 1
        # (batch, heads, tokens, dim): 4-D inputs reach the fused kernel
        q, k, v = self.drop(self.qkv(x.reshape(x.shape[0], 1, 2, 4))).chunk(3, dim=-1)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        if self.gate:   # a path taken only on some calls: a functional hardsigmoid gate (or its formula)
            a = a * (nn.functional.relu6(a + 3) / 6 if self.composite else nn.functional.hardsigmoid(a))
        return self.head(a.mean((1, 2)))


def test_fused_attention_found_from_the_graph_and_run_on_the_math_kernel():
    """exact runs a model on its own kernels until its forward's graph shows a fused attention kernel
    (core.FUSED_ATTENTION_NODES): then that forward is run again on the math kernel, from the same random
    state (same dropout masks), and the model is remembered (its next forwards run there directly). The
    gradients equal double backprop written by hand under torch's own math-kernel context, on both calls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gradreg_fast.penalties import core
    torch.manual_seed(0)
    model = _DropoutAttention().train()
    truth_model = _DropoutAttention().train()
    truth_model.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 8), torch.randint(3, (6,))
    probe = truth_model(x.clone().requires_grad_(True))
    assert any(n in core.FUSED_ATTENTION_NODES for n in (m.name() for m in core.graph_nodes(probe)))
    crit = gr.GradRegLoss("doubleback", 0.7)
    for call in range(2):
        model.forwards = 0
        torch.manual_seed(20 + call)
        loss = crit(model, x, y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        torch.manual_seed(20 + call)
        xt = x.clone().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):
            out = truth_model(xt)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(out, y, reduction="sum"), xt, create_graph=True)
        truth = nn.functional.cross_entropy(out, y) + 0.7 * g.pow(2).sum(1).mean()
        tgrads = torch.autograd.grad(truth, list(truth_model.parameters()))
        torch.testing.assert_close(loss, truth, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, tgrads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert model.forwards == (2 if call == 0 else 1)
        assert core._known(core._MATH_ATTENTION, model)


def test_twins_still_found_on_a_model_remembered_for_attention():
    """A model remembered for its fused attention kernel runs on the math kernel from then on, and its
    graph is still searched for the twins' ops: a functional hardsigmoid that appears on a later call is
    found, that forward re-run with the twins, and the gradients equal double backprop of the composite
    twin on the math kernel (fp64)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = _DropoutAttention().double().eval()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(3, (6,))
    crit = gr.GradRegLoss("doubleback", 0.7)
    crit(model, x, y)   # the first call finds the fused attention kernel
    model.gate, model.forwards = True, 0
    grads = torch.autograd.grad(crit(model, x, y), list(model.parameters()))
    assert model.forwards == 2 and _twins.needed(model)
    xt = x.clone().requires_grad_(True)
    model.composite = True
    with sdpa_kernel(SDPBackend.MATH):
        out = model(xt)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(out, y, reduction="sum"), xt, create_graph=True)
    truth = nn.functional.cross_entropy(out, y) + 0.7 * g.pow(2).sum(1).mean()
    for a, b in zip(grads, torch.autograd.grad(truth, list(model.parameters())), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
