"""Peak memory of one measured call.

CUDA: torch.cuda.max_memory_allocated during the call minus what was allocated before it. CPU: the
allocator keeps no peak counter (and ru_maxrss is dominated by the interpreter's and torch's own
footprint), so the call runs under a TorchDispatchMode that sees every op output (forward, the
autograd engine's backward ops, an optimizer's) and counts each new tensor storage until it is freed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Bytes: the CUDA allocator's peak during ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the storages created under this mode.

    Every op output (forward, the autograd engine's backward ops, the optimizer's) is seen by the
    dispatcher; each new storage is counted until it is freed (a weak reference to the storage
    expires), so tensors autograd saves for the backward count for as long as they live.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _sweep(self):
        for ptr, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_meta:
                try:
                    st = t.untyped_storage()
                    ptr = st.data_ptr()
                except RuntimeError:  # opaque tensors (e.g. mkldnn) have no inspectable storage
                    continue
                if ptr and ptr not in self.live:
                    self.live[ptr] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def live_tensor_peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes: the peak of live tensor storage created during ``fn()`` (LiveTensorBytes)."""
    mode = LiveTensorBytes()
    with mode:
        fn()
    return mode.peak
