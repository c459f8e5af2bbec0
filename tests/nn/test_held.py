"""GradRegLoss(every=k, hold=True): the penalty's gradient g = ∇ λ·P computed on one call in k and added,
unscaled, to every call's gradient until the next (gradreg_fast.penalties.held). Checked against the
schedule written by hand with plain double backprop (fp64), for exact and the estimators that take
their gradients at the call, and the cases where nothing may be held."""
import pytest
import torch
import torch.nn.functional as F

import gradreg_fast as gr
from gradreg_fast.testing.zoo import make_case

LAM, EVERY = 0.3, 3


def _doubleback(model, x, y):
    """mean_b ||d l_b / d x_b||^2 by create_graph double backprop (no library code)."""
    xr = x.detach().clone().requires_grad_(True)
    out = model(xr)
    (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xr, create_graph=True)
    return g.pow(2).flatten(1).sum(1).mean()


def _by_hand(case, steps):
    """Per step: (loss value, parameter gradients) of base + held g, g = grad of LAM * P every EVERY steps
    (attention on the math kernel, which has a double backward, as the library's forward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return _by_hand_steps(case, steps)


def _by_hand_steps(case, steps):
    out, held, value = [], None, None
    for t in range(steps):
        torch.manual_seed(100 + t)   # dropout masks: the same as the library's run
        x = case.input()
        if t % EVERY == 0:
            pen = LAM * _doubleback(case.model, x, case.y)
            held, value = torch.autograd.grad(pen, case.params), pen.detach()
        torch.manual_seed(100 + t)
        base = F.cross_entropy(case.model(x), case.y)
        grads = [a + b for a, b in zip(torch.autograd.grad(base, case.params), held, strict=True)]
        out.append(((base + value).detach(), grads))
    return out


def _by_library(case, steps, method="exact"):
    crit = gr.GradRegLoss("doubleback", LAM, method=method, every=EVERY, hold=True)
    out = []
    for t in range(steps):
        for p in case.params:
            p.grad = None
        torch.manual_seed(100 + t)
        loss = crit(case.model, case.input(), case.y)
        loss.backward()
        assert crit.last_active == (t % EVERY == 0)
        out.append((loss.detach(), [p.grad.clone() for p in case.params]))
    return out


@pytest.mark.parametrize("name", ["smooth_mlp", "lenet", "resnet_bn_eval"])
def test_held_schedule_matches_the_schedule_by_hand(name):
    case = make_case(name)
    truth = _by_hand(case, 7)
    got = _by_library(make_case(name), 7)
    for (lt, gt), (lg, gg) in zip(truth, got, strict=True):
        torch.testing.assert_close(lg, lt, rtol=1e-10, atol=1e-12)
        for a, b in zip(gg, gt, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("method", ["hvp", "fd"])
def test_held_schedule_with_estimators_taken_at_the_call(method):
    """hvp (exact) and fd (within its bound) hold the same gradient as exact."""
    truth = _by_library(make_case("smooth_mlp"), 4)
    got = _by_library(make_case("smooth_mlp"), 4, method=method)
    tol = dict(rtol=1e-7, atol=1e-10) if method == "hvp" else dict(rtol=1e-3, atol=1e-6)
    for (lt, gt), (lg, gg) in zip(truth, got, strict=True):
        torch.testing.assert_close(lg, lt, rtol=1e-10, atol=1e-12)
        for a, b in zip(gg, gt, strict=True):
            torch.testing.assert_close(a, b, **tol)


def test_nothing_is_held_for_another_model_or_after_loading():
    """A held gradient is never added to a model it was not computed for, and is not in the checkpoint:
    such a call computes the penalty (and holds it)."""
    a, b = make_case("smooth_mlp"), make_case("smooth_mlp", seed=1)
    crit = gr.GradRegLoss("doubleback", LAM, every=EVERY, hold=True)
    crit(a.model, a.input(), a.y).backward()
    assert crit.last_active
    crit(a.model, a.input(), a.y).backward()
    assert not crit.last_active                 # held for a
    crit(b.model, b.input(), b.y).backward()
    assert crit.last_active                     # b: nothing held for it
    crit(b.model, b.input(), b.y).backward()   # call 3: on the schedule
    crit(b.model, b.input(), b.y).backward()
    assert not crit.last_active                 # call 4: held for b
    state = crit.state_dict()
    fresh = gr.GradRegLoss("doubleback", LAM, every=EVERY, hold=True)
    fresh.load_state_dict(state)
    assert fresh.calls == crit.calls and fresh.calls % EVERY != 0
    fresh(b.model, b.input(), b.y).backward()
    assert fresh.last_active


def test_hold_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="every=k"):
        gr.GradRegLoss("doubleback", LAM, hold=True)
    with pytest.raises(ValueError, match="reduction"):
        gr.GradRegLoss("doubleback", LAM, every=2, hold=True, reduction="none")
    with pytest.raises(TypeError, match="hold"):
        gr.GradRegLoss("doubleback", LAM, every=2, hold=1)
    case = make_case("smooth_mlp")
    loss = gr.GradRegLoss("doubleback", LAM, every=2, hold=True)(case.model, case.input(), case.y)
    with pytest.raises(RuntimeError, match="gr.penalty"):
        loss.backward(create_graph=True)


def test_hold_refuses_ddp(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        case = make_case("smooth_mlp")
        ddp = torch.nn.parallel.DistributedDataParallel(case.model)
        with pytest.raises(ValueError, match="DDP or FSDP2"):
            gr.GradRegLoss("doubleback", LAM, every=2, hold=True)(ddp, case.input(), case.y)
    finally:
        dist.destroy_process_group()


def test_hold_refuses_a_parameter_hook():
    """The held gradient is added on several calls: a Tensor.register_hook would run on it more than once."""
    case = make_case("smooth_mlp")
    case.params[0].register_hook(lambda g: 3.0 * g)
    with pytest.raises(ValueError, match="register_hook"):
        gr.GradRegLoss("doubleback", LAM, every=2, hold=True)(case.model, case.input(), case.y)


@pytest.mark.parametrize("name", ["resnet_bn_train", "vit_train", "smooth_mlp"])
def test_held_schedule_on_models_in_training_mode_and_fused(name):
    """BatchNorm with batch statistics, attention with dropout, and a model whose activations (and
    Linear + activation pairs) run the fused ops (gr.fuse, sharing the parameters): the same schedule as
    the one written by hand on the plain model."""
    truth = _by_hand(make_case(name), 5)
    case = make_case(name)
    if name == "smooth_mlp":
        case.model = gr.fuse(case.model, activations="all")
        assert any(type(m).__name__.startswith("Fused") for m in case.model.modules())
    got = _by_library(case, 5)
    for (lt, gt), (lg, gg) in zip(truth, got, strict=True):
        torch.testing.assert_close(lg, lt, rtol=1e-10, atol=1e-12)
        for a, b in zip(gg, gt, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_held_schedule_with_subsample():
    """subsample=0.5 with hold: the held gradient is that of the penalty on the call's random sub-batch
    (drawn from the loss's own generator, seed=), added on the calls until the next."""
    case = make_case("smooth_mlp")
    gen = torch.Generator().manual_seed(11)
    batch = case.input().shape[0]
    m = max(1, round(0.5 * batch))
    truth, held, value = [], None, None
    for t in range(5):
        x = case.input()
        if t % EVERY == 0:
            idx = torch.randperm(batch, generator=gen)[:m].sort().values
            pen = LAM * _doubleback(case.model, x[idx], case.y[idx])
            held, value = torch.autograd.grad(pen, case.params), pen.detach()
        base = F.cross_entropy(case.model(x), case.y)
        grads = [a + b for a, b in zip(torch.autograd.grad(base, case.params), held, strict=True)]
        truth.append(((base + value).detach(), grads))
    lib = make_case("smooth_mlp")
    crit = gr.GradRegLoss("doubleback", LAM, every=EVERY, hold=True, subsample=0.5, seed=11)
    for t, (lt, gt) in enumerate(truth):
        for p in lib.params:
            p.grad = None
        loss = crit(lib.model, lib.input(), lib.y)
        loss.backward()
        assert crit.last_active == (t % EVERY == 0)
        torch.testing.assert_close(loss.detach(), lt, rtol=1e-10, atol=1e-12)
        for p, b in zip(lib.params, gt, strict=True):
            torch.testing.assert_close(p.grad, b, rtol=1e-8, atol=1e-11)


def test_held_schedules_in_threads_are_independent():
    """Two threads, each with its model and loss, step at the same time: each gets the gradients it
    gets alone (calls are serialized, docs/threads.md; the held state belongs to its loss)."""
    import threading
    alone = [_by_library(make_case("smooth_mlp", seed=s), 6) for s in (0, 1)]
    cases = {s: make_case("smooth_mlp", seed=s) for s in (0, 1)}   # built here: make_case seeds torch
    results, errors = {}, []

    def work(s):
        try:
            results[s] = _by_library(cases[s], 6)
        except BaseException as exc:   # reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(s,)) for s in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for s in (0, 1):
        for (la, ga), (lb, gb) in zip(alone[s], results[s], strict=True):
            torch.testing.assert_close(lb, la, rtol=0, atol=0)
            for a, b in zip(ga, gb, strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=0)
