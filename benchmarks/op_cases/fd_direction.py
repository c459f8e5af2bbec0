"""Microbenchmark cases of the finite-difference direction (forward only: the fd estimator runs
it without grad). Reference composite: gradreg_fast.reference.fd_direction (norm, where, divide,
add — several passes). Shape (B, 3·32·32) at about ``numel`` elements."""
from __future__ import annotations

import torch

from gradreg_fast import reference
from gradreg_fast.ops.fd_direction import fd_direction
from harness.backends import kernel_backends
from op_cases import OpCase

ROW = 3 * 32 * 32
H = 1e-3


def cases(device: torch.device, dtype: torch.dtype, numel: int) -> list[OpCase]:
    B = max(1, numel // ROW)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, 3, 32, 32, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(B, 3, 32, 32, generator=gen).to(device=device, dtype=dtype)
    run = {"reference": lambda: reference.fd_direction(x, g, H)}
    for name in kernel_backends(device):
        run[name] = lambda name=name: fd_direction(x, g, H, backend=name)
    n, size = x.numel(), x.element_size()
    acc = 8 if dtype == torch.float64 else 4
    # fused: read x and g once, write out and the norms
    return [OpCase("fd_direction", "forward", n, 3 * n * size + B * acc, run)]
