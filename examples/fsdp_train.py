"""Train a classifier with a gradient penalty on a model sharded with FSDP2 (fully_shard).

    torchrun --nproc_per_node=2 examples/fsdp_train.py --penalty spectreg --lam 0.03
    torchrun --nproc_per_node=2 examples/fsdp_train.py --penalty doubleback --lam 50 --method hvp --bf16

CPU processes talk over gloo, GPUs (one per process) over NCCL. The data are a synthetic 10-class
problem (no download); each rank trains on its own shard (DistributedSampler) with the same batch
size, so the reduced gradient is that of the global batch (the penalty is a batch mean).
What matters for the penalty under FSDP2:
  - shard as usual (fully_shard on each block, then on the root) and pass the sharded root module
    to GradRegLoss (one forward pass);
  - every method works: exact/hvp/jvp hold the parameters unsharded from the penalty call to the end
    of the backward and reduce-scatter the gradients once there (gradreg_fast.distributed); fd runs
    through FSDP's own per-layer hooks (lower peak memory; see docs/scaling.md);
  - with --bf16 (MixedPrecisionPolicy(param_dtype=bfloat16)) method="fd" is refused: its step is
    below bf16 resolution; exact and hvp are fine;
  - draws (SpectReg's r) use a generator seeded identically on every rank.
--check compares the first step's gradients with one process on the global batch.
The data, the common options, the process group and the training loop: examples/_distributed.py.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from _distributed import gr, init, parser, run, train_loop
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def full_grads(model: nn.Module) -> torch.Tensor:
    parts = []
    for p in model.parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = g.full_tensor() if isinstance(g, DTensor) else g
        parts.append(g.reshape(-1).float())
    return torch.cat(parts)


def check_first_step(reference: nn.Module, model: nn.Module, crit_args: dict, x, y, device, tol: float) -> None:
    """The sharded model's gradients after the first step vs one process on the global batch."""
    world = dist.get_world_size()
    xs = [torch.empty_like(x) for _ in range(world)]
    ys = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(xs, x)
    dist.all_gather(ys, y)
    got = full_grads(model)
    if dist.get_rank() != 0:
        return
    crit = gr.GradRegLoss(**crit_args)
    crit(reference, torch.cat(xs), torch.cat(ys)).backward()
    want = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in reference.parameters()])
    diff = float((got - want).abs().max() / want.abs().max())
    verdict = "match one process" if diff <= tol else "DIFFER FROM one process"
    print(f"first step: gradients {verdict} on the global batch (max rel diff {diff:.2e}, tol {tol:.0e})",
          flush=True)
    if diff > tol:
        sys.exit(1)


def train() -> None:
    ap = parser(__doc__)
    ap.add_argument("--bf16", action="store_true",
                    help="MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)")
    ap.add_argument("--check", action="store_true",
                    help="compare the first step's gradients with one process on the global batch")
    args = ap.parse_args()
    if args.check and (args.penalty == "random_onehot" or args.method == "jvp"):
        ap.error("--check compares with one process on the global batch, which draws other random numbers "
                 "for random_onehot and method='jvp': pick a deterministic penalty and method")
    device = init()

    torch.manual_seed(args.seed)  # same initial weights everywhere (fully_shard keeps each rank's shard)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    reference = copy.deepcopy(model) if args.check else None
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16
          else MixedPrecisionPolicy())
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)

    crit_args = dict(penalty=args.penalty, lam=args.lam, method=args.method)
    generator = torch.Generator(device=device)
    crit = gr.GradRegLoss(**crit_args, generator=generator)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    def step_loss(step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        generator.manual_seed(args.seed + 1 + step)  # identical on every rank
        loss = crit(model, x, y)
        loss.backward()
        if reference is not None and step == 0:
            crit_args["generator"] = torch.Generator(device=device).manual_seed(args.seed + 1)
            check_first_step(reference, model, crit_args, x, y, device, tol=3e-2 if args.bf16 else 1e-4)
        return loss

    train_loop(step_loss, opt, crit, args, device)


if __name__ == "__main__":
    run(train)
