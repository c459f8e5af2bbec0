"""What examples/ddp_train.py and examples/fsdp_train.py share: the synthetic data, the command line,
the process group and device, the training loop over each rank's shard, and the end of the run.
Each script wraps the model its own way and passes the loss to ``train_loop``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

try:
    import gradreg_fast as gr  # the installed package, with its built extension
except ImportError:  # a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gradreg_fast as gr


def synthetic_data(n: int, d: int, k: int, seed: int = 0) -> TensorDataset:
    """A k-class problem in d dimensions: Gaussian clusters around random centers (no download)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 2
    y = torch.randint(k, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    return TensorDataset(x, y)


def parser(doc: str) -> argparse.ArgumentParser:
    """The options both scripts take; each adds its own (--check, --bf16)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--penalty", default="spectreg", choices=gr.KINDS)
    ap.add_argument("--lam", type=float, default=0.03)
    ap.add_argument("--method", default="exact", choices=list(gr.METHODS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50, help="per-rank batch size")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def init() -> torch.device:
    """Joins the process group torchrun set up (NCCL with one GPU per process, else gloo on the CPU)
    and returns this rank's device."""
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if not use_cuda:
        torch.set_num_threads(1)
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def train_loop(step_loss: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
               crit: gr.GradRegLoss, args: argparse.Namespace, device: torch.device) -> None:
    """``args.steps`` steps over this rank's shard of the data (DistributedSampler: the same batch size
    on every rank, so the reduced gradient is the global batch's): ``step_loss(step, x, y)`` returns the
    loss after its backward, then the optimizer steps. Rank 0 prints the loss every 50 steps."""
    data = synthetic_data(4000, 20, 10, seed=args.seed)
    sampler = DistributedSampler(data, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = step_loss(step, x.to(device), y.to(device))
            opt.step()
            step += 1
            if dist.get_rank() == 0 and (step % 50 == 0 or step == args.steps):
                print(f"step {step:5d}  loss {loss.item():.4f}  base {crit.last_base.item():.4f}  "
                      f"penalty {crit.last_penalty.item():.4g}", flush=True)
            if step >= args.steps:
                break
        epoch += 1


def run(train: Callable[[], None]) -> None:
    """``train()``, then the end of the process group. The model, optimizer and last batch die with
    train()'s frame; they are collected first. Left to the interpreter's exit, a gloo thread finishing
    its last collective can need the GIL during finalization and abort the process ("terminate called
    without an active exception") after the work is done."""
    train()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
