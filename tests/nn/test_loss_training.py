"""GradRegLoss and gr.penalty in real training loops (issue 13): backend=, reduction=, checkpoint and
resume, grad mode (no_grad / inference_mode), argument checks at construction, logging attributes,
and the functional form for torch.func. Ground truths: gradreg_fast.reference (independent code,
one create_graph gradient per class, on one sample at a time for per-sample values) and
torch.nn.functional; all in fp64 on fresh random inputs."""
import io

import pytest
import torch
import torch.nn.functional as F

import gradreg_fast as gr
from gradreg_fast import reference
from gradreg_fast.ops._registry import IMPLEMENTATIONS
from gradreg_fast.testing.zoo import make_small as make

K = 5


def ref_penalty(kind, model, x, y, projection=None):
    """The batch-mean penalty by gradreg_fast.reference (independent of gradreg_fast.penalties)."""
    if kind == "doubleback":
        return reference.penalties.doubleback(model, x, y)
    if kind == "spectreg":
        return reference.penalties.spectreg(model, x, projection)
    if kind == "onehot":
        return reference.penalties.onehot(model, x, y)
    return getattr(reference.penalties, kind)(model, x)


def grads(value, model):
    return torch.autograd.grad(value, list(model.parameters()), allow_unused=True, materialize_grads=True,
                               retain_graph=True)


def assert_grads_close(a, b, **tol):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, **tol)


# ------------------------------------------------------------------------------------- 1. backend=
def test_backend_is_checked_at_construction():
    model, x, y = make("mlp", seed=1)
    with pytest.raises(ValueError, match="backend='bogus' is not a backend; choose one of reference"):
        gr.GradRegLoss("spectreg", 0.1, backend="bogus")
    with pytest.raises(ValueError, match="backend='bogus'"):
        gr.penalty("spectreg", model, x, backend="bogus")
    with pytest.raises(ValueError, match="fuse: backend='bogus'"):
        gr.fuse(model, backend="bogus")
    with pytest.raises(TypeError, match="backend must be a string"):
        gr.GradRegLoss("spectreg", 0.1, backend=1)
    unavailable = [b for b, s in gr.backends().items() if not s.available]
    for name in unavailable:   # here: cuda (no GPU); never a silent fallback
        with pytest.raises(ValueError, match=f"backend='{name}' cannot run here"):
            gr.GradRegLoss("frobreg", 0.1, backend=name)
        with pytest.raises(ValueError, match=f"backend='{name}' cannot run here"):
            gr.fuse(model, backend=name)


def test_backend_selects_the_ops_kernels(monkeypatch):
    """backend='reference' runs the penalty's sq_norm on the reference implementation, 'cpp' does
    not, whatever GRADREG_BACKEND says; the value and gradients agree across backends."""
    if not gr.backends()["cpp"].available:
        pytest.skip("the C++ extension is not built here")
    calls = []
    original = IMPLEMENTATIONS["sq_norm"]["reference"]
    monkeypatch.setitem(IMPLEMENTATIONS["sq_norm"], "reference",
                        lambda t: calls.append(1) or original(t))
    model, x, y = make("tanh", seed=2)
    monkeypatch.setenv("GRADREG_BACKEND", "cpp")
    p_ref = gr.penalty("frobreg", model, x, backend="reference")
    assert calls, "backend='reference' did not reach the reference sq_norm"
    calls.clear()
    monkeypatch.setenv("GRADREG_BACKEND", "reference")
    crit = gr.GradRegLoss("frobreg", 0.5, backend="cpp")
    loss = crit(model, x, y)
    assert not calls, "backend='cpp' fell back to the reference sq_norm"
    torch.testing.assert_close(crit.last_penalty, p_ref.detach(), rtol=1e-12, atol=0)
    truth = reference.penalties.frobreg(model, x)
    assert_grads_close(grads(loss, model), grads(F.cross_entropy(model(x), y) + 0.5 * truth, model),
                       rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- 2. reduction=
@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
@pytest.mark.parametrize("kind", ["doubleback", "spectreg", "frobreg", "jacreg", "onehot"])
def test_reduction_none_gives_per_sample_penalties_and_gradients(kind, method):
    """P_i and ∇_θ P_i against the reference penalty of the batch of one {x_i} (tanh MLP: samples do
    not interact); mean and sum are the vector's mean and sum."""
    model, x, y = make("tanh", batch=4, seed=3)
    r = torch.randn(K, dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    kw = {"projection": r} if kind == "spectreg" else {}
    per = gr.penalty(kind, model, x, y, method=method, reduction="none", **kw)
    assert per.shape == (4,)
    tol = dict(rtol=1e-9, atol=1e-12) if method != "fd" else dict(rtol=2e-4, atol=1e-8)
    for i in range(4):
        truth = ref_penalty(kind, model, x[i:i + 1], y[i:i + 1], r)
        torch.testing.assert_close(per[i].detach(), truth.detach(), rtol=1e-10, atol=1e-14)
        assert_grads_close(grads(per[i], model), grads(truth, model), **tol)
    weights = torch.rand(4, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    assert_grads_close(grads((weights * per).sum(), model),
                       [sum(w * g for w, g in zip(weights, gs, strict=True)) for gs in
                        zip(*[grads(ref_penalty(kind, model, x[i:i + 1], y[i:i + 1], r), model)
                              for i in range(4)], strict=True)], **tol)
    torch.testing.assert_close(gr.penalty(kind, model, x, y, method=method, reduction="sum", **kw),
                               per.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gr.penalty(kind, model, x, y, method=method, **kw), per.mean(),
                               rtol=1e-12, atol=0)


def test_reduction_none_jvp_is_the_per_sample_estimate():
    model, x, y = make("tanh", batch=4, seed=6)
    per = gr.penalty("frobreg", model, x, method="jvp", n_proj=3, reduction="none",
                     generator=torch.Generator().manual_seed(0))
    mean = gr.penalty("frobreg", model, x, method="jvp", n_proj=3, generator=torch.Generator().manual_seed(0))
    assert per.shape == (4,)
    torch.testing.assert_close(per.mean(), mean, rtol=1e-12, atol=0)
    assert_grads_close(grads(per.mean(), model), grads(mean, model), rtol=1e-12, atol=1e-14)


def test_loss_reduction_none_and_sum():
    model, x, y = make("cnn", batch=5, seed=7)
    per = gr.GradRegLoss("doubleback", 0.7, reduction="none")(model, x, y)
    truths = [F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) + 0.7 * reference.penalties.doubleback(
        model, x[i:i + 1], y[i:i + 1]) for i in range(5)]
    assert per.shape == (5,)
    torch.testing.assert_close(per.detach(), torch.stack(truths).detach(), rtol=1e-10, atol=1e-14)
    assert_grads_close(grads(per[2], model), grads(truths[2], model), rtol=1e-9, atol=1e-12)
    total = gr.GradRegLoss("doubleback", 0.7, reduction="sum")(model, x, y)
    torch.testing.assert_close(total.detach(), sum(truths).detach(), rtol=1e-10, atol=1e-14)


def test_reduction_errors():
    model, x, y = make("mlp", seed=8)
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'"):
        gr.penalty("frobreg", model, x, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        gr.GradRegLoss("frobreg", 1.0, reduction="batchmean")
    with pytest.raises(ValueError, match="reduction='none'.*subsample"):
        gr.GradRegLoss("frobreg", 1.0, reduction="none", subsample=0.5)
    with pytest.raises(ValueError, match="reduction='none'.*subsample"):
        gr.penalty("frobreg", model, x, reduction="none", subsample=0.5)


# ------------------------------------------------------------------------ 3. checkpoint and resume
def _run(steps, state=None, stop=None):
    """Train a small CNN with a seeded loss (spectreg, drawn projections, every=2); optionally
    start from a checkpoint ``state`` and/or stop after ``stop`` steps and return a checkpoint."""
    torch.manual_seed(0)
    model, x, y = make("cnn", batch=8, seed=9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    crit = gr.GradRegLoss("spectreg", 0.3, seed=123, every=2)
    if state is not None:
        buffer = io.BytesIO(state)
        ckpt = torch.load(buffer, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        crit.load_state_dict(ckpt["crit"])
    pens = []
    start = crit.calls
    for t in range(start, steps if stop is None else stop):
        xb = x + 0.1 * torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        crit(model, xb, y).backward()
        opt.step()
        pens.append((crit.last_active, float(crit.last_penalty)))
    if stop is not None:
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "crit": crit.state_dict()}, buffer)
        return pens, buffer.getvalue()
    return pens, [p.detach().clone() for p in model.parameters()]


def test_checkpoint_and_resume_give_the_uninterrupted_run():
    full_pens, full_params = _run(6)
    first, ckpt = _run(6, stop=3)
    rest, params = _run(6, state=ckpt)
    assert first + rest == full_pens
    for a, b in zip(params, full_params, strict=True):
        assert torch.equal(a, b)
    # the state: call counter and the owned generator
    crit = gr.GradRegLoss("spectreg", 0.3, seed=123)
    state = crit.state_dict()
    assert state["_extra_state"]["calls"] == 0 and state["_extra_state"]["generator_state"] is None
    model, x, y = make("mlp", seed=10)
    crit(model, x, y)
    state = crit.state_dict()["_extra_state"]
    assert state["calls"] == 1 and state["generator_state"] is not None


def test_load_state_dict_checks_the_seed():
    crit = gr.GradRegLoss("spectreg", 0.3, seed=1)
    other = gr.GradRegLoss("spectreg", 0.3, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(crit.state_dict())
    with pytest.raises(ValueError, match="seed= .* or generator="):
        gr.GradRegLoss("spectreg", 0.3, seed=1, generator=torch.Generator())


# ---------------------------------------------------------------------------------- 4. grad mode
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
def test_loss_value_under_no_grad_and_inference_mode(mode, method):
    model, x, y = make("cnn", seed=11)
    r = torch.randn(K, dtype=x.dtype, generator=torch.Generator().manual_seed(12))
    truth = F.cross_entropy(model(x), y) + 0.4 * reference.penalties.spectreg(model, x, r)
    gen = torch.Generator().manual_seed(3)
    crit = gr.GradRegLoss("spectreg", 0.4, method=method, every=3, projection=r, generator=gen)
    crit.calls = 1   # a call the schedule would skip: evaluation computes the penalty anyway
    before = gen.get_state()
    x_before = x.clone()
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        xv = x.clone()   # an inference tensor under inference_mode, as Lightning's batches are
        value = crit(model, xv, y.clone())
    assert not value.requires_grad
    torch.testing.assert_close(value, truth.detach(), rtol=1e-10, atol=1e-14)
    # evaluation leaves the training state as it was: last_* (last_penalty is in the state_dict), calls,
    # the generator (issue 24)
    assert crit.last_penalty is None and crit.last_base is None and not crit.last_active
    assert crit.calls == 1 and torch.equal(gen.get_state(), before)
    assert torch.equal(x, x_before)


def test_penalty_under_inference_mode_and_logits_form_error():
    model, x, y = make("mlp", seed=13)
    with torch.inference_mode():
        p = gr.penalty("doubleback", model, x.clone(), y)
    torch.testing.assert_close(p, reference.penalties.doubleback(model, x, y).detach(), rtol=1e-10, atol=1e-14)
    crit = gr.GradRegLoss("frobreg", 1.0)
    with torch.no_grad():
        logits = model(x)
        with pytest.raises(ValueError, match="gradients off.*no_grad"):
            crit(logits, y, inputs=x)


# ----------------------------------------------------------------- 5. arguments checked at construction
@pytest.mark.parametrize("args, kwargs, error, match", [
    (("spectreg", 0.1), {"generator": 0}, TypeError, "generator must be a torch.Generator"),
    (("spectreg", 0.1), {"n_proj": True}, ValueError, "n_proj must be a positive integer"),
    (("spectreg", 0.1), {"n_proj": 2.0}, ValueError, "n_proj must be a positive integer"),
    (("frobreg", 0.1), {"n_proj": 3}, ValueError, "n_proj=3 applies to kind='spectreg'"),
    (("spectreg", "0.1"), {}, TypeError, "lam must be a real number"),
    (("spectreg", True), {}, TypeError, "lam must be a real number"),
    (("spectreg", 0.1), {"fd_h": 1e-3}, ValueError, "fd_h and fd_scheme apply to method='fd' only"),
    (("spectreg", 0.1), {"method": "fd", "fd_h": -1.0}, ValueError, "fd_h must be a number in"),
    (("spectreg", 0.1), {"method": "fd", "fd_scheme": "backward"}, ValueError, "fd_scheme must be one of"),
    (("spectreg", 0.1), {"method": "jvp"}, ValueError, "method='jvp' .* serves frobreg, jacreg only"),
    (("frobreg", 0.1), {"per_sample": True}, ValueError, "per_sample=True applies to kind='spectreg'"),
    (("spectreg", 0.1), {"per_sample": 1}, TypeError, "per_sample must be True or False"),
    (("onehot", 0.1), {"loss_fn": F.cross_entropy}, ValueError, "loss_fn applies to kind='doubleback'"),
    (("spectreg", 0.1), {"projection": [1.0, 2.0]}, TypeError, "projection must be a floating tensor"),
    (("spectreg", 0.1), {"seed": "1"}, TypeError, "seed must be an int"),
    (("spectreg", 0.1), {"base": "ce"}, TypeError, "base must be a callable"),
])
def test_bad_arguments_raise_at_construction(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        gr.GradRegLoss(*args, **kwargs)
    penalty_kwargs = {k: v for k, v in kwargs.items() if k not in ("seed", "base")}
    if len(penalty_kwargs) == len(kwargs) and isinstance(args[1], float):
        model, x, y = make("mlp", seed=14)
        with pytest.raises(error, match=match):
            gr.penalty(args[0], model, x, y, **penalty_kwargs)


def test_non_scalar_base_fails_at_the_call_not_at_backward():
    model, x, y = make("mlp", seed=15)
    crit = gr.GradRegLoss("frobreg", 0.1, base=lambda out, t: F.cross_entropy(out, t, reduction="none"))
    with pytest.raises(ValueError, match="base must return a scalar with reduction='mean'"):
        crit(model, x, y)


# --------------------------------------------------------------------------------------- 6. logging
def test_logging_attributes_on_active_and_skipped_calls():
    model, x, y = make("tanh", seed=16)
    truth = reference.penalties.frobreg(model, x).detach()
    crit = gr.GradRegLoss("frobreg", 0.5, every=3)
    seen = []
    for t in range(6):
        xb = x if t % 3 == 0 else torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(t))
        loss = crit(model, xb, y)
        torch.testing.assert_close(crit.last_base, F.cross_entropy(model(xb), y).detach())
        seen.append(crit.last_active)
        # the unscaled P of the last active call (t = 0 or 3, both on x), never None, never 3·P
        torch.testing.assert_close(crit.last_penalty, truth, rtol=1e-10, atol=1e-14)
        expected = crit.last_base + (0.5 * 3 * truth if crit.last_active else 0)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-14)
    assert seen == [True, False, False] * 2
    off = gr.GradRegLoss("frobreg", 0.0)
    off(model, x, y)
    assert off.last_penalty is None and off.last_active is False


# ------------------------------------------------------------------------------ 8. functional form
@pytest.mark.parametrize("kind", ["doubleback", "spectreg", "frobreg", "jacreg", "onehot"])
def test_functional_penalty_composes_with_torch_func_grad(kind):
    model, x, y = make("cnn", seed=17)
    r = torch.randn(K, dtype=x.dtype, generator=torch.Generator().manual_seed(18))
    kw = {"projection": r} if kind == "spectreg" else {}
    params = {k: v.detach() for k, v in model.named_parameters()}
    g_func = torch.func.grad(lambda p: gr.functional_penalty(kind, model, p, x, y, **kw))(params)
    module_form = gr.penalty(kind, model, x, y, **kw)
    truth = ref_penalty(kind, model, x, y, r)
    torch.testing.assert_close(gr.functional_penalty(kind, model, params, x, y, **kw), truth.detach(),
                               rtol=1e-10, atol=1e-14)
    for name, a, b in zip(params, grads(module_form, model), grads(truth, model), strict=True):
        torch.testing.assert_close(g_func[name], a, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(g_func[name], b, rtol=1e-9, atol=1e-13)


def test_functional_penalty_per_sample_gradients_by_vmap():
    """vmap(grad(.)) over samples = the gradients of reduction='none' of the module form."""
    model, x, y = make("tanh", batch=4, seed=19)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return gr.functional_penalty("doubleback", model, p, xi.unsqueeze(0), yi.unsqueeze(0))
    per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    per = gr.penalty("doubleback", model, x, y, reduction="none")
    for i in range(4):
        for name, g in zip(params, grads(per[i], model), strict=True):
            torch.testing.assert_close(per_sample[name][i], g, rtol=1e-9, atol=1e-13)
    with pytest.raises(ValueError, match="needs projection="):
        gr.functional_penalty("spectreg", model, params, x)
    with pytest.raises(TypeError, match="params must be a dict"):
        gr.functional_penalty("frobreg", model, list(params.values()), x)
