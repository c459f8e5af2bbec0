"""Reference fused bias + activation: plain PyTorch, twice differentiable.

    y = act(x + b)   with b of shape (x.shape[dim],) broadcast along ``dim`` (or no bias)

Activations (alpha: slope of leaky_relu, default 0.01; alpha of elu, default 1.0):

    linear      z                         relu     max(z, 0)
    leaky_relu  z if z > 0 else alpha·z   tanh     tanh(z)
    sigmoid     1 / (1 + e^{-z})          softplus log(1 + e^z)  (z above 20: z, as torch.nn.Softplus)
    gelu        z·Φ(z) (erf form)         gelu_tanh  ½z(1 + tanh(√(2/π)(z + 0.044715 z³)))
    silu        z·sigmoid(z)              elu      z if z > 0 else alpha·(e^z − 1)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("linear", "relu", "leaky_relu", "tanh", "sigmoid", "softplus", "gelu", "gelu_tanh",
               "silu", "elu")
DEFAULT_ALPHA = {"leaky_relu": 0.01, "elu": 1.0}


def _apply(z: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    if act == "linear":
        return z
    if act == "relu":
        return torch.relu(z)
    if act == "leaky_relu":
        return F.leaky_relu(z, alpha)
    if act == "tanh":
        return torch.tanh(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "softplus":
        return F.softplus(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "silu":
        return F.silu(z)
    return F.elu(z, alpha)


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, act: str = "relu", dim: int = 1,
             alpha: float | None = None) -> torch.Tensor:
    """``act(x + b)`` with the bias broadcast along ``dim``; see the module docstring."""
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    if alpha is None:
        alpha = DEFAULT_ALPHA.get(act, 0.0)
    z = x
    if b is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        z = x + b.reshape(shape)
    return _apply(z, act, float(alpha))
