"""Microbenchmark cases, one module per op (benchmarks/op_cases/<op>.py), collected by bench_ops.py.

Each module defines ``cases(device: torch.device, dtype: torch.dtype, numel: int) -> list[OpCase]``
returning the passes it measures at about ``numel`` elements, with one zero-argument callable per
backend that can run there ("reference" is the pure-PyTorch composite the kernels are compared with).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class OpCase:
    op: str                      # e.g. "bias_act[tanh]"
    pass_name: str               # "forward" | "backward" | "double_backward"
    numel: int                   # elements of the main input
    bytes_moved: int             # bytes a fused kernel must read + write for this pass (for bandwidth)
    run: dict[str, Callable[[], object]] = field(default_factory=dict)  # backend -> runs the pass once


def autograd_passes(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], x0: torch.Tensor, v: torch.Tensor
                    ) -> dict[str, dict[str, Callable[[], object]]]:
    """The three passes of an op taken at x0, per backend (``fns``: backend -> the op as a function of x):

        forward          fn(x0)
        backward         the gradient of fn(x).sum() with respect to x
        double_backward  that gradient built with create_graph=True, then ∂⟨gradient, v⟩/∂x: the pass a
                         gradient penalty's parameter gradient runs through the op

    Returns {pass: {backend: a zero-argument callable that runs it once}}."""
    def forward(fn):
        return lambda: fn(x0)

    def backward(fn):
        def run():
            x = x0.detach().requires_grad_(True)
            return torch.autograd.grad(fn(x).sum(), x)
        return run

    def double_backward(fn):
        def run():
            x = x0.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
            return torch.autograd.grad((g * v).sum(), x)
        return run

    return {name: {be: make(fn) for be, fn in fns.items()}
            for name, make in (("forward", forward), ("backward", backward), ("double_backward", double_backward))}
