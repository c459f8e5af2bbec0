"""GradRegLoss with an estimator that takes its gradients at the call (hvp, fd, jvp) also takes the
base loss's there (core.Fold): the clean graph is freed before the estimator's own passes; exact takes
both at the call, for the parameters only (fold.taken_at_call). The
gradients must be those of the unfolded loss, base + λ·P, on every kind of model the fold can see
(batch statistics, dropout, attention, an attached input), every reduction and a schedule."""
import pytest
import torch

import gradreg_fast as gr
import gradreg_fast.penalties.call as call_module  # the one call path builds the Fold
from gradreg_fast.testing.zoo import make_case

CASES = [
    # (zoo model, kind, method, options)
    ("lenet", "doubleback", "hvp", {}),
    ("lenet", "spectreg", "fd", {}),
    ("lenet", "frobreg", "fd", {"fd_scheme": "forward"}),
    ("resnet_bn_train", "doubleback", "fd", {"fd_scheme": "forward"}),
    ("resnet_bn_train", "spectreg", "hvp", {}),
    ("vit_train", "frobreg", "jvp", {}),
    ("vit_train", "doubleback", "fd", {}),
    ("text_embedding", "jacreg", "hvp", {}),
    ("text_embedding", "doubleback", "fd", {"fd_scheme": "forward"}),
    ("smooth_mlp", "frobreg", "jvp", {}),
    ("smooth_mlp", "jacreg", "fd", {"fd_scheme": "forward"}),
    ("lenet", "doubleback", "exact", {}),
    ("resnet_bn_train", "frobreg", "exact", {}),
    ("vit_train", "spectreg", "exact", {}),
    ("text_embedding", "doubleback", "exact", {}),
    ("smooth_mlp", "jacreg", "exact", {}),
]


def _gradients(case, kind, method, options, reduction, every, fold_on, monkeypatch):
    if not fold_on:
        monkeypatch.setattr(call_module, "Fold", lambda *args, **kwargs: None)
    crit = gr.GradRegLoss(kind, 0.3, method=method, reduction=reduction, every=every, seed=7, **options)
    for prm in case.params:
        prm.grad = None
    torch.manual_seed(11)   # dropout masks: the same in both runs
    x = case.input()
    loss = crit(case.model, x, case.y)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * weights).sum().backward()
    monkeypatch.undo()
    return loss.detach(), [None if prm.grad is None else prm.grad.clone() for prm in case.params], crit


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("name,kind,method,options", CASES)
def test_fold_keeps_the_gradients(name, kind, method, options, reduction, every, monkeypatch):
    case = make_case(name)                     # fp64, random parameters and inputs
    if case.coupled and reduction == "none" and method == "fd":
        for fold_on in (True, False):   # refused with and without the fold, at the call
            with pytest.raises(ValueError, match="perturbs the batch as a whole"):
                _gradients(case, kind, method, options, reduction, every, fold_on, monkeypatch)
        return
    folded = _gradients(case, kind, method, options, reduction, every, True, monkeypatch)
    plain = _gradients(case, kind, method, options, reduction, every, False, monkeypatch)
    torch.testing.assert_close(folded[0], plain[0], rtol=1e-10, atol=1e-12)
    assert sum(g is not None for g in folded[1]) == len(case.params)
    for a, b in zip(folded[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(folded[2].last_base, plain[2].last_base)


def test_fold_is_taken_where_it_applies(monkeypatch):
    """The fold is not a no-op: with mean reduction the base loss leaves the caller's graph."""
    seen = []
    original = call_module.Fold

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(call_module, "Fold", spy)
    case = make_case("smooth_mlp")
    for method, taken in [("hvp", True), ("fd", True), ("jvp", True), ("exact", True)]:
        seen.clear()
        gr.GradRegLoss("frobreg", 0.3, method=method)(case.model, case.input(), case.y)
        assert (seen[0].taken if seen else None) is taken, method
    seen.clear()
    gr.GradRegLoss("frobreg", 0.3, method="hvp", reduction="none")(case.model, case.input(), case.y)
    assert seen and not seen[0].taken   # per-sample penalties: the caller's weights come in its backward


def _double_backprop(model, x, y, lam, base):
    """Ground truth without the library: base + lam * mean_b ||d l_b / d x_b||^2 by create_graph."""
    xr = x.detach().clone().requires_grad_(True)
    out = model(xr)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"), xr, create_graph=True)
    return base(out, y) + lam * g.pow(2).flatten(1).sum(1).mean()


@pytest.mark.parametrize("as_parameter", [True, False])
def test_exact_at_call_reaches_a_learnable_base_loss(as_parameter):
    """A tensor outside the model that requires grad (a learnable temperature in the base loss) keeps its
    gradient: an nn.Parameter is differentiated at the call with the model's parameters, a plain tensor
    leaves the penalty in the caller's graph instead."""
    case = make_case("smooth_mlp")
    temp = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    if as_parameter:
        temp = torch.nn.Parameter(temp.detach())

    def base(out, y):
        return torch.nn.functional.cross_entropy(out * temp, y)

    x = case.input()
    truth = torch.autograd.grad(_double_backprop(case.model, x, case.y, 0.3, base), case.params + [temp])
    crit = gr.GradRegLoss("doubleback", 0.3, base=base)
    loss = crit(case.model, x, case.y)
    assert (type(loss.grad_fn).__name__ == "AddBackward0"
            and (loss.grad_fn.next_functions[1][0].name() == "_DeferredBackward") is as_parameter)
    got = torch.autograd.grad(loss, case.params + [temp])
    for a, b in zip(got, truth, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["lenet", "resnet_bn_train", "smooth_mlp"])
def test_exact_at_call_matches_hand_written_double_backprop(name):
    """GradRegLoss exact (gradients at the call) against double backprop written by hand, fp64 (an
    attached x, the embedding lookup, is checked against the unfolded loss in test_fold_keeps_the_gradients)."""
    case = make_case(name)
    x = case.input()
    torch.manual_seed(3)
    truth = torch.autograd.grad(_double_backprop(case.model, x, case.y, 0.3,
                                                 torch.nn.functional.cross_entropy), case.params)
    for m in case.model.modules():   # BatchNorm: the same running statistics before both forwards
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    torch.manual_seed(3)
    loss = gr.GradRegLoss("doubleback", 0.3)(case.model, x, case.y)
    loss.backward()
    for prm, b in zip(case.params, truth, strict=True):
        torch.testing.assert_close(prm.grad, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "hvp"])
def test_gradients_taken_at_the_call_refuse_a_second_derivative(method):
    """backward(create_graph=True) through gradients taken at the call would give a silent 0 second
    derivative: it raises and names the functional form."""
    case = make_case("smooth_mlp")
    loss = gr.GradRegLoss("spectreg", 0.3, method=method, seed=1)(case.model, case.input(), case.y)
    with pytest.raises(RuntimeError, match="gr.penalty"):
        loss.backward(create_graph=True)


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_a_second_backward_through_gradients_taken_at_the_call_raises(method):
    """The first backward hands the gradients over without a copy; a second one (retain_graph=True)
    would add stale or modified tensors, so it raises naming the functional form."""
    case = make_case("smooth_mlp")
    loss = gr.GradRegLoss("doubleback", 0.3, method=method)(case.model, case.input(), case.y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
def test_a_parameter_hook_runs_once(method):
    """A Tensor.register_hook on a parameter sees the step's gradient once, as in a hand-written step: a
    gradient taken at the call with torch.autograd.grad has been through it, so those stay in the
    caller's graph (a scaling hook would otherwise scale twice)."""
    def run(library: bool):
        case = make_case("smooth_mlp")
        first = case.params[0]
        first.register_hook(lambda g: 3.0 * g)
        x = case.input()
        if library:
            gr.GradRegLoss("doubleback", 0.3, method=method)(case.model, x, case.y).backward()
        else:
            _double_backprop(case.model, x, case.y, 0.3, torch.nn.functional.cross_entropy).backward()
        return [p.grad for p in case.params]
    tol = dict(rtol=1e-3, atol=1e-6) if method == "fd" else dict(rtol=1e-8, atol=1e-11)
    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, **tol)
