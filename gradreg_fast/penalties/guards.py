"""Checks every penalty goes through, whatever the estimator (see ``run_estimator``).

- NaN/Inf: a NaN or Inf in x, or a NaN in the model output (a NaN or Inf parameter on the path
  to the output gives one), makes the penalty NaN, and NaN flows into the parameter gradients it
  sends (parameters it depends on only through ReLU masks, e.g. biases before a ReLU for FrobReg,
  keep their exact gradient 0). A
  ReLU network's input Jacobian does not depend on the activations' values, so without this a
  non-finite input would give a finite, meaningless penalty. On a GPU there is no host sync: the
  check is a device-side factor (1 or NaN) the penalty is multiplied by; on the CPU it is read on the
  host and a finite call leaves the penalty as it is. For finite inputs the result is bitwise the
  unguarded one. ±Inf in the output alone (e.g. logits masked to -inf) is left to the
  estimator's arithmetic.
- torch.compile: aot_autograd backends (inductor, aot_eager) refuse double backward, but only
  when ``loss.backward()`` reaches the compiled region's backward-of-backward, far from the
  penalty. The penalty's graph is searched for that node right away, and a ValueError names the
  methods that need no double backward.
- DDP and FSDP2: see gradreg_fast.distributed (ddp.py, fsdp.py).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator

import torch

from gradreg_fast import _methods, distributed

# Methods that train torch.compile'd models (the method table's trains_compiled; tests/penalties/test_compile.py
# checks each one): fd uses first-order reverse mode only; hvp and jvp differentiate a functional call of
# the compiled module's original (the same function), so no compiled region meets their forward-mode passes.
COMPILED_MODEL_METHODS = _methods.COMPILED_MODEL_METHODS
_COMPILED_FORWARD = "CompiledFunctionBackward"                 # a compiled region in the forward graph
_COMPILED_DOUBLE_BACKWARD = "CompiledFunctionBackwardBackward"  # its backward, differentiated again


def nonfinite_factor(x: torch.Tensor, u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor: NaN when x holds a NaN/Inf or u a NaN, else exactly 1 (no host sync).

    x is checked through its extremes, from one reduction (torch.aminmax): a NaN anywhere makes them
    NaN, ±Inf makes one infinite, and m - m is then NaN, while for a finite m it is exactly 0 in any
    dtype (finite inputs near the float range, |x| ~ 1e38 in fp32 or 6e4 in fp16, never overflow,
    where a sum would). One pass over x, where torch.isfinite(x).all() costs several.
    """
    xd = x.detach()
    if xd.numel() == 0:
        flag = torch.zeros((), device=xd.device, dtype=torch.float32)
    else:
        lo, hi = torch.aminmax(xd)
        flag = (hi - hi) + (lo - lo)   # 0, or NaN for a NaN/Inf in x
    flag = flag.masked_fill(torch.isnan(u.detach()).any(), float("nan"))
    return (flag + 1).to(device=like.device, dtype=like.dtype)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _nonfinite_on_host(x: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether x holds a NaN/Inf or u a NaN, read on the host (CPU tensors: no device to wait for).
    The same test as ``nonfinite_factor``, and no graph node. One number is read first: the sum of x
    plus that of u (in float32 at least), finite when neither holds a NaN or Inf; only when it is not
    (which a sum of large finite values can also be, by overflow) are the exact tests below run, which
    leave an Inf in u alone unflagged. (A float32 sum of x costs half of aminmax, a float64 one twice.)"""
    xd = x.detach()
    if math.isfinite((xd.sum(dtype=_sum_dtype(xd.dtype)) + u.detach().sum(dtype=_sum_dtype(u.dtype))).item()):
        return False
    if xd.numel():
        lo, hi = torch.aminmax(xd)
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            return True
    return bool(torch.isnan(u.detach()).any().item())


def guard_nonfinite(p: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The penalty ``p``, NaN where x holds a NaN/Inf or u a NaN (see the module docstring). On the CPU
    the test is read on the host and a finite call returns p itself (no multiply in the forward or the
    backward); elsewhere p times ``nonfinite_factor`` (no host sync)."""
    if x.device.type == "cpu" and u.device.type == "cpu" and not torch.compiler.is_compiling():
        return p * float("nan") if _nonfinite_on_host(x, u) else p
    return p * nonfinite_factor(x, u, p)


def _aot_autograd_used() -> bool:
    """False when no torch.compile aot_autograd backend has compiled anything in this process (the
    count dynamo keeps), so no compiled region can be in a graph and no graph needs walking.
    (torch._dynamo itself is imported by any torch.optim optimizer, so its presence says nothing.)"""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return False
    counters = getattr(utils, "counters", None)
    if counters is None:  # an unknown torch: walk to be safe
        return True
    return counters.get("aot_autograd", {}).get("total", 0) > 0


def graph_nodes(t: torch.Tensor | tuple[torch.Tensor, ...], stop=None) -> Iterator:
    """Every node of t's autograd graph (of the union of the graphs, for a tuple of tensors), once each
    (depth first from t.grad_fn), not walking past the node ``stop`` (excluded) when given.

    A node is marked seen when first pushed, so each is pushed once (the walk runs on every penalty
    call, over graphs of a few hundred nodes: half the time of marking on pop, which pushes a node
    once per edge into it)."""
    roots = [r.grad_fn for r in (t if isinstance(t, tuple) else (t,))]
    stack = list(dict.fromkeys(r for r in roots if r is not None and r is not stop))
    seen = {None, stop, *stack}
    while stack:
        node = stack.pop()
        yield node
        for fn, _ in node.next_functions:
            if fn not in seen:
                seen.add(fn)
                stack.append(fn)


def graph_leaves(t: torch.Tensor | tuple[torch.Tensor, ...], stop=None) -> Iterator[torch.Tensor]:
    """The leaf tensors (AccumulateGrad nodes) of t's autograd graph (see ``graph_nodes``)."""
    return (node.variable for node in graph_nodes(t, stop) if hasattr(node, "variable"))


def _graph_holds(t: torch.Tensor, node_name: str) -> bool:
    """True when t's autograd graph holds a node called node_name (aot_autograd nodes only; the
    walk is skipped while no aot_autograd compilation has happened)."""
    if t.grad_fn is None or not _aot_autograd_used():
        return False
    return any(node.name() == node_name for node in graph_nodes(t))


def compiled_region_in(t: torch.Tensor) -> bool:
    """True when t was computed through a torch.compile'd (aot_autograd) region."""
    return _graph_holds(t, _COMPILED_FORWARD)


def _working_methods() -> str:
    """The methods that train compiled models, as the messages name them (from the method table)."""
    return " or ".join(f"method={m!r}" for m in COMPILED_MODEL_METHODS)


def check_compiled(p: torch.Tensor, method: str) -> None:
    if _graph_holds(p, _COMPILED_DOUBLE_BACKWARD):
        working = _working_methods()
        alternatives = f"use {working} (no double backward), " if working else ""
        raise ValueError(
            f"gradreg_fast: method={method!r} needs double backward through the model, and the model "
            "(or part of it) is compiled with torch.compile, whose aot_autograd backends (inductor, "
            "aot_eager) raise 'torch.compile with aot_autograd does not currently support double "
            f"backward' at loss.backward(). Fix: {alternatives}compile with backend='eager', or "
            "compute the penalty on the uncompiled module (compiled._orig_mod)")


def run_estimator(estimator: Callable, problem, *, method: str, model: Callable | None,
                  out: torch.Tensor) -> torch.Tensor:
    """estimator(problem), with the DDP, torch.compile and NaN/Inf guards of this module (the methods
    its messages name come from the method table, gradreg_fast/_methods.py)."""
    ddp = distributed.find_ddp(model, out)
    distributed.check_ddp(ddp)
    if ddp is not None and getattr(problem, "model", None) is ddp:
        # estimators that re-run the model (hvp, fd, jvp) use the wrapped module: DDP's forward
        # inside torch.func / forward-mode AD fails with find_unused_parameters=True (its _DDPSink
        # has no jvp/setup_context), and the caller's DDP forward already prepared the reducer.
        problem.model = ddp.module
    if ddp is not None or distributed.find_fsdp(model, out):
        # DDP and FSDP2 reduce gradients in hooks on the caller's backward through the model: the
        # base loss stays there
        problem.fold = None
    estimator = distributed.fsdp_estimator(estimator, model, out, method)  # FSDP2: a no-op otherwise
    try:
        p = estimator(problem)
    except RuntimeError as exc:
        if "donated buffer" in str(exc):
            # aot_autograd compiled the model's region with donated buffers (it decides so when it
            # compiles; seen after an earlier double backward through a compiled model in the same
            # process): its backward runs once, and hvp/fd need the forward graph twice
            raise ValueError(
                f"gradreg_fast: method={method!r} differentiates the model's forward graph twice (the input "
                "gradient, then the penalty's gradients), and torch.compile compiled the model's backward "
                "with donated buffers, which allow one backward. Compute the penalty on the uncompiled "
                "module (compiled._orig_mod), or use method='jvp' (FrobReg/JacReg). Switching "
                "torch._functorch.config.donated_buffer off does not help: it silences PyTorch's check, "
                "and the second backward then reads overwritten buffers (wrong gradients)") from exc
        # a custom autograd.Function (without setup_context / jvp) inside the model under the
        # torch.func transforms of hvp and jvp
        if "functorch transforms" not in str(exc) and "torch.func" not in str(exc):
            raise
        raise ValueError(
            f"gradreg_fast: method={method!r} runs the model under torch.func transforms, and the model "
            "contains a custom autograd.Function (or a custom op) that does not support them "
            f"({str(exc).splitlines()[0][:160]}). Use method='fd' (first derivatives only), or "
            "method='exact' if the model is twice differentiable") from exc
    except NotImplementedError as exc:
        # forward-mode AD (method "jvp") through a compiled region: aot_autograd has no jvp rule
        if "forward mode AD" in str(exc) and compiled_region_in(problem.u):
            working = _working_methods()
            raise ValueError(
                f"gradreg_fast: method={method!r} uses forward-mode AD, which torch.compile'd "
                f"(aot_autograd) regions of the model do not implement. Use {working or 'another method'} "
                "with a compiled model, or compute the penalty on the uncompiled module "
                "(compiled._orig_mod)") from exc
        if "forward AD" in str(exc) or "forward mode AD" in str(exc) or "jvp" in str(exc):
            raise ValueError(
                f"gradreg_fast: method={method!r} differentiates the model's backward in forward mode, and an "
                f"op in the model has no forward-mode derivative ({str(exc).splitlines()[0][:200]}). Use "
                "method='fd' (first derivatives only), or method='exact' if the model is twice "
                "differentiable") from exc
        raise
    check_compiled(p, method)
    p = guard_nonfinite(p, problem.x, problem.u)
    if ddp is not None:
        p = distributed.reach_outputs(p, out)
    return p
