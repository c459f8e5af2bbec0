"""method='fd' on a model with kinks (ReLU, LeakyReLU, max-pooling, gr.fuse's fused ReLU) says so: its
gradient there is that of a finite-difference penalty, not double backprop's, and training with it
measurably differs (README, "What fd computes"). The zoo's `smooth` flags (written with the models,
independent of the detector) are the ground truth of which models have kinks."""
import warnings

import pytest
import torch
import torch.nn as nn

import gradreg_fast as gr
from gradreg_fast.testing.zoo import DISCRIMINATORS, ZOO, make_case


def _kink_warnings(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, gr.FDKinkWarning)]


def _fd_call(case, method="fd"):
    if case.y is None:   # a discriminator: R1 on its real batch
        return lambda: gr.penalty("r1", case.model, case.input(), method=method)
    return lambda: gr.GradRegLoss("doubleback", 0.1, method=method)(case.model, case.input(), case.y)


@pytest.mark.parametrize("name", ZOO + DISCRIMINATORS)
def test_fd_warns_exactly_on_the_models_with_kinks(name):
    case = make_case(name)
    found = _kink_warnings(_fd_call(case))
    assert bool(found) == (not case.smooth), (name, [str(w.message) for w in found])
    if found:
        text = str(found[0].message)
        assert "method='exact'" in text and "method='hvp'" in text and "FDKinkWarning" in text


def test_fd_warns_once_per_model():
    case = make_case("lenet")
    assert len(_kink_warnings(_fd_call(case))) == 1
    assert _kink_warnings(_fd_call(case)) == []
    assert len(_kink_warnings(_fd_call(make_case("lenet")))) == 1   # another model object


@pytest.mark.parametrize("method", ["exact", "hvp"])
def test_other_methods_do_not_warn(method):
    assert _kink_warnings(_fd_call(make_case("lenet"), method)) == []


@pytest.mark.parametrize("act,kinked", [(nn.ReLU, True), (lambda: nn.LeakyReLU(0.2), True), (nn.Tanh, False),
                                        (nn.SiLU, False)])
def test_fused_activations_are_seen(act, kinked):
    torch.manual_seed(0)
    model = gr.fuse(nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 3)), activations="all")
    x, y = torch.randn(4, 6), torch.randint(3, (4,))
    found = _kink_warnings(lambda: gr.GradRegLoss("doubleback", 0.1, method="fd")(model, x, y))
    assert bool(found) == kinked
    if kinked:
        assert "fused" in str(found[0].message)


def test_functional_kinks_are_seen():
    """A kink in a functional call (no nn module to inspect): max-pooling and clamp."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.tanh(nn.functional.max_pool2d(self.conv(x), 2)).flatten(1))

    torch.manual_seed(0)
    found = _kink_warnings(lambda: gr.GradRegLoss("spectreg", 0.1, method="fd")(
        Net(), torch.randn(3, 1, 6, 6), torch.randint(3, (3,))))
    assert found and "MaxPool2D" in str(found[0].message)


def test_compiled_models_kinks_are_seen():
    """A torch.compile'd model's graph is one node (CompiledFunctionBackward): its kink modules are found
    by looking at the model."""
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    x, y = torch.randn(4, 6), torch.randint(3, (4,))

    def call():
        try:
            gr.GradRegLoss("doubleback", 0.1, method="fd")(model, x, y)
        except ValueError as exc:   # a region compiled with donated buffers (test_compile): refused after the warning
            assert "donated buffers" in str(exc)
    found = _kink_warnings(call)
    assert found and "ReLU" in str(found[0].message)
