"""Twice-differentiable twins of the torch functions whose derivative PyTorch cannot differentiate
again (no double backward, no forward-mode rule for their backward), swapped in while the library runs
a forward it differentiates twice. A leaf module (it imports only torch).

Found by sweeping every activation module of torch.nn through double backward and forward-over-reverse
(tests/nn/test_twins.py repeats the sweep, so a torch that drops another rule fails there):

    F.hardsigmoid   hardsigmoid_backward has neither rule (torch 2.11-2.14): nn.Hardsigmoid, the
                    squeeze-excite gate of MobileNetV3 and EfficientNet-style blocks

Each twin computes the same function in composite ops that have both rules (outputs unchanged up to
rounding): hardsigmoid(z) = relu6(z + 3) / 6, whose derivative is 1/6 on (-3, 3) and 0 outside, as the
kernel's. ``twice_differentiable()`` is a TorchFunctionMode that routes the listed functions to their
twins: nn modules and functional calls in the model's forward both reach it; a direct
``torch.ops.aten`` call does not, and method='exact' then refuses naming the op.

The mode adds Python work to every torch call of the forward, so it is entered only for a model known
to need it (``needed``/``remember``: found by the library from the model's modules or from the op's
autograd node in the graph of a forward it ran without the mode; see core.run_forward).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def _hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    out = F.relu6(input + 3.0) / 6.0
    return input.copy_(out) if inplace else out


TWINS = {F.hardsigmoid: _hardsigmoid}

# autograd node of each op without a double backward -> what to call it in an error message
NO_DOUBLE_BACKWARD = {"HardsigmoidBackward0": "hardsigmoid (nn.Hardsigmoid / F.hardsigmoid)"}
# the modules that call them (a model holding one needs the twins before its first forward)
MODULES = (nn.Hardsigmoid,)

FORCE = False   # benchmarks/twin_mode_cost.py: the mode on for every model, to measure what it costs
# model -> whether it needs the twins (True: known to; False: holds none of MODULES, not seen to)
_NEEDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def needed(model) -> bool:
    """Whether ``model``'s second-order forwards must run with the twins: known from an earlier call,
    or the model holds one of ``MODULES`` (then remembered). A model's modules are searched once (a
    model found without them is remembered so too): one that gains such a module later, or calls the
    functional form, is found from the op's node in its graph (core.run_forward)."""
    if FORCE:
        return True
    try:
        known = _NEEDED.get(model)
    except TypeError:   # not weakly referenceable: decided on every call
        known = None
    if known is not None:
        return known
    found = isinstance(model, nn.Module) and any(isinstance(m, MODULES) for m in model.modules())
    try:
        _NEEDED[model] = found
    except TypeError:
        pass
    return found


def remember(model) -> None:
    """Record that ``model`` needs the twins (an op of ``NO_DOUBLE_BACKWARD`` was seen in its graph)."""
    try:
        _NEEDED[model] = True
    except TypeError:
        pass


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
