"""GradRegLoss: both call forms, the logged parts, and a short training run in which the loss falls."""
import pytest
import torch
import torch.nn.functional as F

import gradreg_fast as gr
from gradreg_fast.testing.zoo import make_small as make


def test_value_is_base_plus_lambda_penalty():
    model, x, y = make("cnn", seed=1)
    crit = gr.GradRegLoss("doubleback", lam=0.5)
    loss = crit(model, x, y)
    base = F.cross_entropy(model(x), y)
    pen = gr.penalty("doubleback", model, x, y)
    torch.testing.assert_close(loss, base + 0.5 * pen, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(crit.last_base, base.detach())
    torch.testing.assert_close(crit.last_penalty, pen.detach())
    assert not crit.last_base.requires_grad and not crit.last_penalty.requires_grad


@pytest.mark.parametrize("kind", gr.KINDS)
def test_two_call_forms_give_the_same_gradients(kind):
    model, x, y = make("tanh", seed=2)
    params = list(model.parameters())
    crit = gr.GradRegLoss(kind, lam=0.3, projection=torch.randn(5, dtype=x.dtype)) if kind == "spectreg" \
        else gr.GradRegLoss(kind, lam=0.3, generator=torch.Generator().manual_seed(0))
    g1 = torch.autograd.grad(crit(model, x, y), params)
    if kind == "random_onehot":
        crit.penalty_options["generator"] = torch.Generator().manual_seed(0)
    xr = x.clone().requires_grad_(True)
    g2 = torch.autograd.grad(crit(model(xr), y, inputs=xr), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lam_zero_skips_penalty():
    model, x, y = make("mlp", seed=3)
    crit = gr.GradRegLoss("frobreg", lam=0.0)
    torch.testing.assert_close(crit(model, x, y), F.cross_entropy(model(x), y))
    assert crit.last_penalty is None


@pytest.mark.parametrize("form", ["model", "logits"])
@pytest.mark.parametrize("kind", ["doubleback", "spectreg", "frobreg", "jacreg"])
def test_training_loop_loss_falls(form, kind):
    torch.manual_seed(0)
    model, x, y = make("cnn", batch=32, dtype=torch.float32, seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    crit = gr.GradRegLoss(kind, lam=0.1, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        if form == "model":
            loss = crit(model, x, y)
        else:
            xr = x.clone().requires_grad_(True)
            loss = crit(model(xr), y, inputs=xr)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_custom_base_loss_for_regression():
    model, x, _ = make("mlp", k=1, seed=5)
    target = torch.randn(x.shape[0], 1, dtype=x.dtype)
    crit = gr.GradRegLoss("spectreg", lam=0.1, base=F.mse_loss)
    loss = crit(model, x, target)
    assert loss.shape == () and torch.isfinite(loss)
    assert crit.last_base.item() == pytest.approx(F.mse_loss(model(x), target).item())
