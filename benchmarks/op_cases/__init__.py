"""Microbenchmark cases, one module per op (benchmarks/op_cases/<op>.py), collected by bench_ops.py.

Each module defines ``cases(device: torch.device, dtype: torch.dtype, numel: int) -> list[OpCase]``
returning the passes it measures at about ``numel`` elements, with one zero-argument callable per
backend that can run there ("reference" is the pure-PyTorch composite the kernels are compared with).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class OpCase:
    op: str                      # e.g. "bias_act[tanh]"
    pass_name: str               # "forward" | "backward" | "double_backward"
    numel: int                   # elements of the main input
    bytes_moved: int             # bytes a fused kernel must read + write for this pass (for bandwidth)
    run: dict[str, Callable[[], object]] = field(default_factory=dict)  # backend -> runs the pass once
