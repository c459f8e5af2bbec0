"""Microbenchmark cases of the fused softmax cross-entropy (forward, backward, double backward).

The double backward is the pass a gradient penalty of the loss needs: with z requiring grad,
g = ∂Σℓ/∂z (create_graph=True), then ∂⟨g, u⟩/∂z — the Hessian-vector product (diag(p) − ppᵀ)u.
The reference composite is torch.nn.functional.cross_entropy(reduction="none").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gradreg_fast.ops.cross_entropy import cross_entropy
from harness.backends import kernel_backends
from op_cases import OpCase, autograd_passes

NUM_CLASSES = 10


def cases(device: torch.device, dtype: torch.dtype, numel: int) -> list[OpCase]:
    K = NUM_CLASSES
    B = max(1, numel // K)
    gen = torch.Generator(device="cpu").manual_seed(0)
    z0 = torch.randn(B, K, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, K, (B,), generator=gen).to(device)
    u = torch.randn(B, K, generator=gen).to(device=device, dtype=dtype)
    size = z0.element_size()
    fns = {"reference": lambda z: F.cross_entropy(z, y, reduction="none")}
    for name in kernel_backends(device):
        fns[name] = lambda z, name=name: cross_entropy(z, y, backend=name)

    runs = autograd_passes(fns, z0, u)
    n = B * K
    return [
        OpCase("cross_entropy", "forward", n, n * size + B * 8 + 2 * B * 4, runs["forward"]),
        OpCase("cross_entropy", "backward", n, 2 * n * size + B * 8 + 3 * B * 4, runs["backward"]),
        # forward + backward + hvp pass: z read 3x, grad_z written, u read, hvp written
        OpCase("cross_entropy", "double_backward", n, 6 * n * size + 3 * B * 8, runs["double_backward"]),
    ]
