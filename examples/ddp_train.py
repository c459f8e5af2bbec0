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
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

try:
    import gradreg_fast as gr  # the installed package, with its built extension
except ImportError:  # a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gradreg_fast as gr


def synthetic_data(n: int, d: int, k: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 2
    y = torch.randint(k, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    return TensorDataset(x, y)


def train() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--penalty", default="spectreg", choices=gr.KINDS)
    ap.add_argument("--lam", type=float, default=0.03)
    ap.add_argument("--method", default="exact", choices=list(gr.METHODS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50, help="per-rank batch size")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="verify at the end that all replicas are identical")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # identical on every rank
    crit = gr.GradRegLoss(args.penalty, lam=args.lam, method=args.method, generator=generator)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)

    data = synthetic_data(4000, 20, 10, seed=args.seed)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)

    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = crit(ddp, x, y)
            loss.backward()
            opt.step()
            step += 1
            if rank == 0 and (step % 50 == 0 or step == args.steps):
                print(f"step {step:5d}  loss {loss.item():.4f}  base {crit.last_base.item():.4f}  "
                      f"penalty {crit.last_penalty.item():.4g}", flush=True)
            if step >= args.steps:
                break
        epoch += 1

    if args.check:
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered[1:])
            print("replicas identical" if same else "REPLICAS DIFFER", flush=True)
            if not same:
                sys.exit(1)


def main() -> None:
    train()
    # The model, optimizer and last batch died with train()'s frame; collect them, then end the
    # process group. Left to the interpreter's exit, a gloo thread finishing its last collective can
    # need the GIL during finalization and abort the process ("terminate called without an active
    # exception") after the work is done.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
