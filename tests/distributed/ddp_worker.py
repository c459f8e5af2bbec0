"""Worker for tests/distributed/test_ddp.py, run as
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed/ddp_worker.py OUT.json``.

Every penalty kind x method x call form x DDP configuration: two SGD steps of a small fp64 MLP
wrapped in DistributedDataParallel (gloo, CPU), each rank on its half of the batch. Rank 0 also
computes, in one process without DDP, the same two steps on
  - "concat": the concatenated batch (one penalty call on all samples), and
  - "halves": the mean of the penalty over the two halves, each with the draws a rank makes,
and writes, per case, the largest relative differences of the parameter gradients and loss values
to OUT.json. The assertions live in test_ddp.py.
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

try:
    import gradreg_fast as gr  # the installed package, with its built extension
except ImportError:  # a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import gradreg_fast as gr
from gradreg_fast.testing.torchrun import exit_worker

DTYPE = torch.float64
D_IN, K, HALF = 6, 4, 4
STEPS, LR, LAM, SEED = 2, 0.1, 0.7, 1234
CONFIGS = {"default": {}, "find_unused": {"find_unused_parameters": True}}
FORMS = ("penalty", "loss", "inputs")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, K)).to(DTYPE)


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * HALF, D_IN, generator=g, dtype=DTYPE)
    y = torch.randint(K, (2 * HALF,), generator=g)
    return x, y


def objective(form: str, kind: str, method: str, model, x, y, gen: torch.Generator) -> torch.Tensor:
    """The scalar one rank (or the reference) differentiates; gen is reseeded by the caller."""
    if form == "penalty":
        return gr.penalty(kind, model, x, y, method=method, generator=gen)
    crit = gr.GradRegLoss(kind, lam=LAM, method=method, generator=gen)
    if form == "loss":
        return crit(model, x, y)
    xr = x.detach().clone().requires_grad_(True)
    return crit(model(xr), y, inputs=xr)


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


def sgd(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad


def run_reference(form, kind, method, x, y, halves: bool, make=None):
    model = (make or make_model)()   # make: another model (tests/distributed/fsdp_worker.py's BatchNorm case)
    gen = torch.Generator()
    grads, values = [], []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        if halves:
            parts = []
            for xh, yh in zip(x.chunk(2), y.chunk(2), strict=True):
                gen.manual_seed(SEED + step)
                parts.append(objective(form, kind, method, model, xh, yh, gen))
            value = (parts[0] + parts[1]) / 2
        else:
            gen.manual_seed(SEED + step)
            value = objective(form, kind, method, model, x, y, gen)
        value.backward()
        grads.append(flat_grads(model))
        values.append(value.detach())
        sgd(model)
    return torch.stack(grads), torch.stack(values)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def run_case(config, form, kind, method, x, y, rank, world):
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model, **CONFIGS[config])
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    gen = torch.Generator()
    grads, values = [], []
    for step in range(STEPS):
        ddp.zero_grad(set_to_none=True)
        gen.manual_seed(SEED + step)  # the same draws on every rank (SpectReg's shared r)
        value = objective(form, kind, method, ddp, xs, ys, gen)
        value.backward()
        grads.append(flat_grads(model))
        total = value.detach().clone()
        dist.all_reduce(total)
        values.append(total / world)
        sgd(model)
    grads, values = torch.stack(grads), torch.stack(values)
    gathered = [torch.empty_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    if rank != 0:
        return None
    result = {"ranks_differ": rel(gathered[1], gathered[0])}
    for name, halves in (("concat", False), ("halves", True)):
        ref_grads, ref_values = run_reference(form, kind, method, x, y, halves)
        result[f"grad_vs_{name}"] = rel(grads, ref_grads)
        result[f"value_vs_{name}"] = rel(values, ref_values)
    return result


def run_static_graph(x, y, rank, world, method):
    """static_graph=True must raise the library's ValueError on every rank."""
    ddp = nn.parallel.DistributedDataParallel(make_model(), static_graph=True)
    try:
        gr.GradRegLoss("frobreg", lam=LAM, method=method)(ddp, x.chunk(world)[rank], y.chunk(world)[rank])
    except ValueError as exc:
        return str(exc)
    return None


def init_two_ranks() -> tuple[int, int]:
    """One thread, the gloo process group, and a check that torchrun started exactly 2 ranks."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node=2"
    return rank, world


def main() -> None:
    out_path = sys.argv[1]
    rank, world = init_two_ranks()
    x, y = data()
    results, static = {}, {}
    for config in CONFIGS:
        for form in FORMS:
            for kind in gr.KINDS:
                for method in gr.METHODS:
                    case = f"{config}-{form}-{kind}-{method}"
                    try:
                        results[case] = run_case(config, form, kind, method, x, y, rank, world)
                    except Exception as exc:  # recorded; test_ddp.py decides what is expected
                        results[case] = {"error": f"{type(exc).__name__}: {exc}"}
    for method in gr.METHODS:
        static[method] = run_static_graph(x, y, rank, world, method)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"cases": results, "static_graph": static, "methods": list(gr.METHODS),
                       "kinds": list(gr.KINDS)}, f, indent=1)
    exit_worker()


if __name__ == "__main__":
    main()
