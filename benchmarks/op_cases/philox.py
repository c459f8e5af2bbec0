"""Microbenchmark cases of the Philox ops: gaussian_like, project (forward, backward, double backward).

"reference" is the pure-PyTorch composite (gradreg_fast.reference.philox: Philox in int64 tensor
arithmetic, r materialized, then out * r); the kernels regenerate r inside. Triton runs on CUDA
only here (the CPU interpreter is for tests, not timings).

Passes of project (out of shape (B, K), K = 10 classes, B = numel // K):
    forward          s = project(out)                          reads out, writes s
    backward         grad_out = project_backward(grad_s)       reads grad_s, writes (B, K)
    double_backward  autograd through both with create_graph: forward, backward, and the
                     derivative of the backward wrt grad_s (a projection of the cotangent)
"""
from __future__ import annotations

import torch

from gradreg_fast.ops import gaussian_like, project
from gradreg_fast.reference import philox as P
from harness.backends import op_backends
from op_cases import OpCase

SEED, OFFSET = 0x9E3779B97F4A7C15, 7
K = 10


def _backward_op(backend: str):
    seed = P.seed_to_int64(SEED)
    if backend == "reference":
        return lambda g, ps, dtype: P.project_backward(g, SEED, OFFSET, ps, K, dtype)
    op = torch.ops.gradreg_fast.project_backward_triton if backend == "triton" else \
        torch.ops.gradreg_fast.project_backward
    return lambda g, ps, dtype: op(g, seed, OFFSET, ps, K, dtype)


def cases(device: torch.device, dtype: torch.dtype, numel: int) -> list[OpCase]:
    device = torch.device(device)
    size = torch.empty((), dtype=dtype).element_size()
    backends = op_backends(device)
    x = torch.empty(max(1, numel // 1024), 1024, device=device, dtype=dtype)
    out_list = []
    for per_sample in (True, False):
        tag = "per_sample" if per_sample else "shared"
        case = OpCase(f"gaussian_like[{tag}]", "forward", x.numel(), x.numel() * size)
        for b in backends:
            case.run[b] = (lambda b=b, ps=per_sample: gaussian_like(x, SEED, OFFSET, per_sample=ps, backend=b))
        out_list.append(case)

    B = max(1, numel // K)
    out = torch.randn(B, K, device=device, dtype=dtype)
    out_req = out.clone().requires_grad_(True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(B, device=device, dtype=acc)
    g_req = g.clone().requires_grad_(True)
    w = torch.randn(B, K, device=device, dtype=dtype)
    io = B * K * size + B * torch.empty((), dtype=acc).element_size()
    for per_sample in (False, True):
        tag = "per_sample" if per_sample else "shared"
        fwd = OpCase(f"project[{tag}]", "forward", B * K, io)
        bwd = OpCase(f"project[{tag}]", "backward", B * K, io)
        dbl = OpCase(f"project[{tag}]", "double_backward", B * K, 2 * io + B * K * size)
        for b in backends:
            fwd.run[b] = (lambda b=b, ps=per_sample: project(out, SEED, OFFSET, per_sample=ps, backend=b))
            back = _backward_op(b)
            bwd.run[b] = (lambda back=back, ps=per_sample: back(g, ps, dtype))

            def double(b=b, ps=per_sample):
                s = project(out_req, SEED, OFFSET, per_sample=ps, backend=b)
                (d_out,) = torch.autograd.grad(s, out_req, g_req, create_graph=True)
                return torch.autograd.grad(d_out, g_req, w)
            dbl.run[b] = double
        out_list += [fwd, bwd, dbl]
    return out_list
