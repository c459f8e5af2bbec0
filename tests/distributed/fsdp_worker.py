"""Worker for tests/distributed/test_fsdp.py, run as
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed/fsdp_worker.py OUT.json``.

The DDP worker's cases (tests/distributed/ddp_worker.py: the same fp64 MLP, data, call forms, two SGD steps and
the one-process references on the concatenated batch and on the halves, imported from there) with
the model sharded by FSDP2 instead: every Linear and the root wrapped in ``fully_shard`` (gloo,
CPU), each rank on its half of the batch. Configurations:

  default  fully_shard's defaults (reshard after forward, except the root)
  keep     reshard_after_forward=False everywhere
  bf16     MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32) on an fp32 model,
           compared with the fp64 reference (bf16 rounding, see test_fsdp.BF16_TOL)
  batchnorm  a BatchNorm1d (training mode, also sharded) after the first Linear: hvp's torch.func
           route; compared with the per-half reference (each rank normalizes its own half)

plus, with the default configuration: gradient accumulation over two micro-batches with
``set_requires_gradient_sync(False)`` on the first, a penalty computed and dropped without a
backward before an ordinary step, a penalty kept alive while only the cross-entropy is
differentiated, two penalties summed into one backward, a penalty differentiated after another
backward (must raise), and whether FSDP's settings and sharding are back as the user set them after
each step. Rank 0 writes, per case, the largest relative differences of the parameter
gradients (gathered with full_tensor) and loss values to OUT.json; test_fsdp.py asserts on them.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_worker as common  # make_model, data, objective, run_reference, ...
from ddp_worker import FORMS, LAM, SEED, STEPS, exit_worker, gr, rel


def make_bn_model() -> nn.Module:
    """ddp_worker's MLP with a BatchNorm1d (training mode) after the first Linear: the samples
    interact, so hvp takes its torch.func route and jvp refuses."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(common.D_IN, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, common.K)).to(common.DTYPE)


# the variants run DoubleBack (loss-gradient path) and FrobReg (every method, jvp included) only,
# to keep the test near 30 s on 2 cores; "default" and "bf16" run every kind
VARIANT_KINDS = ("doubleback", "frobreg")
CONFIGS = {
    "default": dict(forms=FORMS, dtype=torch.float64, shard={}, kinds=gr.KINDS),
    "keep": dict(forms=("loss",), dtype=torch.float64, shard={"reshard_after_forward": False},
                 kinds=VARIANT_KINDS),
    "bf16": dict(forms=("loss",), dtype=torch.float32, kinds=gr.KINDS,
                 shard={"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}),
    # batch statistics: each rank normalizes its half, so only the per-half reference applies
    "batchnorm": dict(forms=("loss",), dtype=torch.float64, shard={}, make=make_bn_model, kinds=VARIANT_KINDS),
}


def sharded_model(config: str) -> nn.Module:
    model = CONFIGS[config].get("make", common.make_model)().to(CONFIGS[config]["dtype"])
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.BatchNorm1d)):
            fully_shard(layer, **CONFIGS[config]["shard"])
    fully_shard(model, **CONFIGS[config]["shard"])
    return model


def full_grads(model: nn.Module) -> torch.Tensor:
    """The parameter gradients of the whole (unsharded) model, in fp64; 0 where a parameter has none
    (as ddp_worker.flat_grads: a penalty alone does not reach the output layer's bias)."""
    parts = []
    for p in model.parameters():
        g = p.grad
        if g is None:
            parts.append(torch.zeros(p.numel(), dtype=torch.float64))
            continue
        g = g.full_tensor() if isinstance(g, DTensor) else g
        parts.append(g.reshape(-1).to(torch.float64))
    return torch.cat(parts)


def settings(model: nn.Module) -> list:
    """FSDP's per-group settings the penalty defers, and whether each weight is sharded."""
    out = []
    for m in model.modules():
        state = getattr(m, "_get_fsdp_state", None)
        if state is None:
            continue
        for g in state()._fsdp_param_groups:
            out.append([bool(g.reduce_grads), bool(g.reshard_after_backward), g.post_forward_mesh_info is None])
    out.append([isinstance(p, DTensor) for p in model.parameters()])
    return out


def step_loop(model, config, form, kind, method, x, y, rank, world, before_step=None):
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    xs = xs.to(CONFIGS[config]["dtype"])
    gen = torch.Generator()
    grads, values, restored = [], [], True
    expected = settings(model)
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        if before_step is not None:
            before_step(model, xs, ys, gen, step)
        gen.manual_seed(SEED + step)  # the same draws on every rank (SpectReg's shared r)
        value = common.objective(form, kind, method, model, xs, ys, gen)
        value.backward()
        restored = restored and settings(model) == expected
        grads.append(full_grads(model))
        total = value.detach().to(torch.float64).clone()
        dist.all_reduce(total)
        values.append(total / world)
        common.sgd(model)
    return torch.stack(grads), torch.stack(values), restored


def compare(grads, values, restored, form, kind, method, x, y, rank, world, make=None):
    gathered = [torch.empty_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    if rank != 0:
        return None
    result = {"ranks_differ": rel(gathered[1], gathered[0]), "restored": restored}
    for name, halves in (("concat", False), ("halves", True)):
        ref_grads, ref_values = common.run_reference(form, kind, method, x, y, halves, make=make)
        result[f"grad_vs_{name}"] = rel(grads, ref_grads)
        result[f"value_vs_{name}"] = rel(values, ref_values)
    return result


def run_case(config, form, kind, method, x, y, rank, world):
    model = sharded_model(config)
    grads, values, restored = step_loop(model, config, form, kind, method, x, y, rank, world)
    return compare(grads, values, restored, form, kind, method, x, y, rank, world, make=CONFIGS[config].get("make"))


def run_dropped(method, x, y, rank, world):
    """A penalty computed and dropped without a backward must leave an ordinary step untouched."""
    def drop(model, xs, ys, gen, step):
        gen.manual_seed(SEED + step)
        p = gr.penalty("frobreg", model, xs, method=method, generator=gen)
        del p
    model = sharded_model("default")
    grads, values, restored = step_loop(model, "default", "loss", "doubleback", method, x, y, rank, world,
                                        before_step=drop)
    return compare(grads, values, restored, "loss", "doubleback", method, x, y, rank, world)


def run_accumulation(method, x, y, rank, world):
    """Two micro-batches per rank, the first with set_requires_gradient_sync(False): the reduced
    gradient equals one process on the whole batch (the mean of four quarter-batch objectives)."""
    model = sharded_model("default")
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    gen = torch.Generator()
    model.zero_grad(set_to_none=True)
    for i, (xm, ym) in enumerate(zip(xs.chunk(2), ys.chunk(2), strict=True)):
        model.set_requires_gradient_sync(i == 1)
        gen.manual_seed(SEED)
        (common.objective("loss", "doubleback", method, model, xm, ym, gen) / 2).backward()
    grads = full_grads(model)
    gathered = [torch.empty_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    if rank != 0:
        return None
    ref = common.make_model()
    total = 0
    for xq, yq in zip(x.chunk(2 * world), y.chunk(2 * world), strict=True):
        total = total + common.objective("loss", "doubleback", method, ref, xq, yq, gen) / (2 * world)
    total.backward()
    return {"ranks_differ": rel(gathered[1], gathered[0]), "grad_vs_concat": rel(grads, common.flat_grads(ref))}


def _gathered_vs(model, reference_grads, rank, world, restored):
    grads = full_grads(model)
    gathered = [torch.empty_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    if rank != 0:
        return None
    return {"ranks_differ": rel(gathered[1], gathered[0]), "grad_vs_concat": rel(grads, reference_grads()),
            "restored": restored}


def run_kept(method, x, y, rank, world):
    """A penalty computed and kept alive (e.g. for logging) while only the base loss is
    differentiated: that backward must still reduce-scatter, and the settings come back."""
    model = sharded_model("default")
    expected = settings(model)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    kept = gr.penalty("frobreg", model, xs, method=method, generator=torch.Generator().manual_seed(SEED))
    nn.functional.cross_entropy(model(xs), ys).backward()
    restored = settings(model) == expected

    def reference():
        ref = common.make_model()
        nn.functional.cross_entropy(ref(x), y).backward()
        return common.flat_grads(ref)
    result = _gathered_vs(model, reference, rank, world, restored)
    del kept
    return result


def run_stale(method, x, y, rank, world):
    """A penalty differentiated after another backward ended its deferral: the library's ValueError
    at that backward (FSDP has resharded the weights its graph reads)."""
    model = sharded_model("default")
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    stale = gr.penalty("frobreg", model, xs, method=method, generator=torch.Generator().manual_seed(SEED))
    nn.functional.cross_entropy(model(xs), ys).backward()
    try:
        stale.backward()
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def run_two_penalties(method, x, y, rank, world):
    """Two penalties, each with its own forward, summed and differentiated once."""
    model = sharded_model("default")
    expected = settings(model)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    gen = torch.Generator()

    def objective(m, xb, yb):
        gen.manual_seed(SEED)
        return (gr.penalty("frobreg", m, xb, method=method, generator=gen)
                + gr.GradRegLoss("doubleback", lam=LAM, method=method)(m, xb, yb))
    objective(model, xs, ys).backward()
    restored = settings(model) == expected

    def reference():   # the mean of the two ranks' objectives (fd's step is per half)
        ref = common.make_model()
        halves = [objective(ref, xh, yh) for xh, yh in zip(x.chunk(world), y.chunk(world), strict=True)]
        (sum(halves) / world).backward()
        return common.flat_grads(ref)
    return _gathered_vs(model, reference, rank, world, restored)


def local_vs_concat(x, y, rank, world):
    """How far one rank's own (unreduced) gradient is from the whole batch's: a test that passes
    only within a much smaller tolerance cannot be passing on unreduced gradients."""
    if rank != 0:
        return None
    xs, ys = x.chunk(world)[0], y.chunk(world)[0]
    local, _ = common.run_reference("loss", "doubleback", "exact", xs, ys, False)
    concat, _ = common.run_reference("loss", "doubleback", "exact", x, y, False)
    return rel(local, concat)


def main() -> None:
    out_path = sys.argv[1]
    rank, world = common.init_two_ranks()
    x, y = common.data()
    cases, extra = {}, {}

    def record(table, name, fn, *args):
        try:
            table[name] = fn(*args)
        except Exception as exc:  # recorded; test_fsdp.py decides what is expected
            table[name] = {"error": f"{type(exc).__name__}: {exc}"}

    for config, spec in CONFIGS.items():
        for form in spec["forms"]:
            for kind in spec["kinds"]:
                for method in gr.METHODS:
                    record(cases, f"{config}-{form}-{kind}-{method}", run_case, config, form, kind, method,
                           x, y, rank, world)
    for method in ("exact", "hvp", "fd"):
        record(extra, f"dropped-{method}", run_dropped, method, x, y, rank, world)
        record(extra, f"accumulation-{method}", run_accumulation, method, x, y, rank, world)
        record(extra, f"kept-{method}", run_kept, method, x, y, rank, world)
        record(extra, f"two_penalties-{method}", run_two_penalties, method, x, y, rank, world)
    for method in ("exact", "hvp"):
        record(extra, f"stale-{method}", run_stale, method, x, y, rank, world)
    extra["local_vs_concat"] = local_vs_concat(x, y, rank, world)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"cases": cases, "extra": extra, "methods": list(gr.METHODS), "kinds": list(gr.KINDS),
                       "torch": torch.__version__}, f, indent=1)
    exit_worker()


if __name__ == "__main__":
    main()
