"""GAN penalties (issue 15): R1 (and R2 = R1 on generated data) and WGAN-GP through gr.penalty, every
estimator that applies, against torch-only fp64 references on fresh random inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradreg_fast as gr
from gradreg_fast import reference

DT = torch.float64


class SmallD(nn.Module):
    """A tiny smooth critic (conv, softplus, linear) with output (B,) or (B, 1)."""

    def __init__(self, squeeze: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, 1, 1)
        self.fc = nn.Linear(3 * 4 * 4, 1)
        self.squeeze = squeeze

    def forward(self, x):
        out = self.fc(F.softplus(self.conv(x)).flatten(1))
        return out.squeeze(1) if self.squeeze else out


def _setup(seed: int, squeeze: bool = False):
    torch.manual_seed(seed)
    D = SmallD(squeeze).to(DT)
    g = torch.Generator().manual_seed(100 + seed)
    real = torch.randn(5, 2, 4, 4, generator=g, dtype=DT)
    fake = 0.7 * torch.randn(5, 2, 4, 4, generator=g, dtype=DT) - 0.2
    return D, real, fake


def _grads(value, D):
    return torch.autograd.grad(value, list(D.parameters()), allow_unused=True, materialize_grads=True)


def _close(got, want, rtol):
    # a parameter whose exact gradient is 0 (a bias the input gradient does not depend on) gets fd's
    # fp64 rounding from its ± points (~1e-15 of the largest gradient): the absolute floor is 1e-12 of it
    floor = 1e-12 * max(float(b.abs().max()) for b in want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=max(rtol * float(b.abs().max()), floor, 1e-16))


def _rtol(method):
    return 1e-4 if method == "fd" else 1e-9


@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
@pytest.mark.parametrize("squeeze", [False, True])
def test_r1_matches_reference(method, squeeze):
    D, real, fake = _setup(1, squeeze)
    real0 = real.clone()
    for x in (real, fake):        # R1 on real data, R2 on generated data: the same kind
        want = reference.r1(D, x)
        got = gr.penalty("r1", D, x, method=method)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        _close(_grads(got, D), _grads(want, D), _rtol(method))
    assert torch.equal(real, real0) and not real.requires_grad


@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
@pytest.mark.parametrize("variant", [dict(), dict(one_sided=True, target_norm=0.05), dict(target_norm=0.3)])
def test_wgan_gp_matches_reference(method, variant):
    D, real, fake = _setup(2)
    real0, fake0 = real.clone(), fake.clone()
    eps = torch.rand(real.shape[0], generator=torch.Generator().manual_seed(7), dtype=DT)
    want = reference.wgan_gp(D, real, fake, eps, **variant)
    got = gr.penalty("wgan_gp", D, real, fake=fake, method=method, generator=torch.Generator().manual_seed(7),
                     **variant)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    gw = _grads(want, D)
    assert max(float(t.abs().max()) for t in gw) > 0      # not a degenerate (all-zero) comparison
    _close(_grads(got, D), gw, _rtol(method))
    assert torch.equal(real, real0) and torch.equal(fake, fake0)


def test_wgan_gp_one_sided_is_zero_below_target():
    D, real, fake = _setup(3)
    gen = torch.Generator().manual_seed(0)
    p = gr.penalty("wgan_gp", D, real, fake=fake, one_sided=True, target_norm=1e3, generator=gen)
    assert float(p.detach()) == 0.0
    assert all(float(g.abs().max()) == 0 for g in _grads(p, D))


@pytest.mark.parametrize("method", ["exact", "hvp", "fd"])
def test_wgan_gp_per_sample_weights(method):
    """reduction='none': ∇θ Σ w_i P_i equals the weighted sum of per-sample reference gradients."""
    D, real, fake = _setup(4)
    eps = torch.rand(real.shape[0], generator=torch.Generator().manual_seed(3), dtype=DT)
    w = torch.rand(real.shape[0], generator=torch.Generator().manual_seed(9), dtype=DT) + 0.5
    p = gr.penalty("wgan_gp", D, real, fake=fake, method=method, reduction="none",
                   generator=torch.Generator().manual_seed(3))
    want_vals = torch.stack([reference.wgan_gp(D, real[i:i + 1], fake[i:i + 1], eps[i:i + 1])
                             for i in range(real.shape[0])])
    torch.testing.assert_close(p.detach(), want_vals.detach(), rtol=1e-12, atol=0)
    _close(_grads((w * p).sum(), D), _grads((w * want_vals).sum(), D), _rtol(method))


def test_every_k_lazy_schedule():
    """StyleGAN2's lazy R1: every=k gives k·P on steps t % k == 0 and a zero (no work) otherwise."""
    D, real, _ = _setup(5)
    base = gr.penalty("r1", D, real)
    torch.testing.assert_close(gr.penalty("r1", D, real, every=16, step=32), 16 * base)
    assert float(gr.penalty("r1", D, real, every=16, step=3)) == 0.0
    with pytest.raises(ValueError, match="step="):
        gr.penalty("r1", D, real, every=16)


def test_interpolation_draw_and_fake_gradient():
    """ε comes from the caller's generator (same seed, same penalty); a fake that requires grad (the
    generator's output) receives the penalty's gradient, as from the plain double backprop."""
    D, real, fake = _setup(6)
    a = gr.penalty("wgan_gp", D, real, fake=fake, generator=torch.Generator().manual_seed(11))
    b = gr.penalty("wgan_gp", D, real, fake=fake, generator=torch.Generator().manual_seed(11))
    c = gr.penalty("wgan_gp", D, real, fake=fake, generator=torch.Generator().manual_seed(12))
    assert float(a) == float(b) and float(a) != float(c)
    eps = torch.rand(real.shape[0], generator=torch.Generator().manual_seed(11), dtype=DT).reshape(-1, 1, 1, 1)
    f_ref = fake.clone().requires_grad_(True)
    xh = f_ref + eps * (real - f_ref)
    (g,) = torch.autograd.grad(D(xh).sum(), xh, create_graph=True)
    want = (g.flatten(1).norm(dim=1) - 1).pow(2).mean()
    (want_f,) = torch.autograd.grad(want, f_ref)
    for method in ("exact", "hvp"):
        f = fake.clone().requires_grad_(True)
        p = gr.penalty("wgan_gp", D, real, fake=f, method=method, generator=torch.Generator().manual_seed(11))
        (got_f,) = torch.autograd.grad(p, f)
        torch.testing.assert_close(got_f, want_f, rtol=1e-9, atol=1e-12)


def test_gan_errors_name_the_fix():
    D, real, fake = _setup(7)
    y = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="fake="):
        gr.penalty("wgan_gp", D, real)
    with pytest.raises(ValueError, match="R2 is kind='r1'"):
        gr.penalty("r1", D, real, fake=fake)
    with pytest.raises(ValueError, match="target_norm and one_sided apply to kind='wgan_gp'"):
        gr.penalty("r1", D, real, target_norm=2.0)
    with pytest.raises(ValueError, match="target_norm must be"):
        gr.penalty("wgan_gp", D, real, fake=fake, target_norm=-1.0)
    with pytest.raises(TypeError, match="one_sided must be"):
        gr.penalty("wgan_gp", D, real, fake=fake, one_sided=1)
    with pytest.raises(ValueError, match="fake must match x"):
        gr.penalty("wgan_gp", D, real, fake=fake[:2])
    with pytest.raises(TypeError, match="fake must be a torch.Tensor"):
        gr.penalty("wgan_gp", D, real, fake=fake.numpy())
    with pytest.raises(ValueError, match="y does not apply"):
        gr.penalty("r1", D, real, y)
    with pytest.raises(ValueError, match="one score per sample"):
        gr.penalty("r1", lambda x: D(x).repeat(1, 2), real)
    with pytest.raises(ValueError, match="method='exact', 'hvp' or 'fd'"):
        gr.penalty("r1", D, real, method="jvp")
    with pytest.raises(ValueError, match="gr.penalty"):
        gr.GradRegLoss("r1", lam=1.0)
    with pytest.raises(ValueError, match="gr.penalty"):
        gr.functional_penalty("r1", D, dict(D.named_parameters()), real)


def test_no_grad_returns_detached_value():
    D, real, fake = _setup(8)
    want = gr.penalty("wgan_gp", D, real, fake=fake, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = gr.penalty("wgan_gp", D, real, fake=fake, generator=torch.Generator().manual_seed(1))
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach())
