"""A zoo of small classifiers covering the layer types people train, with inputs and labels.

Every entry of ``ZOO`` builds a ``Case``: the model, a function that makes its input x (for the text
model, x is the output of an embedding layer, so the penalty is taken with respect to the embeddings
and the embedding table is trained through it), labels y and the parameters whose gradients count
(the model's and, for the text model, the embedding's). Sizes are tiny so that fp64 double
backpropagation over every (model × penalty × method) cell runs in CI.

    case = make_case("vit", dtype=torch.float64, seed=0)
    value = gr.penalty("frobreg", case.model, case.input(), case.y, method="hvp")

``smooth`` says whether the model is twice continuously differentiable in x (no ReLU/max-pool kinks):
finite differences converge to the exact gradient there, and estimate a different (finite-difference)
penalty on piecewise-linear models. ``coupled`` says whether samples interact inside the model
(BatchNorm with batch statistics): the per-sample input gradient is then that of the batch.
``DISCRIMINATORS`` (same ``make_case``) are GAN discriminators with one score per sample, for the
GAN kinds (r1, wgan_gp) only: x is the real batch, ``notes["fake"]`` a generated one, y is None.
``twin``, where given, is a twice-differentiable model with the same parameters and outputs, used by
the ground truth when the model itself has an op without a double backward.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradreg_fast.testing.case import Case, K  # noqa: F401  (Case: the type of every zoo entry)

BATCH = 3


# ----------------------------------------------------------------------------------------- models
class LeNet(nn.Module):
    """The paper's LeNet: conv 6@5x5, max-pool, conv 16@5x5, max-pool, conv 120@4x4, FC 84, dropout, FC."""

    def __init__(self, k: int = K, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, 4), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(120, 84), nn.ReLU(), nn.Dropout(dropout), nn.Linear(84, k))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        self.short = (nn.Sequential() if stride == 1 and c_in == c_out else
                      nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out)))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: conv stem, basic blocks with BatchNorm, global average pool, linear head."""

    def __init__(self, k: int = K, widths: tuple[int, ...] = (4, 6), norm=nn.BatchNorm2d):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), norm(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, 1 if i == 0 else 2, norm))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, k)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.sdpa = sdpa
        if sdpa:
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
        else:
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t):
        h = self.norm1(t)
        if self.sdpa:
            b, n, d = h.shape
            q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
            t = t + self.proj(a)
        else:
            t = t + self.attn(h, h, h, need_weights=False)[0]
        return t + self.mlp(self.norm2(t))


class TinyViT(nn.Module):
    """Patch convolution, position embedding, pre-norm transformer blocks (LayerNorm, attention, GELU
    MLP), mean pooling, LayerNorm, linear head. ``sdpa=True`` writes attention with
    F.scaled_dot_product_attention instead of nn.MultiheadAttention."""

    def __init__(self, k: int = K, dim: int = 8, heads: int = 2, depth: int = 1, patch: int = 4, image: int = 8,
                 sdpa: bool = False):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(0.1 * torch.randn(1, (image // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, sdpa) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, k)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(t).mean(1)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 3x3 conv, LayerNorm over channels (channels-last), pointwise MLP with GELU, residual."""

    def __init__(self, k: int = K, dim: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, 2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 2 * dim)
        self.pw2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, k)

    def forward(self, x):
        h = self.stem(x)
        t = self.norm(self.dw(h).permute(0, 2, 3, 1))
        h = h + self.pw2(F.gelu(self.pw1(t))).permute(0, 3, 1, 2)
        return self.head(h.mean((2, 3)))


class NormCNN(nn.Module):
    """conv → norm → SiLU → conv → norm → ReLU → average pool → linear, with a chosen normalization."""

    def __init__(self, norm: Callable[[int], nn.Module], k: int = K, width: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm(width), nn.SiLU(),
                                  nn.Conv2d(width, width, 3, padding=1), norm(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, k)

    def forward(self, x):
        return self.head(self.body(x))


class LSTMClassifier(nn.Module):
    def __init__(self, k: int = K, d_in: int = 5, hidden: int = 6):
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, k)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TextClassifier(nn.Module):
    """A classifier on token embeddings (B, T, E): 1-D convolution, tanh, mean over time, linear.
    The embedding table lives outside it (the penalty is taken with respect to the embeddings)."""

    def __init__(self, k: int = K, emb: int = 6, width: int = 8):
        super().__init__()
        self.conv = nn.Conv1d(emb, width, 3, padding=1)
        self.head = nn.Linear(width, k)

    def forward(self, e):
        return self.head(torch.tanh(self.conv(e.transpose(1, 2))).mean(2))


class InplaceResidual(nn.Module):
    """Residual MLP blocks whose ReLU runs in place (nn.ReLU(inplace=True))."""

    def __init__(self, k: int = K, dim: int = 8):
        super().__init__()
        self.inp = nn.Linear(10, dim)
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(dim, k)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = h + self.fc2(self.act(self.fc1(h)))
        return self.head(h)


class SoftmaxGate(nn.Module):
    """A mixture of experts: softmax gate over 3 tanh experts (softmax inside the model)."""

    def __init__(self, k: int = K, d_in: int = 10, experts: int = 3):
        super().__init__()
        self.gate = nn.Linear(d_in, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, k))
                                     for _ in range(experts))

    def forward(self, x):
        w = torch.softmax(self.gate(x), dim=-1)
        return sum(w[:, i:i + 1] * e(x) for i, e in enumerate(self.experts))


class _OnceTanh(torch.autograd.Function):
    """tanh with a hand-written backward that is not differentiable again (once_differentiable):
    the kind of custom kernel a model may contain."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class OnceDifferentiableMLP(nn.Module):
    """An MLP whose activation is a custom autograd.Function marked once_differentiable."""

    def __init__(self, k: int = K, d_in: int = 10, width: int = 8, composite: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, width), nn.Linear(width, k)
        self.composite = composite

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.tanh(h) if self.composite else _OnceTanh.apply(h))


class HardSEBlock(nn.Module):
    """A MobileNetV3 block: conv, BatchNorm, Hardswish, a squeeze-excite gate through nn.Hardsigmoid
    (whose backward torch cannot differentiate again), pointwise conv, average pool, linear.
    ``composite=True`` writes both activations in plain ops (the ground truth's twin)."""

    def __init__(self, k: int = K, width: int = 6, composite: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.Hardswish()
        self.se1, self.se2 = nn.Conv2d(width, 4, 1), nn.Conv2d(4, width, 1)
        self.gate = nn.Hardsigmoid()
        self.pw = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width, k)
        self.composite = composite

    def forward(self, x):
        h = self.bn(self.conv(x))
        h = h * F.relu6(h + 3) / 6 if self.composite else self.act(h)
        s = self.se2(F.relu(self.se1(h.mean((2, 3), keepdim=True))))
        h = h * (F.relu6(s + 3) / 6 if self.composite else self.gate(s))
        return self.head(self.pw(h).mean((2, 3)))


class DCGANDiscriminator(nn.Module):
    """A DCGAN-style discriminator: strided 4x4 convolutions with LeakyReLU(0.2), no normalization,
    a linear score head: output (B, 1)."""

    def __init__(self, c_in: int = 3, width: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(c_in, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten())
        self.head = nn.Linear(2 * width * 2 * 2, 1)

    def forward(self, x):
        return self.head(self.features(x))


class ResBlockD(nn.Module):
    """Pre-activation residual block without normalization (as in SNGAN/StyleGAN2 discriminators)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.short = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        h = self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.2)), 0.2))
        return F.avg_pool2d(h + self.short(x), 2)


class ResNetDiscriminator(nn.Module):
    """A ResNet discriminator without normalization: conv stem, two downsampling residual blocks,
    LeakyReLU, global sum pool, linear score: output (B,)."""

    def __init__(self, c_in: int = 3, widths: tuple[int, ...] = (4, 6)):
        super().__init__()
        self.stem = nn.Conv2d(c_in, widths[0], 3, 1, 1)
        blocks, c = [], widths[0]
        for w in widths:
            blocks.append(ResBlockD(c, w))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 1)

    def forward(self, x):
        h = F.leaky_relu(self.blocks(self.stem(x)), 0.2).sum((2, 3))
        return self.head(h).squeeze(1)


def _mlp(act: Callable[[], nn.Module], d_in: int = 10, width: int = 8, k: int = K,
         wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> nn.Sequential:
    return nn.Sequential(wrap(nn.Linear(d_in, width)), act(), wrap(nn.Linear(width, width)), act(),
                         nn.Linear(width, k))


class SmoothMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 8), nn.SiLU(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 8),
                                 nn.Softplus(), nn.Linear(8, K))

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------------------- the zoo
def _images(shape, gen, dtype):
    return lambda: torch.randn((BATCH,) + shape, generator=gen, dtype=dtype)


def _fixed(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t.clone()


ZOO_SPECS: dict[str, dict] = {
    "lenet": dict(build=LeNet, shape=(1, 28, 28), smooth=False, layers="conv, ReLU, max-pool, dropout"),
    "resnet_bn_train": dict(build=ResNet, shape=(3, 8, 8), smooth=False, coupled=True, train=True,
                            layers="conv, BatchNorm (batch statistics), ReLU, residual"),
    "resnet_bn_eval": dict(build=ResNet, shape=(3, 8, 8), smooth=False, train=False,
                           layers="conv, BatchNorm (running statistics), ReLU, residual"),
    "vit_train": dict(build=TinyViT, shape=(3, 8, 8), smooth=True, train=True,
                      layers="patch conv, LayerNorm, nn.MultiheadAttention (train), GELU"),
    "vit_eval": dict(build=TinyViT, shape=(3, 8, 8), smooth=True, train=False,
                     layers="patch conv, LayerNorm, nn.MultiheadAttention (eval), GELU"),
    "sdpa_block": dict(build=lambda: TinyViT(sdpa=True), shape=(3, 8, 8), smooth=True,
                       layers="LayerNorm, F.scaled_dot_product_attention (default kernel), GELU"),
    "convnext_block": dict(build=ConvNeXtBlock, shape=(3, 8, 8), smooth=True,
                           layers="depthwise conv, channels-last LayerNorm, GELU"),
    "groupnorm_cnn": dict(build=lambda: NormCNN(lambda c: nn.GroupNorm(2, c)), shape=(3, 6, 6), smooth=False,
                          layers="conv, GroupNorm, SiLU, ReLU, adaptive avg-pool"),
    "instancenorm_cnn": dict(build=lambda: NormCNN(lambda c: nn.InstanceNorm2d(c, affine=True)), shape=(3, 6, 6),
                             smooth=False, layers="conv, InstanceNorm (affine), SiLU, ReLU"),
    "lstm": dict(build=LSTMClassifier, shape=(4, 5), smooth=True, layers="nn.LSTM (sequence classifier)"),
    "text_embedding": dict(build=TextClassifier, shape=None, smooth=True,
                           layers="nn.Embedding → conv1d → tanh (penalty w.r.t. the embeddings)"),
    "residual_inplace": dict(build=InplaceResidual, shape=(10,), smooth=False,
                             layers="Linear, ReLU(inplace=True), residual"),
    "smooth_mlp": dict(build=SmoothMix, shape=(10,), smooth=True, layers="Linear, SiLU, ELU, Softplus"),
    "softmax_gate": dict(build=SoftmaxGate, shape=(10,), smooth=True, layers="softmax gate over tanh experts"),
    "weight_norm": dict(build=lambda: _mlp(nn.Tanh, wrap=nn.utils.parametrizations.weight_norm), shape=(10,),
                        smooth=True, layers="Linear under parametrizations.weight_norm, tanh"),
    "spectral_norm": dict(build=lambda: _mlp(nn.Tanh, wrap=nn.utils.parametrizations.spectral_norm),
                          shape=(10,), smooth=True, train=True,
                          layers="Linear under parametrizations.spectral_norm (power iteration), tanh"),
    "rmsnorm_mlp": dict(build=lambda: nn.Sequential(nn.Linear(10, 8), nn.RMSNorm(8), nn.GELU(), nn.Linear(8, K)),
                        shape=(10,), smooth=True, layers="Linear, RMSNorm, GELU"),
    "once_differentiable": dict(build=OnceDifferentiableMLP, shape=(10,), smooth=True,
                                layers="custom autograd.Function with a once_differentiable backward"),
    "hard_se_block": dict(build=HardSEBlock, shape=(3, 6, 6), smooth=False, train=False,
                          layers="conv, BatchNorm (eval), Hardswish, squeeze-excite gate (nn.Hardsigmoid)"),
    # discriminators (``discriminator=True``): one score per sample, for the GAN kinds (r1, wgan_gp) only
    "dcgan_d": dict(build=DCGANDiscriminator, shape=(3, 8, 8), smooth=False, discriminator=True,
                    layers="DCGAN discriminator: strided conv, LeakyReLU, no norm → (B, 1)"),
    # 4x4 inputs: at 8x8 fd's default step crosses a LeakyReLU kink on one wgan_gp interpolate (measured)
    "resnet_d": dict(build=ResNetDiscriminator, shape=(3, 4, 4), smooth=False, discriminator=True,
                     layers="ResNet discriminator: conv, LeakyReLU, residual, avg-pool, no norm → (B,)"),
}
ZOO = tuple(k for k, v in ZOO_SPECS.items() if not v.get("discriminator"))          # classifiers
DISCRIMINATORS = tuple(k for k, v in ZOO_SPECS.items() if v.get("discriminator"))   # GAN kinds only


def make_case(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> Case:
    """A fresh zoo case: random parameters (torch.manual_seed(seed)) and inputs from a seeded generator."""
    from gradreg_fast.testing import third_party
    if name in third_party.SPECS:
        return third_party.make_case(name, dtype, seed)
    if name not in ZOO_SPECS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO + DISCRIMINATORS)}")
    spec = ZOO_SPECS[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    model = spec["build"]().to(dtype)
    model.train(spec.get("train", True))
    y = torch.randint(K, (BATCH,), generator=gen)
    twin = None
    if spec.get("discriminator"):
        # real and generated batches (fresh random, never zeros); y unused (None) by the GAN kinds
        x = torch.randn((BATCH,) + spec["shape"], generator=gen, dtype=dtype)
        fake = 0.5 * torch.randn((BATCH,) + spec["shape"], generator=gen, dtype=dtype) + 0.3
        return Case(name=name, model=model, make_input=_fixed(x), y=None, params=list(model.parameters()),
                    smooth=spec["smooth"], layers=spec["layers"], notes={"fake": fake})
    if name == "text_embedding":
        emb = nn.Embedding(20, 6).to(dtype)
        tokens = torch.randint(20, (BATCH, 5), generator=gen)
        make_input = lambda: emb(tokens)  # noqa: E731  (a new lookup, with its graph, per call)
        params = list(model.parameters()) + list(emb.parameters())
        notes = {"embedding": emb, "tokens": tokens}
    else:
        x = torch.randn((BATCH,) + spec["shape"], generator=gen, dtype=dtype)
        make_input = _fixed(x)
        params = list(model.parameters())
        notes = {}
    if name == "once_differentiable":
        twin = OnceDifferentiableMLP(composite=True).to(dtype)
        twin.load_state_dict(model.state_dict())
        twin.fc1, twin.fc2 = model.fc1, model.fc2       # shared parameters
    if name == "hard_se_block":
        twin = copy.copy(model)                         # shared submodules and parameters
        twin.composite = True
    return Case(name=name, model=model, make_input=make_input, y=y, params=params, smooth=spec["smooth"],
                coupled=spec.get("coupled", False), twin=twin, layers=spec["layers"], notes=notes)


# ------------------------------------------------------------------- small models of the unit tests
def _small_cnn(k: int = K) -> nn.Sequential:
    """conv → ReLU → max-pool → conv → tanh → linear, for 1×10×10 inputs."""
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, k))


# name: (builder of k outputs, input shape); the unit tests' models (the conformance matrix runs ZOO)
SMALL: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda k: _mlp(nn.ReLU, d_in=12, width=16, k=k), (12,)),
    "cnn": (_small_cnn, (1, 10, 10)),
    "tanh": (lambda k: _mlp(nn.Tanh, d_in=12, width=16, k=k), (12,)),
}


def make_small(name: str, batch: int = 6, k: int = 5, dtype: torch.dtype = torch.float64,
               seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, x, y) of a small unit-test model with fresh random parameters (torch.manual_seed(seed))
    and inputs from a seeded generator (never zeros)."""
    if name not in SMALL:
        raise ValueError(f"unknown small model {name!r}; choose one of: {', '.join(SMALL)}")
    g = torch.Generator().manual_seed(seed)
    build, shape = SMALL[name]
    torch.manual_seed(seed)
    model = build(k).to(dtype)
    x = torch.randn((batch,) + shape, generator=g, dtype=dtype)
    y = torch.randint(k, (batch,), generator=g)
    return model, x, y


def spec_of(name: str) -> dict:
    """The spec of a zoo model, the project's or the third-party zoo's (gradreg_fast.testing.third_party)."""
    from gradreg_fast.testing import third_party
    return ZOO_SPECS[name] if name in ZOO_SPECS else third_party.SPECS[name]


def parameter_count(case: Case) -> int:
    return sum(math.prod(p.shape) for p in case.params)
