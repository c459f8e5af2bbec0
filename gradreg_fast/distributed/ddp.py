"""Gradient penalties under torch.nn.parallel.DistributedDataParallel (DDP).

What holds under DDP (tested in tests/distributed/test_ddp.py with torchrun, 2 gloo processes, fp64):

- Every penalty and method works on a DDP-wrapped model with DDP's default settings and with
  ``find_unused_parameters=True``: double backward (``autograd.grad(create_graph=True)`` followed
  by ``loss.backward()``) goes through DDP's reducer hooks correctly, because the inner pass
  differentiates with respect to x only and never fires the parameters' gradient hooks; the outer
  backward fires each hook once. The parameter gradients averaged over the ranks equal those of
  one process on the concatenated batch when every rank holds the same number of samples (the
  penalty is a batch mean, so the mean of per-rank means is the global mean only then).
- A penalty on its own (``penalty("frobreg", ddp, x).backward()``) leaves some parameters
  without a gradient (the output layer's bias does not change the input Jacobian), which DDP
  rejects ("Expected to have finished reduction in the prior iteration"), with or without
  ``find_unused_parameters``. gradreg_fast therefore ties the penalty to the model output with a
  zero gradient (``reach_outputs``), so exactly the parameters DDP saw in the forward pass get a
  (zero) gradient from it; values and non-zero gradients are unchanged.
- ``DistributedDataParallel(static_graph=True)`` does NOT work: its first-iteration delayed
  all-reduce is queued by the inner create_graph pass and runs before any parameter gradient
  exists, after which the ranks' gradients are never averaged (each rank silently trains on its
  own gradient). ``check_ddp`` raises a ValueError for it, for every method.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

try:
    from torch.nn.parallel import DistributedDataParallel
except ImportError:  # pragma: no cover - torch builds without torch.distributed
    class DistributedDataParallel:  # type: ignore[no-redef]  # nothing can be an instance of it
        pass

_SINK_NODE = "_DDPSinkBackward"


def find_ddp(model: Callable | None, out: torch.Tensor | None) -> DistributedDataParallel | None:
    """The DDP module the penalty runs through: ``model`` itself, or the DDP whose output ``out`` is
    (DDP marks its outputs with a _DDPSink node when find_unused_parameters or static_graph is set)."""
    if isinstance(model, DistributedDataParallel):
        return model
    node = getattr(out, "grad_fn", None)
    if node is not None and node.name() == _SINK_NODE:
        ref = getattr(node, "ddp_weakref", None)
        ddp = ref() if callable(ref) else None
        if isinstance(ddp, DistributedDataParallel):
            return ddp
    return None


def check_ddp(ddp: DistributedDataParallel | None) -> None:
    """Raise for the DDP configurations under which a gradient penalty cannot be trained."""
    if ddp is not None and getattr(ddp, "static_graph", False):
        raise ValueError(
            "gradreg_fast: DistributedDataParallel(static_graph=True) does not average the gradients "
            "of a gradient penalty across ranks (its first-iteration delayed all-reduce fires during "
            "the penalty's inner input-gradient pass, before any parameter gradient exists), with "
            "every method. Construct DistributedDataParallel without static_graph (the default, "
            "static_graph=False; find_unused_parameters=True also works)")


class _ReachOutputs(torch.autograd.Function):
    """Identity on the penalty p that sends a zero gradient to ``out`` (and so to every parameter
    that produced it) without letting an inf in ``out`` turn the value into NaN (0 · inf)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.out_meta = (out.shape, out.dtype, out.device)
        return p.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.out_meta
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def reach_outputs(p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """p, with a zero-gradient dependence on the model output ``out`` (see the module docstring)."""
    if not out.requires_grad:
        return p
    return _ReachOutputs.apply(p, out)


__all__ = ["check_ddp", "find_ddp", "reach_outputs"]
