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
from op_cases import OpCase

ROW = 1000


def cases(device: torch.device, dtype: torch.dtype, numel: int) -> list[OpCase]:
    B = max(1, numel // ROW)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(B, ROW, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, ROW, generator=gen).to(device=device, dtype=dtype)
    fns = {"reference": reference.sq_norm}
    for name in kernel_backends(device):
        fns[name] = lambda x, name=name: sq_norm(x, backend=name)

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

    n, size, acc = B * ROW, x0.element_size(), 8 if dtype == torch.float64 else 4
    return [
        OpCase("sq_norm", "forward", n, n * size + B * acc, {k: forward(f) for k, f in fns.items()}),
        OpCase("sq_norm", "backward", n, 2 * n * size + 2 * B * acc, {k: backward(f) for k, f in fns.items()}),
        OpCase("sq_norm", "double_backward", n, 5 * n * size + 3 * B * acc,
               {k: double_backward(f) for k, f in fns.items()}),
    ]
