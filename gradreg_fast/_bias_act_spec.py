"""The facts of the fused bias + activation op that every layer shares: the activation table and the
memory layout the kernels walk. A leaf module (it imports only torch): the reference, the op
wrappers, the Triton launcher and gradreg_fast.nn all read it, and none of them import each other
for it.

One row per activation; its position in ``TABLE`` is its code in the op schemas, and the list
``GRADREG_ACTIVATIONS`` in csrc/bias_act.h holds the same rows in the same order (a test checks).
Adding an activation: a row here, its enumerator in that list, and its math (forward, act', act'')
in csrc/bias_act.h, gradreg_fast/triton/bias_act.py and ``third_derivative`` in
gradreg_fast/ops/bias_act.py.

Fields:
    name            the ``act=`` string
    cpp             its enumerator in csrc/bias_act.h
    formula         y = formula(z, alpha) in plain PyTorch: the reference (gradreg_fast.reference)
    default_alpha   the alpha used when none is given; None: the activation takes no alpha
    saves           what act' is computed from, and so what the forward saves: "output" (y; for an
                    activation with an alpha, only when alpha >= 0), "input" (x and b), "nothing"
                    (act' is constant)
    second          act'' is not identically 0 (else the second-derivative op is never launched)
    kink            act' jumps (piecewise linear): a finite-difference step that crosses the jump
                    sees it, which double backprop does not (method='fd' warns, FDKinkWarning)
    fast            replaced by ``gr.fuse`` by default (its fused double backward measured faster
                    than autograd's composite; see gradreg_fast/nn/fuse.py)
    module          the torch.nn class ``gr.fuse`` replaces by it, with the attribute values the
                    module must have (``module_when``) and the attribute holding alpha
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    name: str
    cpp: str
    formula: Callable[[torch.Tensor, float], torch.Tensor]
    default_alpha: float | None = None
    saves: str = "input"
    second: bool = True
    kink: bool = False
    fast: bool = False
    module: str | None = None
    module_when: tuple[tuple[str, object], ...] = ()
    module_alpha: str | None = None


TABLE = (
    Activation("linear", "kLinear", lambda z, a: z, saves="nothing", second=False),
    Activation("relu", "kRelu", lambda z, a: torch.relu(z), saves="output", second=False, kink=True, module="ReLU"),
    Activation("leaky_relu", "kLeakyRelu", lambda z, a: F.leaky_relu(z, a), default_alpha=0.01, saves="output",
               second=False, kink=True, module="LeakyReLU", module_alpha="negative_slope"),
    Activation("tanh", "kTanh", lambda z, a: torch.tanh(z), saves="output", fast=True, module="Tanh"),
    Activation("sigmoid", "kSigmoid", lambda z, a: torch.sigmoid(z), saves="output", fast=True, module="Sigmoid"),
    # log(1 + e^z), z above 20: z (torch.nn.Softplus's beta 1, threshold 20)
    Activation("softplus", "kSoftplus", lambda z, a: F.softplus(z), fast=True, module="Softplus",
               module_when=(("beta", 1), ("threshold", 20))),
    # z·Φ(z), erf form
    Activation("gelu", "kGelu", lambda z, a: F.gelu(z), fast=True, module="GELU",
               module_when=(("approximate", "none"),)),
    # ½z(1 + tanh(√(2/π)(z + 0.044715 z³)))
    Activation("gelu_tanh", "kGeluTanh", lambda z, a: F.gelu(z, approximate="tanh"), fast=True, module="GELU",
               module_when=(("approximate", "tanh"),)),
    Activation("silu", "kSilu", lambda z, a: F.silu(z), fast=True, module="SiLU"),
    # z if z > 0 else alpha·(e^z − 1)
    Activation("elu", "kElu", lambda z, a: F.elu(z, a), default_alpha=1.0, fast=True, module="ELU",
               module_alpha="alpha"),
)

SPEC = {a.name: a for a in TABLE}
ACTIVATIONS = tuple(SPEC)
ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}
DEFAULT_ALPHA = {a.name: a.default_alpha for a in TABLE if a.default_alpha is not None}
NO_SECOND = frozenset(a.name for a in TABLE if not a.second)
KINKED = frozenset(a.name for a in TABLE if a.kink)
FAST_ACTIVATIONS = tuple(a.name for a in TABLE if a.fast)


def takes_alpha(act: str) -> bool:
    return act in DEFAULT_ALPHA


def from_output(act: str, alpha: float) -> bool:
    """Whether act' is computed from the output y (then y is saved) rather than from x + b."""
    return SPEC[act].saves != "input" and (not takes_alpha(act) or alpha >= 0)


def activation_of(module: torch.nn.Module) -> tuple[str, float | None] | None:
    """(act, alpha) of a torch.nn activation module that the table lists (exact type), or None."""
    for a in TABLE:
        if a.module is not None and type(module) is getattr(torch.nn, a.module) and all(
                getattr(module, key) == value for key, value in a.module_when):
            return a.name, (float(getattr(module, a.module_alpha)) if a.module_alpha else None)
    return None


# ---------------------------------------------------------------------------------------------
# Memory layout (the same rules as csrc/bias_act.h's layout_of and geometry).

def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout the kernels keep: channels_last for a 4-D tensor stored that way, else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def geometry(t: torch.Tensor, dim: int, fmt: torch.memory_format, with_bias: bool) -> tuple[int, int]:
    """(C, inner): the bias index of the i-th element in memory order is (i // inner) % C."""
    if not with_bias:
        return 1, max(t.numel(), 1)
    order = (0, 2, 3, 1) if fmt == torch.channels_last else tuple(range(t.dim()))
    pos = order.index(dim)
    return t.shape[dim], math.prod(t.shape[d] for d in order[pos + 1:])
