"""Twice-differentiable twins of the torch functions whose derivative PyTorch cannot differentiate
again (no double backward, no forward-mode rule for their backward), swapped in while the library runs
a forward it differentiates twice. A leaf module (it imports only torch).

Found by sweeping every activation module of torch.nn through double backward and forward-over-reverse
(tests/test_twins.py repeats the sweep, so a torch that drops another rule fails there):

    F.hardsigmoid   hardsigmoid_backward has neither rule (torch 2.11-2.14): nn.Hardsigmoid, the
                    squeeze-excite gate of MobileNetV3 and EfficientNet-style blocks

Each twin computes the same function in composite ops that have both rules (outputs unchanged up to
rounding): hardsigmoid(z) = relu6(z + 3) / 6, whose derivative is 1/6 on (-3, 3) and 0 outside, as the
kernel's. ``twice_differentiable()`` is a TorchFunctionMode that routes the listed functions to their
twins: nn modules and functional calls in the model's forward both reach it; a direct
``torch.ops.aten`` call does not, and method='exact' then refuses naming the op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    out = F.relu6(input + 3.0) / 6.0
    return input.copy_(out) if inplace else out


TWINS = {F.hardsigmoid: _hardsigmoid}

# autograd node of each op without a double backward -> what to call it in an error message
NO_DOUBLE_BACKWARD = {"HardsigmoidBackward0": "hardsigmoid (nn.Hardsigmoid / F.hardsigmoid)"}


class _TwinMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the mode is off while this runs (torch pops it), so the twins' own calls are not routed again
        twin = TWINS.get(func)
        if twin is not None:
            return twin(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def twice_differentiable() -> TorchFunctionMode:
    """A context in which the functions of ``TWINS`` run as their twice-differentiable twins."""
    return _TwinMode()
