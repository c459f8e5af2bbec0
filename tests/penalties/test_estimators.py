"""The estimators behind method= ("hvp", "fd", "jvp") and the schedules (every=, subsample=),
each validated against method="exact" (itself validated against torch.func in test_penalties.py).

Deterministic estimators: parameter-gradient cosine similarity (and, in fp64, elementwise error).
Random estimators: the mean over many draws within 3 standard errors (from the draws) of the exact
penalty and of its gradient (projected on the exact gradient's direction and on a fixed random
direction, so each check is a scalar mean with its own standard error).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradreg_fast as gr
from gradreg_fast.testing.zoo import make_small as make

K = 5
DETERMINISTIC = ["doubleback", "spectreg", "frobreg", "jacreg", "onehot", "random_onehot"]


def flat_grad(model, value):
    params = [p for p in model.parameters()]
    gs = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params, strict=True)])


def run(kind, model, x, y, method, seed=3, **kw):
    value = gr.penalty(kind, model, x, y, method=method, generator=torch.Generator().manual_seed(seed), **kw)
    return value.detach(), flat_grad(model, value)


def cosine(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()


# ---------------------------------------------------------------- hvp: exact, forward-over-reverse
@pytest.mark.parametrize("model_name", ["tanh", "cnn"])
@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_hvp_matches_exact_fp64(model_name, kind):
    model, x, y = make(model_name, k=K, seed=11)
    v0, g0 = run(kind, model, x, y, "exact")
    v1, g1 = run(kind, model, x, y, "hvp")
    torch.testing.assert_close(v1, v0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g0, rtol=1e-8, atol=1e-10)
    assert cosine(g1, g0) > 1 - 1e-12


@pytest.mark.parametrize("model_name", ["tanh", "cnn"])
@pytest.mark.parametrize("kind", ["doubleback", "spectreg", "frobreg"])
def test_hvp_fp32_cosine(model_name, kind):
    model, x, y = make(model_name, k=K, dtype=torch.float32, seed=12)
    _, g0 = run(kind, model, x, y, "exact")
    _, g1 = run(kind, model, x, y, "hvp")
    assert cosine(g1, g0) >= 0.999


# ---------------------------------------------------------------- fd: first-order passes only
@pytest.mark.parametrize("scheme", ["central", "forward"])
@pytest.mark.parametrize("model_name", ["tanh", "cnn"])
@pytest.mark.parametrize("kind", ["doubleback", "spectreg", "frobreg", "jacreg"])
def test_fd_fp32_cosine(model_name, kind, scheme):
    model, x, y = make(model_name, k=K, dtype=torch.float32, seed=13)
    v0, g0 = run(kind, model, x, y, "exact")
    v1, g1 = run(kind, model, x, y, "fd", fd_scheme=scheme)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-7)   # the value comes from g, not from differences
    assert cosine(g1, g0) >= 0.99


@pytest.mark.parametrize("model_name", ["tanh", "cnn"])
def test_fd_fp64_converges(model_name):
    """Central differences: O(h²) error, so the fp64 gradient is close to the exact one."""
    model, x, y = make(model_name, k=K, seed=14)
    _, g0 = run("doubleback", model, x, y, "exact")
    _, g1 = run("doubleback", model, x, y, "fd", fd_h=1e-4)
    assert (g1 - g0).norm() / g0.norm() < 1e-6
    _, g2 = run("doubleback", model, x, y, "fd", fd_h=1e-4, fd_scheme="forward")
    assert (g2 - g0).norm() / g0.norm() < 1e-3


def _square_model():
    torch.manual_seed(0)
    lin = nn.Linear(4, K).double()
    return nn.Sequential(lin), lin


def test_fd_zero_input_gradient_gives_zero_and_no_nan():
    """f(x) = W(x²) + b has ∂f/∂x = 0 at x = 0: samples with ‖g‖ = 0 contribute 0, no NaN."""
    class Sq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, K).double()

        def forward(self, x):
            return self.lin(x * x)
    torch.manual_seed(1)
    model = Sq()
    x = torch.randn(5, 4, dtype=torch.float64)
    x[0] = 0
    y = torch.randint(K, (5,))
    for scheme in ("central", "forward"):
        v0, g0 = run("doubleback", model, x, y, "exact")
        v1, g1 = run("doubleback", model, x, y, "fd", fd_scheme=scheme)
        assert torch.isfinite(v1) and torch.isfinite(g1).all()
        torch.testing.assert_close(v1, v0)
        assert cosine(g1, g0) > 0.999
    zeros = torch.zeros(5, 4, dtype=torch.float64)
    v, g = run("frobreg", model, zeros, None, "fd")
    assert v.item() == 0 and torch.isfinite(g).all() and g.abs().max().item() == 0


def test_fd_under_autocast_runs_in_fp32():
    model, x, y = make("cnn", k=K, dtype=torch.float32, seed=15)
    _, g0 = run("doubleback", model, x, y, "exact")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = gr.penalty("doubleback", model, x, y, method="fd", fd_scheme="forward")
    g1 = flat_grad(model, value)
    assert torch.isfinite(g1).all()
    assert cosine(g1, g0) >= 0.95  # g itself comes from the bf16 forward


# ---------------------------------------------------------------- replay: dropout masks, BatchNorm
def _dropout_bn_net():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3),
                         nn.Linear(16, K)).double().train()


@pytest.mark.parametrize("method", ["hvp", "fd"])
def test_dropout_masks_replayed_and_buffers_untouched(method):
    model = _dropout_bn_net()
    x = torch.randn(8, 12, dtype=torch.float64)
    y = torch.randint(K, (8,))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    v0, g0 = run("frobreg", model, x, y, "exact")
    buffers_after_exact = [b.clone() for b in model.buffers()]
    model.load_state_dict(start)
    torch.manual_seed(5)  # the same dropout mask for the caller's forward
    v1, g1 = run("frobreg", model, x, y, method)
    for a, b in zip(model.buffers(), buffers_after_exact, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the re-runs updated no statistics
    torch.testing.assert_close(v1, v0, rtol=1e-12, atol=1e-14)
    if method == "hvp":
        torch.testing.assert_close(g1, g0, rtol=1e-8, atol=1e-10)
    else:  # BatchNorm couples the samples: per-sample differences are an approximation
        assert cosine(g1, g0) > 0.99


# ---------------------------------------------------------------- jvp: forward-mode Hutchinson
def _mean_and_se(samples):
    s = torch.stack(samples).double()
    return s.mean(0), s.std(0) / s.shape[0] ** 0.5


@pytest.mark.parametrize("kind", ["frobreg", "jacreg"])
def test_jvp_unbiased_value_and_gradient(kind):
    model, x, y = make("tanh", k=K, seed=16)
    v0, g0 = run(kind, model, x, y, "exact")
    direction = torch.randn(g0.shape, generator=torch.Generator().manual_seed(0), dtype=g0.dtype)
    gen = torch.Generator().manual_seed(1)
    values, along, across = [], [], []
    for _ in range(250):
        value = gr.penalty(kind, model, x, y, method="jvp", generator=gen)
        g = flat_grad(model, value)
        values.append(value.detach())
        along.append(g @ g0 / g0.norm())
        across.append(g @ direction)
    for samples, expected in ((values, v0), (along, g0.norm()), (across, g0 @ direction)):
        mean, se = _mean_and_se(samples)
        assert abs(mean - expected) < 3 * se, (mean, expected, se)
    assert _mean_and_se(values)[1] < 0.2 * v0  # the checks have power: a wrong estimator fails them
    assert _mean_and_se(along)[1] < 0.2 * g0.norm()


def test_jvp_n_proj_averages_draws():
    model, x, y = make("cnn", k=K, seed=17)
    many = gr.penalty("frobreg", model, x, method="jvp", n_proj=3, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    singles = [gr.penalty("frobreg", model, x, method="jvp", generator=gen).detach() for _ in range(3)]
    torch.testing.assert_close(many.detach(), sum(singles) / 3)


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("method", ["exact", "fd"])
def test_every_k_is_unbiased_over_k_calls(method):
    """every=k: k·P on one call in k, nothing on the others: the k-call average is P (exactly)."""
    model, x, y = make("cnn", k=K, seed=18)
    k = 3
    crit = gr.GradRegLoss("doubleback", lam=2.0, method=method, every=k)
    plain = gr.GradRegLoss("doubleback", lam=2.0, method=method)
    expected = flat_grad(model, plain(model, x, y))
    grads, pens, active = [], [], []
    for _ in range(2 * k):
        grads.append(flat_grad(model, crit(model, x, y)))
        pens.append(crit.last_penalty)
        active.append(crit.last_active)
    assert active == [True, False, False] * 2
    # last_penalty: the unscaled P of the last active call, kept through the skipped calls
    for pen in pens:
        torch.testing.assert_close(pen, plain.last_penalty)
    torch.testing.assert_close(sum(grads[:k]) / k, expected)
    assert crit.calls == 2 * k


def test_every_in_penalty_needs_step():
    model, x, y = make("mlp", k=K, seed=19)
    with pytest.raises(ValueError, match="step="):
        gr.penalty("doubleback", model, x, y, every=2)
    p = gr.penalty("doubleback", model, x, y)
    torch.testing.assert_close(gr.penalty("doubleback", model, x, y, every=2, step=4), 2 * p)
    assert gr.penalty("doubleback", model, x, y, every=2, step=3).item() == 0


@pytest.mark.parametrize("form", ["model", "logits"])
def test_subsample_unbiased(form):
    model, x, y = make("tanh", batch=8, k=K, seed=20)
    v0, g0 = run("frobreg", model, x, y, "exact")
    direction = torch.randn(g0.shape, generator=torch.Generator().manual_seed(0), dtype=g0.dtype)
    gen = torch.Generator().manual_seed(2)
    crit = gr.GradRegLoss("frobreg", lam=1.0, base=lambda out, y: out.sum() * 0, subsample=0.25, generator=gen)
    values, along, across = [], [], []
    for _ in range(200):
        if form == "model":
            loss = crit(model, x, y)
        else:
            xr = x.clone().requires_grad_(True)
            loss = crit(model(xr), y, inputs=xr)
        g = flat_grad(model, loss)
        values.append(crit.last_penalty)
        along.append(g @ g0 / g0.norm())
        across.append(g @ direction)
    for samples, expected in ((values, v0), (along, g0.norm()), (across, g0 @ direction)):
        mean, se = _mean_and_se(samples)
        assert abs(mean - expected) < 3 * se, (mean, expected, se)
        assert se > 0  # the sub-batches differ


def test_subsample_penalty_uses_a_sub_batch():
    model, x, y = make("mlp", batch=8, k=K, seed=21)
    idx = gr.penalties.schedules.subset(8, 0.5, torch.Generator().manual_seed(9), x.device)
    assert idx.numel() == 4
    ours = gr.penalty("doubleback", model, x, y, subsample=0.5, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, gr.penalty("doubleback", model, x[idx], y[idx]))


# ---------------------------------------------------------------- GradRegLoss with the estimators
@pytest.mark.parametrize("method", ["hvp", "fd"])
def test_gradregloss_methods_match_exact(method):
    model, x, y = make("cnn", k=K, seed=22)
    g0 = flat_grad(model, gr.GradRegLoss("spectreg", 0.5, projection=torch.ones(K, dtype=x.dtype))(model, x, y))
    crit = gr.GradRegLoss("spectreg", 0.5, method=method, projection=torch.ones(K, dtype=x.dtype))
    g1 = flat_grad(model, crit(model, x, y))
    assert cosine(g1, g0) > 1 - 1e-9


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kind", ["doubleback", "spectreg", "onehot"])
def test_jvp_refuses_other_penalties(kind):
    model, x, y = make("mlp", k=K, seed=23)
    with pytest.raises(ValueError, match="frobreg, jacreg only.*'exact', 'hvp' or 'fd'"):
        gr.penalty(kind, model, x, y, method="jvp")


@pytest.mark.parametrize("method", ["hvp", "fd", "jvp"])
def test_logits_form_needs_the_model(method):
    model, x, y = make("mlp", k=K, seed=24)
    crit = gr.GradRegLoss("frobreg", 1.0, method=method)
    xr = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"crit\(model, x, y\)"):
        crit(model(xr), y, inputs=xr)


def test_fd_takes_any_callable_hvp_jvp_need_a_module():
    """Finite differences need only the callable. hvp and jvp differentiate the model functionally
    (torch.func over its named parameters): given a plain function they refuse, naming the methods
    that take one (reverse-mode through a forward-mode tangent, which a function would allow, is
    wrong on LayerNorm and softmax, see test_conformance.py)."""
    model, x, y = make("mlp", k=K, seed=25)
    _, g0 = run("doubleback", model, x, y, "exact")
    g1 = flat_grad(model, gr.penalty("doubleback", lambda z: model(z), x, y, method="fd"))
    assert cosine(g1, g0) > 0.999
    for method, kind in (("hvp", "doubleback"), ("jvp", "frobreg")):
        with pytest.raises(ValueError, match="nn.Module.*method='exact' or method='fd'"):
            gr.penalty(kind, lambda z: model(z), x, y, method=method)


@pytest.mark.parametrize("bad", [dict(fd_h=0.0), dict(fd_h=float("nan")), dict(fd_scheme="backward")])
def test_bad_fd_options(bad):
    model, x, y = make("mlp", k=K, seed=26)
    with pytest.raises(ValueError, match="fd_h|fd_scheme"):
        gr.penalty("doubleback", model, x, y, method="fd", **bad)


@pytest.mark.parametrize("bad", [dict(every=0), dict(every=1.5), dict(subsample=0.0), dict(subsample=1.5)])
def test_bad_schedules(bad):
    with pytest.raises(ValueError, match="every|subsample"):
        gr.GradRegLoss("doubleback", 1.0, **bad)
