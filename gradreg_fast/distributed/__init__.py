"""Gradient penalties under data-parallel training: DistributedDataParallel (``ddp.py``) and FSDP2,
``torch.distributed.fsdp.fully_shard`` (``fsdp.py``). ``gradreg_fast._guards`` calls both on every
penalty: ``check_ddp``/``find_ddp`` and ``reach_outputs`` for DDP, ``fsdp_estimator`` for FSDP2 (a
no-op on a model that is not sharded).
"""
from gradreg_fast.distributed.ddp import check_ddp, find_ddp, reach_outputs
from gradreg_fast.distributed.fsdp import (
    FSDP_DEFERRED_METHODS,
    FSDPDeferral,
    find_fsdp,
    fsdp_estimator,
    fsdp_rerun_passthrough,
)

__all__ = ["check_ddp", "find_ddp", "reach_outputs", "find_fsdp", "fsdp_estimator", "FSDPDeferral",
           "fsdp_rerun_passthrough", "FSDP_DEFERRED_METHODS"]
