"""Small models shared by the tests (fp64 by default)."""
import torch
from torch import nn


def mlp(d_in=12, k=5, act=nn.ReLU):
    return nn.Sequential(nn.Linear(d_in, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, k))


def tanh_net(d_in=12, k=5):
    return mlp(d_in, k, act=nn.Tanh)


def small_cnn(k=5):
    """conv → ReLU → max-pool → conv → tanh → linear, for 1×10×10 inputs."""
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, k))


MODELS = {
    "mlp": (mlp, (12,)),
    "cnn": (small_cnn, (1, 10, 10)),
    "tanh": (tanh_net, (12,)),
}


def make(name, batch=6, k=5, dtype=torch.float64, seed=0):
    """(model, x, y) with fresh random parameters and inputs."""
    g = torch.Generator().manual_seed(seed)
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory(k=k).to(dtype)
    x = torch.randn((batch,) + shape, generator=g, dtype=dtype)
    y = torch.randint(k, (batch,), generator=g)
    return model, x, y
