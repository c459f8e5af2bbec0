"""The step benchmark's models by name, each with its per-sample input shape.

LeNet is the one of gradreg_fast.testing.zoo, which the tests use (10 classes here): the same layers,
in the same order, as the paper experiment's (benchmarks/paper/mnist_data.py).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from gradreg_fast.testing.zoo import LeNet, TinyViT


def lenet() -> nn.Module:
    """The paper's LeNet on 1×28×28: conv 6@5×5, maxpool, conv 16@5×5, maxpool, conv 120@4×4,
    FC 84, dropout 0.5, FC 10, ReLU."""
    return LeNet(k=10)


def mlp() -> nn.Module:
    """tanh MLP 784-512-512-10 on flat 784-vectors."""
    return nn.Sequential(nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


def resnet(blocks: int = 1, widths: tuple[int, int, int] = (16, 32, 64)) -> nn.Module:
    """A small CIFAR ResNet with BatchNorm: 3 stages × ``blocks`` basic blocks, 3×32×32 input."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        for b in range(blocks):
            layers.append(BasicBlock(c, w, 2 if (b == 0 and i > 0) else 1))
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def dcgan_d() -> nn.Module:
    """A DCGAN discriminator on 3×32×32: strided 4×4 convs 64-128-256 with LeakyReLU(0.2), no
    normalization (WGAN-GP forbids BatchNorm in the critic), a linear score: output (B, 1)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(128, 256, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(256 * 4 * 4, 1))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "dcgan_d": (dcgan_d, (3, 32, 32)),   # a discriminator: GAN kinds (r1, wgan_gp) only, a D step
    "lenet": (lenet, (1, 28, 28)),
    "mlp": (mlp, (784,)),
    "resnet": (resnet, (3, 32, 32)),
    # a small vision transformer: patch conv, LayerNorm, nn.MultiheadAttention, GELU MLP (the zoo's TinyViT)
    "vit": (lambda: TinyViT(k=10, dim=32, heads=4, depth=2, patch=4, image=32), (3, 32, 32)),
}
DISCRIMINATORS = ("dcgan_d",)


def load_model(spec: str) -> nn.Module:
    """A model of MODELS by name, or a user's ``module:callable`` that returns an nn.Module."""
    if spec in MODELS:
        return MODELS[spec][0]()
    if ":" not in spec:
        raise ValueError(f"--model {spec!r}: give one of {sorted(MODELS)} or module:callable")
    module, name = spec.split(":", 1)
    factory = getattr(importlib.import_module(module), name)
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {spec}: {name}() must return an nn.Module, got {type(model).__name__}")
    return model
