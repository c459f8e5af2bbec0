"""gradreg_fast.fuse: same outputs, shared parameters, compatible state_dicts, same penalties."""
import copy

import pytest
import torch
from torch import nn

import gradreg_fast as gr
from conftest import TOLERANCES
from gradreg_fast.nn import FusedActivation, FusedLinearAct
from gradreg_fast.testing.zoo import LeNet

FP64 = TOLERANCES[torch.float64]


class BasicBlock(nn.Module):
    """ResNet basic block with BatchNorm and an identity shortcut, then a classifier head."""

    def __init__(self, c=4, k=5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 6 * 6, 8), nn.GELU(), nn.Linear(8, k))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.head(self.relu2(out + x))


def mlp_all_acts():
    acts = [nn.ReLU(), nn.LeakyReLU(0.1), nn.Tanh(), nn.Sigmoid(), nn.Softplus(), nn.GELU(),
            nn.GELU(approximate="tanh"), nn.SiLU(), nn.ELU(0.5)]
    layers = []
    for a in acts:
        layers += [nn.Linear(6, 6), a]
    return nn.Sequential(*layers, nn.Linear(6, 3))


# the paper's LeNet is the zoo's (10 classes)
MODELS = {"lenet": (lambda: LeNet(k=10), (1, 28, 28), 10), "resblock": (BasicBlock, (4, 6, 6), 5),
          "mlp": (mlp_all_acts, (6,), 3)}


def _make(name, batch=3):
    torch.manual_seed(0)
    factory, shape, k = MODELS[name]
    model = factory().double()
    x = torch.randn((batch,) + shape, dtype=torch.float64)
    y = torch.randint(k, (batch,))
    return model, x, y


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_parameters_shared(name):
    model, x, _ = _make(name)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    fused = gr.fuse(model, activations="all")
    assert fused is not model
    # the original is untouched: same module types, same values
    assert not any(isinstance(m, (FusedActivation, FusedLinearAct)) for m in model.modules())
    assert any(isinstance(m, (FusedActivation, FusedLinearAct)) for m in fused.modules())
    assert not any(type(m) in (nn.ReLU, nn.GELU, nn.Tanh) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), **FP64)
    # same Parameter objects, same state_dict keys
    assert [id(p) for p in fused.parameters()] == [id(p) for p in model.parameters()]
    assert list(fused.state_dict()) == list(before)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)


def test_linear_act_pairs_fused():
    model, x, _ = _make("mlp")
    fused = gr.fuse(model, activations="all")
    kinds = [type(m).__name__ for m in fused]
    assert kinds.count("FusedLinearAct") == 9 and kinds.count("Identity") == 9
    assert [m.act for m in fused if isinstance(m, FusedLinearAct)] == [
        "relu", "leaky_relu", "tanh", "sigmoid", "softplus", "gelu", "gelu_tanh", "silu", "elu"]
    assert fused[2].alpha == pytest.approx(0.1) and fused[16].alpha == pytest.approx(0.5)


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_loads_both_ways(name):
    model, x, _ = _make(name)
    model.eval()
    fused = gr.fuse(model, activations="all")
    other, _, _ = _make(name)
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.normal_()
    fused.load_state_dict(other.state_dict())  # unfused -> fused
    other.eval()
    torch.testing.assert_close(fused(x), other(x), **FP64)
    fresh, _, _ = _make(name)
    fresh.load_state_dict(fused.state_dict())  # fused -> unfused
    fresh.eval()
    torch.testing.assert_close(fresh(x), fused(x), **FP64)


def test_inplace():
    model, x, _ = _make("lenet")
    model.eval()
    want = model(x)
    assert gr.fuse(model, activations="all", inplace=True) is model
    assert isinstance(model.features[1], FusedActivation) and isinstance(model.head[0], FusedLinearAct)
    torch.testing.assert_close(model(x), want, **FP64)


@pytest.mark.parametrize("name", ["lenet", "resblock", "mlp"])
def test_doubleback_penalty_same(name):
    """DoubleBack value and its parameter gradients agree with the unfused model (fp64)."""
    model, x, y = _make(name)
    if name == "lenet":
        model.eval()  # dropout off; the block keeps BatchNorm in training mode
    fused = gr.fuse(model, activations="all")

    def value_and_grads(m):
        pen = gr.penalty("doubleback", m, x, y)
        return pen, torch.autograd.grad(pen, list(model.parameters()))
    p0, g0 = value_and_grads(model)
    p1, g1 = value_and_grads(fused)
    torch.testing.assert_close(p1, p0, **FP64)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, **FP64)


def test_default_replaces_only_the_fast_activations():
    """Default activations="fast": relu/leaky_relu modules stay (their fused double backward is
    slower than ATen's on the CPU); tanh/silu are replaced; a chosen set replaces exactly it."""
    from gradreg_fast.nn.fuse import FAST_ACTIVATIONS
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.LeakyReLU(),
                          nn.Linear(4, 2), nn.SiLU()).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    fused = gr.fuse(model)
    assert [type(m).__name__ for m in fused] == ["Linear", "ReLU", "FusedLinearAct", "Identity", "Linear",
                                                "LeakyReLU", "FusedLinearAct", "Identity"]
    assert {fused[2].act, fused[6].act} <= set(FAST_ACTIVATIONS)
    torch.testing.assert_close(fused(x), model(x), **FP64)
    only_relu = gr.fuse(model, activations={"relu"})
    assert isinstance(only_relu[0], FusedLinearAct) and type(only_relu[3]) is nn.Tanh
    torch.testing.assert_close(only_relu(x), model(x), **FP64)
    with pytest.raises(ValueError, match="unknown activations"):
        gr.fuse(model, activations={"swish"})
    with pytest.raises(ValueError, match="'fast', 'all'"):
        gr.fuse(model, activations="most")


def test_unfusable_left_alone():
    model = nn.Sequential(nn.Linear(3, 3), nn.Softplus(beta=2.0), nn.Linear(3, 3, bias=False), nn.ReLU())
    fused = gr.fuse(model, activations="all")
    assert type(fused[1]) is nn.Softplus and type(fused[2]) is nn.Linear
    assert isinstance(fused[3], FusedActivation)
    with pytest.raises(TypeError, match="nn.Module"):
        gr.fuse(lambda x: x)
