"""Reference fused bias + activation: plain PyTorch, twice differentiable.

    y = act(x + b)   with b of shape (x.shape[dim],) broadcast along ``dim`` (or no bias)

The activations, their formulas (torch.nn.functional) and default alphas (leaky_relu's slope 0.01,
elu's alpha 1.0) are the rows of gradreg_fast/_bias_act_spec.py.
"""
from __future__ import annotations

import torch

from gradreg_fast._bias_act_spec import ACTIVATIONS, DEFAULT_ALPHA, SPEC


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, act: str = "relu", dim: int = 1,
             alpha: float | None = None) -> torch.Tensor:
    """``act(x + b)`` with the bias broadcast along ``dim``; see the module docstring."""
    if act not in SPEC:
        raise ValueError(f"bias_act: unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    if alpha is None:
        alpha = DEFAULT_ALPHA.get(act, 0.0)
    z = x
    if b is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        z = x + b.reshape(shape)
    return SPEC[act].formula(z, float(alpha))
