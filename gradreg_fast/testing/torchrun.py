"""Support for the processes torchrun starts in the tests (tests/distributed/ddp_worker.py,
tests/distributed/fsdp_worker.py) and the benchmarks (benchmarks/fsdp_memory.py)."""
from __future__ import annotations

import os
import sys

import torch.distributed as dist


def exit_worker() -> None:
    """End a worker whose results are written: barrier, destroy the process group, and leave without the
    interpreter's teardown, where torch 2.14.1's gloo threads abort now and then ("terminate called
    without an active exception", SIGABRT after the work is done: about one run in eight on the CPU VM,
    not seen on 2.13)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
