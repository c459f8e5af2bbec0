"""Microbenchmark cases of the per-sample squared norm (forward, backward, double backward).

Shape (B, 1000) at about ``numel`` elements; the reference composite is x.pow(2).sum(1) (in the
accumulation dtype, as the op). Double backward: the parameter-gradient path of a penalty,
∂/∂x ⟨∂Σsq_norm/∂x, v⟩ with create_graph=True.
"""
from __future__ import annotations

import torch

from gradreg_fast import reference
from gradreg_fast.ops.sq_norm import sq_norm
from harness.backends import kernel_backends
from op_cases import OpCase, autograd_passes

ROW = 1000


def cases(device: torch.device, dtype: torch.dtype, numel: int) -> list[OpCase]:
    B = max(1, numel // ROW)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(B, ROW, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, ROW, generator=gen).to(device=device, dtype=dtype)
    fns = {"reference": reference.sq_norm}
    for name in kernel_backends(device):
        fns[name] = lambda x, name=name: sq_norm(x, backend=name)

    runs = autograd_passes(fns, x0, v)
    n, size, acc = B * ROW, x0.element_size(), 8 if dtype == torch.float64 else 4
    return [
        OpCase("sq_norm", "forward", n, n * size + B * acc, runs["forward"]),
        OpCase("sq_norm", "backward", n, 2 * n * size + 2 * B * acc, runs["backward"]),
        OpCase("sq_norm", "double_backward", n, 5 * n * size + 3 * B * acc, runs["double_backward"]),
    ]
