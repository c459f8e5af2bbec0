"""Every penalty against two independent computations, in fp64 to 1e-9:

1. torch.func: per-sample Jacobians by vmap(jacrev) of a functional_call, parameter gradients by
   torch.func.grad of that whole expression (no autograd create_graph involved);
2. gradreg_fast.reference: explicit Python loops over classes with create_graph=True.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

import gradreg_fast as gr
from gradreg_fast.testing.zoo import SMALL as MODELS
from gradreg_fast.testing.zoo import make_small as make

TOL = dict(rtol=1e-9, atol=1e-9)
K = 5


def per_sample(model, params):
    """vmap over the batch of fn(single output function, x_i)."""
    def single(xi):
        return functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)
    return single


def func_penalty(kind, model, x, y, r=None, classes=None):
    """The penalty as a function of the parameters, built from torch.func only."""
    def value(params):
        f = per_sample(model, params)
        if kind == "doubleback":
            def loss_i(xi, yi):
                return F.cross_entropy(f(xi).unsqueeze(0), yi.unsqueeze(0))
            g = vmap(grad(loss_i))(x, y)
            return g.pow(2).flatten(1).sum(1).mean()
        if kind in ("frobreg", "jacreg"):
            h = f if kind == "frobreg" else (lambda xi: torch.softmax(f(xi), dim=0))
            J = vmap(jacrev(h))(x)  # (B, K, *x.shape[1:])
            return J.pow(2).flatten(1).sum(1).mean()
        J = vmap(jacrev(f))(x).flatten(2)  # (B, K, D)
        if kind == "spectreg":
            rows = torch.einsum("k,bkd->bd", r, J) if r.dim() == 1 else torch.einsum("bk,bkd->bd", r, J)
        else:
            c = y if kind == "onehot" else classes
            rows = J[torch.arange(J.shape[0]), c]
        return rows.pow(2).sum(1).mean()
    params = {k: v.detach() for k, v in model.named_parameters()}
    return value(params), grad(value)(params)


def param_grads(model, value):
    names = [n for n, _ in model.named_parameters()]
    gs = torch.autograd.grad(value, [p for _, p in model.named_parameters()], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for n, g, (_, p) in
            zip(names, gs, model.named_parameters(), strict=True)}


def assert_same(model, ours, expected_value, expected_grads):
    torch.testing.assert_close(ours, expected_value, **TOL)
    for name, g in param_grads(model, ours).items():
        torch.testing.assert_close(g, expected_grads[name], **TOL, msg=f"gradient of {name}")


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", ["doubleback", "frobreg", "jacreg", "onehot"])
def test_deterministic_penalties(model_name, kind):
    model, x, y = make(model_name, k=K, seed=hash((model_name, kind)) % 1000)
    value, grads = func_penalty(kind, model, x, y)
    assert_same(model, gr.penalty(kind, model, x, y), value, grads)
    ref = {"doubleback": lambda: gr.reference.doubleback(model, x, y),
           "frobreg": lambda: gr.reference.frobreg(model, x),
           "jacreg": lambda: gr.reference.jacreg(model, x),
           "onehot": lambda: gr.reference.onehot(model, x, y)}[kind]()
    assert_same(model, ref, value, grads)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("per_sample_r", [False, True])
def test_spectreg_explicit_projection(model_name, per_sample_r):
    model, x, y = make(model_name, k=K, seed=3)
    r = torch.randn((x.shape[0], K) if per_sample_r else (K,), dtype=x.dtype)
    value, grads = func_penalty("spectreg", model, x, y, r=r)
    assert_same(model, gr.penalty("spectreg", model, x, projection=r), value, grads)
    assert_same(model, gr.reference.spectreg(model, x, r), value, grads)


@pytest.mark.parametrize("per_sample_r", [False, True])
def test_spectreg_drawn_projections_match_generator(per_sample_r):
    """Drawn r: r_j from the counter-based stream at (seed, offset j), seed = draw_seed(generator)
    (regenerated inside the fused projection op, never stored), n_proj averaged; compared with
    torch.func on r_j materialized by the pure-PyTorch Philox reference."""
    from gradreg_fast.ops import draw_seed
    from gradreg_fast.reference.philox import projection_vectors
    model, x, _ = make("tanh", k=K, seed=4)
    n, B = 3, x.shape[0]
    ours = gr.penalty("spectreg", model, x, n_proj=n, per_sample=per_sample_r,
                      generator=torch.Generator().manual_seed(7))
    seed = draw_seed(torch.Generator().manual_seed(7))
    r = torch.stack([projection_vectors(B, K, seed, j, per_sample=per_sample_r, dtype=x.dtype, device=x.device)
                     .expand(B, K) for j in range(n)])
    assert r[0].std() > 0.5 and not torch.equal(r[0], r[1])   # real, distinct draws
    values = [func_penalty("spectreg", model, x, None, r=rj if per_sample_r else rj[0]) for rj in r]
    value = sum(v for v, _ in values) / n
    grads = {name: sum(g[name] for _, g in values) / n for name in values[0][1]}
    assert_same(model, ours, value, grads)
    assert_same(model, gr.reference.spectreg(model, x, r), value, grads)


def test_random_onehot_uses_generator_classes():
    model, x, _ = make("cnn", k=K, seed=5)
    ours = gr.penalty("random_onehot", model, x, generator=torch.Generator().manual_seed(11))
    classes = torch.randint(K, (x.shape[0],), generator=torch.Generator().manual_seed(11))
    value, grads = func_penalty("random_onehot", model, x, None, classes=classes)
    assert_same(model, ours, value, grads)
    assert_same(model, gr.reference.random_onehot(model, x, classes), value, grads)


def test_spectreg_is_unbiased_for_frobreg():
    """E_r ‖Jᵀr‖² = ‖J‖_F²: many projections average to FrobReg within 4 standard errors."""
    model, x, _ = make("mlp", k=K, seed=6)
    n = 4000
    draws = torch.randn(n, 1, K, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    per_draw = torch.stack([gr.penalty("spectreg", model, x, projection=r[0]).detach() for r in draws[:400]])
    frob = gr.penalty("frobreg", model, x).detach()
    se = per_draw.std() / per_draw.numel() ** 0.5
    assert abs(per_draw.mean() - frob) < 4 * se


def test_doubleback_custom_per_sample_loss():
    model, x, _ = make("mlp", k=1, seed=8)
    target = torch.randn(x.shape[0], 1, dtype=x.dtype)
    loss_fn = lambda out, t: (out - t).pow(2).sum(1)  # noqa: E731
    ours = gr.penalty("doubleback", model, x, target, loss_fn=loss_fn)
    ref = gr.reference.doubleback(model, x, target, loss_fn=loss_fn)
    torch.testing.assert_close(ours, ref, **TOL)
    for a, b in zip(param_grads(model, ours).values(), param_grads(model, ref).values(), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_baselines():
    model, x, _ = make("cnn", k=K, seed=9)
    logits = model(x)
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(gr.confidence_penalty(logits), (p * p.log()).sum(1).mean(), **TOL)
    torch.testing.assert_close(gr.confidence_penalty(logits), gr.reference.confidence_penalty(logits), **TOL)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    expected = 0.5 * sum((w.detach() ** 2).sum() for w in weights)
    torch.testing.assert_close(gr.weight_decay(model), expected, **TOL)
    torch.testing.assert_close(gr.weight_decay(model), gr.reference.weight_decay(model), **TOL)
    g = torch.autograd.grad(gr.weight_decay(model), weights)
    for w, gw in zip(weights, g, strict=True):
        torch.testing.assert_close(gw, w.detach(), **TOL)
