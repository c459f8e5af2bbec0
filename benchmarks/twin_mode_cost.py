"""What the twin mode (gradreg_fast._twins) costs on the exact path: one GradRegLoss(method='exact') step
(forward, penalty, backward) on the zoo's LeNet and ResNet, batch 50, one thread, CPU time
(time.thread_time), three variants interleaved: "no twins" (the forward under the attention context
only: no mode, no detection; the floor), "as shipped" (the mode only for models that need it, found
by a module scan and a walk of the forward's graph), and "mode forced on" for every forward (what a
model that needs the twin pays; before the detection, every model paid it).

    python benchmarks/twin_mode_cost.py [--reps 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradreg_fast as gr
from gradreg_fast import _twins
from gradreg_fast.nn import loss as loss_module
from gradreg_fast.penalties import core
from gradreg_fast.testing import zoo


def _step(crit, model, x, y):
    model.zero_grad(set_to_none=True)
    crit(model, x, y).backward()


shipped = loss_module.run_forward


def _floor(model, x, method, model_kwargs=None):
    with core.math_attention():
        return model(x, **(model_kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = {"lenet": (zoo.LeNet(), torch.randn(50, 1, 28, 28)),
             "resnet": (zoo.ResNet(), torch.randn(50, 3, 32, 32))}
    for name, (model, x) in cases.items():
        y = torch.randint(zoo.K, (50,))
        crit = gr.GradRegLoss("doubleback", 0.1, method="exact")
        times = {"no twins": [], "as shipped": [], "mode forced on": []}
        for _ in range(3):
            _step(crit, model, x, y)
        for _ in range(args.reps):
            for variant in times:
                _twins.FORCE = variant == "mode forced on"
                loss_module.run_forward = _floor if variant == "no twins" else shipped
                t0 = time.thread_time()
                _step(crit, model, x, y)
                times[variant].append(time.thread_time() - t0)
        _twins.FORCE, loss_module.run_forward = False, shipped
        floor = statistics.median(times["no twins"])
        print(f"{name}: " + ", ".join(f"{v} {statistics.median(t) * 1e3:.2f} ms ({statistics.median(t) / floor:.3f}x)"
                                      for v, t in times.items()) + f" (median of {args.reps}, one thread, thread_time)")


if __name__ == "__main__":
    main()
