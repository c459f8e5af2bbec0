"""Train a classifier with a gradient penalty under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp_train.py --penalty spectreg --lam 0.03
    torchrun --nproc_per_node=2 examples/ddp_train.py --penalty doubleback --lam 50 --steps 500

CPU processes talk over gloo, GPUs (one per process) over NCCL. The data are a synthetic 10-class
problem (no download). Each rank trains on its own shard (DistributedSampler) with the same batch
size, so the averaged gradient is that of the global batch: the penalty is a batch mean.
What matters for the penalty under DDP:
  - wrap the model in DDP as usual and pass the DDP module to GradRegLoss (one forward pass);
  - keep static_graph=False (the default): static_graph=True does not average penalty gradients,
    and gradreg_fast raises for it;
  - draws (SpectReg's r) use a generator seeded identically on every rank, so all ranks project
    with the same r, as one process on the global batch would.
The data, the common options, the process group and the training loop: examples/_distributed.py.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _distributed import gr, init, parser, run, train_loop
from torch import nn


def train() -> None:
    ap = parser(__doc__)
    ap.add_argument("--check", action="store_true", help="verify at the end that all replicas are identical")
    args = ap.parse_args()
    device = init()

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # identical on every rank
    crit = gr.GradRegLoss(args.penalty, lam=args.lam, method=args.method, generator=generator)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)

    def step_loss(step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = crit(ddp, x, y)
        loss.backward()
        return loss

    train_loop(step_loss, opt, crit, args, device)

    if args.check:
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        if dist.get_rank() == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered[1:])
            print("replicas identical" if same else "REPLICAS DIFFER", flush=True)
            if not same:
                sys.exit(1)


if __name__ == "__main__":
    run(train)
