"""method="exact": double backpropagation (reverse-over-reverse)."""
from __future__ import annotations

import torch

from gradreg_fast._twins import NO_DOUBLE_BACKWARD
from gradreg_fast.penalties.core import Problem
from gradreg_fast.penalties.estimators._shared import (
    _penalty_value,
    input_vjps,
    reduce_samples,
)
from gradreg_fast.penalties.estimators.fold import taken_at_call
from gradreg_fast.penalties.guards import check_compiled, graph_nodes

# autograd nodes that raise when differentiated: ops without a double backward (NotImplemented, e.g.
# the flash attention kernels) and custom Functions whose backward is once_differentiable (Error)
_NOT_TWICE_DIFFERENTIABLE = ("torch::autograd::NotImplemented", "torch::autograd::Error",
                             "torch::autograd::DelayedError")
_LEAF = "torch::autograd::AccumulateGrad"


def _scan(roots) -> tuple[str | None, list[torch.Tensor]]:
    """One walk of the graphs of ``roots``: the name of a node that cannot be differentiated (None when
    there is none) and the leaf tensors (AccumulateGrad nodes)."""
    blocker, leaves = None, []
    for node in graph_nodes(roots):
        name = node.name()
        if name == _LEAF:
            leaves.append(node.variable)
        elif blocker is None and name in _NOT_TWICE_DIFFERENTIABLE:
            blocker = name
    return blocker, leaves


def exact(p: Problem) -> torch.Tensor:
    """Double backpropagation: the penalty with create_graph=True, differentiated by autograd.

    P_b = scale · Σ_j ‖G[j, b]‖², exact value and exact parameter gradient. One forward pass
    (the caller's), one batched create_graph backward for all n cotangents, and the caller's
    final backward through both graphs. The input gradient's graph is searched for ops that cannot
    be differentiated again (an op without a double backward, a once_differentiable custom
    Function): with one, the gradient would be wrong or fail far from here, so the call refuses.

    With the caller's base loss offered (GradRegLoss: ``p.fold``), the final backward runs at the call,
    over the base loss and the penalty together, for the parameters only (``fold.taken_at_call``): the
    same gradients without the input gradient of x that the caller's backward would also compute.
    """
    g = input_vjps(p, create_graph=True, stacked=False)   # (B, ...) for one cotangent: see _sq_norms
    if not g.requires_grad:
        raise ValueError("the input gradient does not depend on the parameters through a twice-"
                         "differentiable graph (an op in the model has no double backward, or the "
                         "model has no parameters on the path from x): method='exact' cannot train "
                         "with this penalty; method='fd' needs first derivatives only")
    # one walk for the check below and for the leaves the gradients taken at the call may reach
    # (x attached: taken_at_call walks the base loss's graph itself, not past x)
    folded = p.fold is not None and not p.attached
    blocker, leaves = _scan((g, p.fold.loss) if folded else g)
    if blocker is not None:
        known = next((NO_DOUBLE_BACKWARD[n.name()] for n in graph_nodes(p.u)
                      if n.name() in NO_DOUBLE_BACKWARD), None)
        op = (f"{known}, whose backward torch cannot differentiate; the library swaps in a twice-differentiable "
              "twin when it runs the forward itself, as crit(model, x, y) and gr.penalty(kind, model, x) do"
              if known else f"autograd node {blocker}: an op whose backward is not differentiable, such as a "
              "custom autograd.Function marked once_differentiable or a fused attention kernel")
        raise ValueError(
            f"method='exact' needs the model's double backward, and an op in the model has none "
            f"({op}). Use method='fd' "
            "(first derivatives only). For attention, call the penalty as crit(model, x, y) or "
            "gr.penalty(kind, model, x): the library then runs the forward on the twice-differentiable "
            "math kernel; with precomputed logits, run the forward under "
            "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)")
    per = _penalty_value(p, g)
    if p.fold is not None:
        check_compiled(per, "exact")   # before a backward through a compiled region's double backward
        taken = taken_at_call(p, per, leaves if folded else None)
        if taken is not None:
            return taken
    return reduce_samples(p, per)
