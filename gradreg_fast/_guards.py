"""Checks every penalty goes through, whatever the estimator (see ``run_estimator``).

- NaN/Inf: a NaN or Inf in x, or a NaN in the model output (a NaN or Inf parameter on the path
  to the output gives one), makes the penalty NaN and every parameter gradient it sends NaN. A
  ReLU network's input Jacobian does not depend on the activations' values, so without this a
  non-finite input would give a finite, meaningless penalty. No host sync: the check is a
  device-side factor (1 or NaN) the penalty is multiplied by, and for finite inputs the result is
  bitwise the unguarded one. ±Inf in the output alone (e.g. logits masked to -inf) is left to the
  estimator's arithmetic.
- torch.compile: aot_autograd backends (inductor, aot_eager) refuse double backward, but only
  when ``loss.backward()`` reaches the compiled region's backward-of-backward, far from the
  penalty. The penalty's graph is searched for that node right away, and a ValueError names the
  methods that need no double backward.
- DDP: see gradreg_fast.distributed.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from gradreg_fast import distributed

# Methods that never differentiate through a backward pass, so they train compiled models
# (tests/test_compile.py checks each one that exists in gradreg_fast.METHODS).
FIRST_ORDER_METHODS = ("fd", "hvp")
_COMPILED_DOUBLE_BACKWARD = "CompiledFunctionBackwardBackward"
_AOT_PACKAGE = "torch._functorch._aot_autograd.runtime_wrappers"  # defines CompiledFunction


def nonfinite_factor(x: torch.Tensor, u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor: NaN when x holds a NaN/Inf or u a NaN, else exactly 1 (no host sync)."""
    bad = torch.isnan(u.detach()).any() | ~torch.isfinite(x.detach()).all()
    one = torch.ones((), dtype=like.dtype, device=like.device)
    return one.masked_fill(bad.to(like.device), float("nan"))


def _compiled_double_backward_in(p: torch.Tensor) -> bool:
    """True when p's autograd graph holds a compiled (aot_autograd) region's double-backward node."""
    if _AOT_PACKAGE not in sys.modules or p.grad_fn is None:
        return False  # no compiled region can exist: skip the graph walk
    seen, stack = set(), [p.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == _COMPILED_DOUBLE_BACKWARD:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def check_compiled(p: torch.Tensor, method: str, methods) -> None:
    if _compiled_double_backward_in(p):
        working = [m for m in FIRST_ORDER_METHODS if m in methods]
        alternatives = (f"use method={' or '.join(repr(m) for m in working)} (no double backward), "
                        if working else "")
        raise ValueError(
            f"gradreg_fast: method={method!r} needs double backward through the model, and the model "
            "(or part of it) is compiled with torch.compile, whose aot_autograd backends (inductor, "
            "aot_eager) raise 'torch.compile with aot_autograd does not currently support double "
            f"backward' at loss.backward(). Fix: {alternatives}compile with backend='eager', or "
            "compute the penalty on the uncompiled module (compiled._orig_mod)")


def run_estimator(estimator: Callable, problem, *, method: str, methods, model: Callable | None,
                  out: torch.Tensor) -> torch.Tensor:
    """estimator(problem), with the DDP, torch.compile and NaN/Inf guards of this module."""
    ddp = distributed.find_ddp(model, out)
    distributed.check_ddp(ddp)
    p = estimator(problem)
    check_compiled(p, method, methods)
    p = p * nonfinite_factor(problem.x, problem.u, p)
    if ddp is not None:
        p = distributed.reach_outputs(p, out)
    return p
