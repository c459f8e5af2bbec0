"""Drop-in modules for the fused bias + activation op (gradreg_fast.ops.bias_act).

They only call the op; its fused kernels carry first and second derivatives, so gradient
penalties on a model built from these modules differentiate through fused code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradreg_fast._bias_act_spec import takes_alpha
from gradreg_fast.ops.bias_act import bias_act, check_activation


class FusedActivation(nn.Module):
    """``act(x)`` through the fused op (no bias). See gradreg_fast.ops.bias_act for the names."""

    def __init__(self, act: str = "relu", alpha: float | None = None, *, backend: str | None = None):
        super().__init__()
        self.alpha = check_activation(act, alpha)
        self.act = act
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(x, None, self.act, alpha=self.alpha if takes_alpha(self.act) else None,
                        backend=self.backend)

    def extra_repr(self) -> str:
        alpha = f", alpha={self.alpha}" if takes_alpha(self.act) else ""
        return f"act={self.act!r}{alpha}"


class FusedLinearAct(nn.Module):
    """``act(x Wᵀ + b)`` of an existing nn.Linear: the matmul without bias, then one fused
    bias + activation call. The Linear's ``weight`` and ``bias`` Parameters are reused (shared,
    not copied), under the same names, so state_dict keys stay those of the Linear."""

    def __init__(self, linear: nn.Linear, act: str = "relu", alpha: float | None = None, *,
                 backend: str | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FusedLinearAct: expected an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.alpha = check_activation(act, alpha)
        self.act = act
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.weight)
        bias = self.bias
        if bias is not None and bias.dtype != z.dtype:
            # under autocast the matmul runs in the low-precision dtype and the bias stays fp32: add it
            # in z's dtype, as nn.Linear's addmm does (a differentiable cast: the bias still trains)
            bias = bias.to(z.dtype)
        return bias_act(z, bias, self.act, dim=-1,
                        alpha=self.alpha if takes_alpha(self.act) else None, backend=self.backend)

    def extra_repr(self) -> str:
        alpha = f", alpha={self.alpha}" if takes_alpha(self.act) else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, act={self.act!r}{alpha}")
