"""1000 training steps with each method on a tiny model: no memory held across steps, the caller's
x untouched, bitwise reproducible with a seeded generator.

Memory held: torch has no allocator statistics for the CPU, so the profiler's memory events are
summed over a window of steps (allocations minus frees = the change of memory held). In steady
state a window adds nothing; anything retained per step shows in every window, byte-exact
(test_window_detects_a_leak). Two consecutive windows are measured around step 100 and around
step 1000 (one-off lazy allocations show in one window at most), and the number of live tensor
objects (gc) is the same at step 100 and step 1000.
"""
import gc

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import gradreg_fast as gr
from method_matrix import serves

STEPS, WINDOW, REPRO_STEPS = 1000, 10, 100


def _kind(method):
    return "spectreg" if serves("spectreg", method) else "frobreg"  # both draw random numbers


class Run:
    """A tiny MLP trained with GradRegLoss and SGD; the caller's x is a leaf that requires grad
    with a .grad of its own, to check none of it is touched."""

    def __init__(self, method, seed=0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(8, 5, generator=g).requires_grad_(True)
        self.x.grad = torch.full_like(self.x, 7.0)
        self.y = torch.randint(3, (8,), generator=g)
        self.crit = gr.GradRegLoss(_kind(method), lam=0.1, method=method,
                                   generator=torch.Generator().manual_seed(seed + 2))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.losses = []

    def step(self, keep=None):
        self.opt.zero_grad(set_to_none=True)
        loss = self.crit(self.model, self.x, self.y)
        loss.backward(inputs=list(self.model.parameters()))
        self.opt.step()
        self.losses.append(loss.item())
        if len(self.losses) == REPRO_STEPS:
            self.snapshot = [p.detach().clone() for p in self.model.parameters()]
        if keep is not None:
            keep.append(loss)  # a deliberate leak: the loss and its whole graph

    def held_bytes(self, steps, keep=None):
        """Change of memory held over ``steps`` steps (profiler allocation minus free events)."""
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(steps):
                self.step(keep)
        return sum(e.self_cpu_memory_usage for e in prof.key_averages())


def _growth(run) -> int:
    """Bytes held more after each of two consecutive windows (the smaller of the two): a per-step
    leak shows in both, a one-off lazy allocation (seen after other tests ran) in one at most."""
    run.held_bytes(1)  # the profiler's own first-use allocations
    return min(run.held_bytes(WINDOW - 1), run.held_bytes(WINDOW))


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.slow      # 12-60 s per method (measured with --durations); CI runs it, scripts/test.sh --fast skips it
@pytest.mark.parametrize("method", list(gr.METHODS))
def test_thousand_steps(method):
    torch.set_num_threads(1)
    run = Run(method)
    x0, grad0 = run.x.detach().clone(), run.x.grad.clone()
    for _ in range(100 - 2 * WINDOW):
        run.step()
    early = _growth(run)
    tensors_early = _live_tensors()
    while len(run.losses) < STEPS - 2 * WINDOW:
        run.step()
    late = _growth(run)
    tensors_late = _live_tensors() - len(run.snapshot)  # the step-100 weights kept for the repro check
    assert len(run.losses) == STEPS
    assert early <= 0 and late <= 0, (f"memory held grew every step: {early} B around step 100, {late} B around "
                                      "step 1000")
    assert tensors_late <= tensors_early, f"live tensors {tensors_early} at step 100, {tensors_late} at 1000"
    # the caller's x, x.grad and requires_grad are untouched
    assert torch.equal(run.x.detach(), x0) and torch.equal(run.x.grad, grad0) and run.x.requires_grad
    assert run.x.is_leaf
    assert all(v == v for v in run.losses)
    # bitwise reproducible: a second run with the same seeds gives the same losses and weights
    # (over its first REPRO_STEPS steps, to keep the test fast)
    again = Run(method)
    for _ in range(REPRO_STEPS):
        again.step()
    assert again.losses == run.losses[:REPRO_STEPS]
    for a, b in zip(again.model.parameters(), run.snapshot, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", list(gr.METHODS))
def test_caller_x_without_grad_stays_so(method):
    """The common case: x does not require grad; after training steps with a plain backward it
    still does not, has no .grad, and holds the same values."""
    run = Run(method)
    x = run.x.detach().clone()
    x0 = x.clone()
    for _ in range(5):
        run.opt.zero_grad()
        run.crit(run.model, x, run.y).backward()
        run.opt.step()
    assert not x.requires_grad and x.grad is None and x.is_leaf
    assert torch.equal(x, x0)


def test_window_detects_a_leak():
    """The measure is not vacuous: keeping each step's loss alive (after backward has freed its
    graph's buffers, only the 4-byte scalar itself) shows up, byte-exact."""
    run = Run("exact")
    for _ in range(20):
        run.step()
    assert _growth(run) <= 0
    kept = []
    leaked = min(run.held_bytes(WINDOW, keep=kept), run.held_bytes(WINDOW, keep=kept))
    assert leaked >= 4 * WINDOW, leaked  # at least each kept loss's own 4-byte storage
