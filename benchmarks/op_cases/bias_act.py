"""Microbenchmark cases of the fused bias + activation op (gradreg_fast.ops.bias_act).

Input (rows, 1024) with a bias along dim 1 (the output of a Linear layer), about ``numel``
elements. Passes, each timed alone on a graph built beforehand:

    forward          y = act(x + b)                               (no grad)
    backward         grad_x, grad_b from y's cotangent v
    double_backward  the gradient of <grad_x, w> with respect to x, b and v: what the parameter
                     gradient of a gradient penalty runs through this layer

bytes_moved is what one ideal fused pass reads and writes (the bias is negligible):
forward 2N, backward 3N (grad, saved y or x, grad_x), double backward 5N (w, v, saved; d_v, d_x)
or 3N for linear/relu/leaky_relu, whose second derivative is zero.
"""
from __future__ import annotations

import torch

from gradreg_fast.ops import ACTIVATIONS, bias_act
from harness.backends import op_backends
from op_cases import OpCase

COLS = 1024


def _inputs(device, dtype, numel, seed):
    g = torch.Generator().manual_seed(seed)
    cols = min(COLS, numel)
    rows = max(numel // cols, 1)
    make = lambda *s: torch.randn(s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(rows, cols), make(cols), make(rows, cols), make(rows, cols)


def cases(device: torch.device, dtype: torch.dtype, numel: int) -> list[OpCase]:
    out = []
    backends = op_backends(device)
    for k, act in enumerate(ACTIVATIONS):
        x, b, v, w = _inputs(device, dtype, numel, seed=k)
        n, s = x.numel(), x.element_size()
        second = act not in ("linear", "relu", "leaky_relu")
        fwd = OpCase(f"bias_act[{act}]", "forward", n, 2 * n * s)
        bwd = OpCase(f"bias_act[{act}]", "backward", n, 3 * n * s)
        dbl = OpCase(f"bias_act[{act}]", "double_backward", n, (5 if second else 3) * n * s)
        for be in backends:
            fwd.run[be] = _forward(x, b, act, be)
            bwd.run[be] = _backward(x, b, v, act, be)
            dbl.run[be] = _double_backward(x, b, v, w, act, be)
        out += [fwd, bwd, dbl]
    return out


def _forward(x, b, act, be):
    def run():
        with torch.no_grad():
            return bias_act(x, b, act, backend=be)
    return run


def _backward(x, b, v, act, be):
    xr, br = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = bias_act(xr, br, act, backend=be)
    return lambda: torch.autograd.grad(y, (xr, br), v, retain_graph=True)


def _double_backward(x, b, v, w, act, be):
    xr, br, vr = (t.clone().requires_grad_(True) for t in (x, b, v))
    y = bias_act(xr, br, act, backend=be)
    (gx,) = torch.autograd.grad(y, xr, vr, create_graph=True)
    return lambda: torch.autograd.grad(gx, (xr, br, vr), w, retain_graph=True, allow_unused=True)
