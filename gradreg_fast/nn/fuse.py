"""``fuse(model)``: the model with its activation modules replaced by the fused bias + activation op.

What can be replaced (exact types only; subclasses may override forward and are left alone) — by
default only the activations in FAST_ACTIVATIONS, ``activations="all"`` for every one — is listed
in the activation table (gradreg_fast/_bias_act_spec.py, its ``module`` columns):

    nn.ReLU → relu, nn.LeakyReLU → leaky_relu (alpha = negative_slope), nn.Tanh, nn.Sigmoid,
    nn.Softplus (only beta=1, threshold=20), nn.GELU (approximate "none" → gelu, "tanh" →
    gelu_tanh), nn.SiLU, nn.ELU (alpha)              → FusedActivation

and, inside an nn.Sequential, an nn.Linear with a bias directly followed by one of those
activations → FusedLinearAct (matmul without bias, then one fused bias + activation kernel) in the
Linear's slot and nn.Identity in the activation's slot (indices and state_dict keys unchanged).
Activations called functionally in a forward (F.relu, torch.tanh) cannot be seen and stay as they are.
A module with hooks of its own (``register_forward_hook``, ``register_forward_pre_hook``,
``register_full_backward_hook``, ...) is left unfused, and so is the Linear of a pair, so that
every hook still fires where it did and outputs stay unchanged.

Copy semantics: by default the given model is NOT modified. The result is a new module tree
(containers are shallow-copied) that shares every Parameter and buffer with the original: training
one trains the other, and BatchNorm running statistics are the same tensors. With ``inplace=True``
the model itself is rewired and returned.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

from gradreg_fast._backend import check_backend
from gradreg_fast._bias_act_spec import ACTIVATIONS, FAST_ACTIVATIONS, activation_of, takes_alpha
from gradreg_fast.nn.activations import FusedActivation, FusedLinearAct

# FAST_ACTIVATIONS (the table's ``fast`` column): the activations whose fused double backward
# measured faster than autograd's composite (CPU, one thread, 1M fp32 elements:
# benchmarks/results/ops_cpu.txt). relu, leaky_relu and linear stay out: their double backward is one
# pass either way (the fused relu's gain in that table comes from skipping autograd's zero-filled
# cotangent), and in a whole training step fusing them bought nothing measurable
# (benchmarks/results/bench_step_cpu_fused.txt). fuse(..., activations="all") replaces them too.


def activation_spec(module: nn.Module) -> tuple[str, float | None] | None:
    """(act, alpha) of a fusable activation module, or None."""
    return activation_of(module)


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with its own containers (children, parameter and buffer dicts, hooks)
    holding the same Parameters, buffers and child modules."""
    new = copy.copy(module)
    for key, value in list(vars(new).items()):
        if isinstance(value, (dict, set, list)):
            new.__dict__[key] = copy.copy(value)
    return new


def _check_activations(activations: str | Iterable[str]) -> frozenset[str]:
    if isinstance(activations, str):
        if activations == "fast":
            return frozenset(FAST_ACTIVATIONS)
        if activations == "all":
            return frozenset(ACTIVATIONS)
        raise ValueError(f"fuse: activations must be 'fast', 'all' or a collection of names from "
                         f"{ACTIVATIONS}, got {activations!r}")
    try:
        chosen = frozenset(activations)
    except TypeError:
        raise TypeError(f"fuse: activations must be 'fast', 'all' or a collection of names from {ACTIVATIONS}, "
                        f"got {activations!r}") from None
    if not all(isinstance(a, str) for a in chosen):
        raise TypeError(f"fuse: activations must name activations as strings from {ACTIVATIONS}, got {activations!r}")
    unknown = sorted(chosen - set(ACTIVATIONS))
    if unknown:
        raise ValueError(f"fuse: unknown activations {unknown}; choose from {ACTIVATIONS}")
    return chosen


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether the module has forward or backward hooks of its own: replacing it would drop them
    (a feature-capture hook would stop firing, a hook that edits the output would stop editing it)."""
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def _fuse(module: nn.Module, backend: str | None, inplace: bool, chosen: frozenset[str]) -> nn.Module:
    spec = activation_spec(module)
    if spec is not None:
        if spec[0] not in chosen or _hooked(module):
            return module
        return FusedActivation(spec[0], spec[1], backend=backend)
    if isinstance(module, (FusedActivation, FusedLinearAct)):
        return module
    out = module if inplace else _shallow_copy(module)
    names = list(out._modules)
    for name in names:
        child = out._modules[name]
        if child is not None:
            out._modules[name] = _fuse(child, backend, inplace, chosen)
    if isinstance(out, nn.Sequential):
        for first, second in zip(names, names[1:], strict=False):
            lin = out._modules[first]
            act = out._modules[second]
            if (type(lin) is nn.Linear and lin.bias is not None and isinstance(act, FusedActivation)
                    and not _hooked(lin)):
                out._modules[first] = FusedLinearAct(lin, act.act, act.alpha if takes_alpha(act.act) else None,
                                                     backend=backend)
                out._modules[second] = nn.Identity()
    return out


def fuse(model: nn.Module, *, activations: str | Iterable[str] = "fast", backend: str | None = None,
         inplace: bool = False) -> nn.Module:
    """``model`` with its activations (and Linear → activation pairs in nn.Sequential) running
    through the fused bias + activation op y = act(x + b); see the module docstring for what is
    replaced.

    Args:
        model: any nn.Module.
        activations: which activations to replace: "fast" (default: FAST_ACTIVATIONS, those whose
            fused double backward measured faster than autograd's), "all", or a collection of names
            from gradreg_fast.ops.ACTIVATIONS (e.g. ``{"relu", "tanh"}``).
        backend: backend of the fused op ("reference", "cpp", "cuda", "triton", "auto"; None: the
            GRADREG_BACKEND variable or auto, decided at each call from the input's device).
        inplace: False (default): return a new module tree sharing all Parameters and buffers with
            ``model``, which is left unchanged. True: rewire ``model`` itself and return it.

    Outputs are unchanged (up to rounding), parameters are shared, and state_dict keys are those of
    ``model``, so state dicts load either way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be an nn.Module, got {type(model).__name__}")
    # checked here, as GRADREG_BACKEND is: an unknown or unrunnable backend raises now, not at the
    # first forward (the device checks, e.g. 'cpp' on CUDA tensors, still come at the call)
    check_backend(backend, "fuse: backend")
    if not isinstance(inplace, bool):
        raise TypeError(f"fuse: inplace must be True or False, got {inplace!r}")
    return _fuse(model, backend, inplace, _check_activations(activations))
