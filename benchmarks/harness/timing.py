"""One timer for every benchmark: median seconds per call, repetitions interleaved across variants,
so that drifts of the machine (load, clocks, caches) hit every variant alike.

On the CPU the clock is the process's CPU time (time.process_time: every thread of this process,
nothing of other processes), so a benchmark run beside other work on a shared machine is not
inflated by the time the scheduler gives to them; with one torch thread it equals wall time on an
idle machine. On a GPU: CUDA events."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

CPU_CLOCK = "time.process_time (CPU time of this process)"


def probe(fns: dict[str, Callable[[], object]], catch: type[BaseException] = Exception
          ) -> dict[str, BaseException]:
    """Call each function once (its first warm-up call); those that raise ``catch`` are removed from
    ``fns`` and returned with their exception."""
    failed = {}
    for name, fn in list(fns.items()):
        try:
            fn()
        except catch as exc:
            failed[name] = exc
            del fns[name]
    return failed


def _seconds(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds of ``calls`` consecutive calls: CUDA events on a GPU, the process's CPU time on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t = time.process_time()
    for _ in range(calls):
        fn()
    return time.process_time() - t


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, reps: int, *,
                     warmup: int = 0, calls: dict[str, int] | None = None, rotate: bool = True,
                     progress=None) -> dict[str, float]:
    """Median seconds per call of each function over ``reps`` rounds; each round times every function
    once, in the order of ``fns`` (``rotate``: shifted by one each round, so that no function always
    runs first). ``warmup`` untimed calls each before. ``calls[name]``: consecutive calls timed as one
    repetition, the time divided by their number (default 1). ``progress.update(1)`` per repetition."""
    device = torch.device(device)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps if names else 0):
        shift = rep % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            k = (calls or {}).get(name, 1)
            samples[name].append(_seconds(fns[name], k, device) / k)
            if progress is not None:
                progress.update(1)
    return {name: statistics.median(v) for name, v in samples.items()}
