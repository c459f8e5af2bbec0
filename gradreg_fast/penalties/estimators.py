"""Estimators (``method=``): each maps a Problem to a scalar whose value is the penalty and whose
gradient with respect to the model's parameters is the penalty's gradient (exactly or in
expectation, as each docstring says)."""
from __future__ import annotations

from typing import Callable

import torch

from gradreg_fast._guards import compiled_region_in
from gradreg_fast.ops import sq_norm
from gradreg_fast.penalties.core import Problem


def input_vjps(p: Problem, *, create_graph: bool) -> torch.Tensor:
    """G[j] = ∂(Σ_b R[j, b] · u_b)/∂x for every cotangent j at once: shape (n, B, ...).

    One batched reverse pass (is_grads_batched) instead of a Python loop over the n cotangents.
    Raises a ValueError when the targets do not depend on x.
    """
    if not p.u.requires_grad:
        raise ValueError("the model output does not depend on x (no autograd graph from x to the "
                         "output): a gradient penalty would be a silent 0; check that the model uses x")
    n = p.R.shape[0]
    if n > 1 and compiled_region_in(p.u):
        # is_grads_batched vmaps the backward, which compiled (aot_autograd) regions do not support
        gs = [torch.autograd.grad(p.u, p.x, grad_outputs=p.R[j], create_graph=create_graph,
                                  retain_graph=True, allow_unused=True)[0] for j in range(n)]
        g = None if gs[0] is None else torch.stack(gs)
    else:
        grad_outputs = p.R if n > 1 else p.R[0]
        (g,) = torch.autograd.grad(p.u, p.x, grad_outputs=grad_outputs, create_graph=create_graph,
                                   allow_unused=True, is_grads_batched=n > 1)
    if g is None:
        raise ValueError("the model output does not depend on x: a gradient penalty would be a silent 0; "
                         "check that the model uses x")
    return g if n > 1 else g.unsqueeze(0)


def exact(p: Problem) -> torch.Tensor:
    """Double backpropagation: the penalty with create_graph=True, differentiated by autograd.

    scale · mean_b Σ_j ‖G[j, b]‖², exact value and exact parameter gradient.
    """
    g = input_vjps(p, create_graph=True)
    if not g.requires_grad:
        raise ValueError("the input gradient does not depend on the parameters through a twice-"
                         "differentiable graph (an op in the model has no double backward, or the "
                         "model has no parameters on the path from x): method='exact' cannot train "
                         "with this penalty")
    n, batch = g.shape[0], g.shape[1]
    norms = sq_norm(g.reshape((n * batch,) + tuple(g.shape[2:]))).reshape(n, batch)
    return p.scale * norms.sum(0).mean()


METHODS: dict[str, Callable[[Problem], torch.Tensor]] = {"exact": exact}
