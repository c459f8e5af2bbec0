"""The held lazy schedule (GradRegLoss(every=k, hold=True)).

The lazy schedule (``every=k``) puts k·P on one step in k and nothing on the others. Under Adam, which
divides each coordinate's step by its running RMS, a gradient that is zero on k − 1 steps and k times
larger on one inflates that RMS and shrinks the plain steps: on the paper's MNIST LeNet it loses most of
the penalty's accuracy gain from k = 4 on. The held schedule computes g = ∇ λ·P on one step in k and adds
the same g to the gradient of every step until the next computation:

    step t:  ∇ L_t = ∇ base_t + g_s,   g_s = ∇ λ·P at the last computing step s ≤ t  (t − s < k),

which kept 77% of exact DoubleBack's gain at k = 4 there, not significantly below exact (docs/paper.md).

``hold(pen, lam)`` takes the gradients of a freshly computed penalty (with respect to every leaf of its
graph but the input the library made) and returns the carrier for this step and the ``Held`` state for
the next ones; ``Held.carrier()`` adds the held gradients to a later step's backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradreg_fast.penalties.core import made_input
from gradreg_fast.penalties.estimators._shared import hooked
from gradreg_fast.penalties.guards import graph_leaves


class _Carrier(torch.autograd.Function):
    """``value`` (a detached scalar) whose backward, for the caller's weight w, returns w · grads[i] for
    inputs[i]: fixed gradients entering the caller's backward (and its hooks: AccumulateGrad)."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, w):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "gradreg_fast: GradRegLoss(hold=True) adds a held penalty gradient, which cannot be "
                "differentiated again (backward(create_graph=True)); build a loss differentiated twice with "
                "the functional form: base + lam * gr.penalty(kind, model, x, y)")
        return (None, None, *[w.to(g.dtype) * g for g in ctx.grads])


@dataclass
class Held:
    """The penalty gradient held between computations: λ·∇P for each parameter, and λ·P's value."""
    params: list[nn.Parameter]
    grads: list[torch.Tensor]
    value: torch.Tensor

    def serves(self, params) -> bool:
        """Whether every held parameter is among ``params`` (the model of this call): a held gradient is
        never added to a model it was not computed for."""
        mine = {id(p) for p in params}
        return all(id(p) in mine for p in self.params)

    def carrier(self) -> torch.Tensor:
        """λ·P's last value, whose backward adds the held gradients."""
        return _Carrier.apply(self.value, self.grads, *self.params)


def hold(pen: torch.Tensor, lam: float) -> tuple[torch.Tensor, Held]:
    """``(carrier, held)`` for a penalty ``pen`` (a scalar on its graph) just computed: g = ∇ λ·pen with
    respect to every leaf of its graph (the parameters, and any other tensor the caller made require
    grad; not the input the library made, which nobody reads), taken now (the graph is kept for the
    caller's backward of its base loss, which shares the model's forward); ``carrier`` adds them all to
    this step's backward, ``held`` keeps the parameters' for the next steps."""
    leaves = [t for t in graph_leaves(pen) if t.requires_grad and not made_input(t)]
    if hooked(leaves):
        raise ValueError("GradRegLoss(hold=True) takes the penalty's gradient at the call and adds it again on "
                         "later calls, so a hook registered with Tensor.register_hook on a parameter would run "
                         "on it more than once: use every=k without hold, or a hook that runs once per "
                         "backward (register_post_accumulate_grad_hook)")
    found = torch.autograd.grad(lam * pen, leaves, retain_graph=True, allow_unused=True) if leaves else ()
    pairs = [(t, g) for t, g in zip(leaves, found, strict=True) if g is not None]
    value = (lam * pen).detach()
    carrier = _Carrier.apply(value, [g for _, g in pairs], *[t for t, _ in pairs])
    kept = [(t, g) for t, g in pairs if isinstance(t, nn.Parameter)]
    return carrier, Held([t for t, _ in kept], [g for _, g in kept], value)
