"""The third-party zoo: classifiers as users bring them, built from their libraries' own constructors
and configs at tiny sizes (no downloads), for the conformance matrix (same ``Case`` as the project's
zoo, same ground-truth rules). torchvision, timm and Hugging Face transformers are optional
(``pip install .[models]``); ``available(name)`` says whether a case can be built here.

Hugging Face models are penalized with respect to their input embeddings (``gr.nn.FromEmbeddings``):
x is the model's own embedding lookup of fresh token ids, the attention mask (one padded sample) goes
in ``model_kwargs``, and the embedding table is among the parameters whose gradients count.
"""
from __future__ import annotations

import copy
import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from gradreg_fast.testing.case import Case

BATCH = 2
K = 3
IMAGE = (3, 32, 32)
TOKENS = 6
VOCAB = 40


class CompositeHardsigmoid(nn.Module):
    """relu6(z + 3) / 6 in plain ops (twice differentiable): the ground truth's twin of nn.Hardsigmoid."""

    def forward(self, z):
        return F.relu6(z + 3) / 6


def composite_twin(model: nn.Module) -> nn.Module | None:
    """The model with every nn.Hardsigmoid replaced by CompositeHardsigmoid, sharing all parameters and
    buffers (None when it has none)."""
    if not any(isinstance(m, nn.Hardsigmoid) for m in model.modules()):
        return None
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo)
    for m in list(twin.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.Hardsigmoid):
                setattr(m, child_name, CompositeHardsigmoid())
    return twin


# ------------------------------------------------------------------------------------------ builders
def _tv(name: str):
    import torchvision.models as tvm
    from torchvision.models import convnext
    from torchvision.models import efficientnet as ef
    from torchvision.models import mobilenetv3 as mb
    if name == "resnet18":
        return tvm.resnet18(weights=None, num_classes=K)
    if name == "mobilenet_v3":   # three of mobilenet_v3_small's block kinds at width 16-24
        cfg = [mb.InvertedResidualConfig(16, 3, 16, 16, True, "RE", 2, 1, 1.0),
               mb.InvertedResidualConfig(16, 3, 48, 24, False, "RE", 2, 1, 1.0),
               mb.InvertedResidualConfig(24, 5, 64, 24, True, "HS", 1, 1, 1.0)]
        return mb.MobileNetV3(cfg, last_channel=64, num_classes=K, dropout=0.0)
    if name == "efficientnet":   # efficientnet_b0's first three stages (MBConv, SE, SiLU), one block each
        cfg = [ef.MBConvConfig(1, 3, 1, 16, 16, 1), ef.MBConvConfig(6, 3, 2, 16, 24, 1),
               ef.MBConvConfig(6, 5, 2, 24, 32, 1)]
        return ef.EfficientNet(cfg, dropout=0.0, stochastic_depth_prob=0.0, num_classes=K, last_channel=64)
    if name == "convnext":
        return convnext.ConvNeXt([convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)],
                                 stochastic_depth_prob=0.0, num_classes=K)
    if name == "vit":
        return tvm.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                                     mlp_dim=16, num_classes=K)
    if name == "regnet":         # regnet_y_400mf's design (grouped convs, group width 8, SE 0.25) at widths 8-32
        from torchvision.models import regnet
        params = regnet.BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
        return regnet.RegNet(params, num_classes=K, stem_width=8)
    if name == "swin":
        return tvm.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                   window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=K)
    raise ValueError(name)


def _timm(name: str):
    import timm
    if name == "vit_tiny":   # vit_tiny_patch16_224 at depth 1 and 32 px
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=K, img_size=32, depth=1)
    return timm.create_model(name, pretrained=False, num_classes=K)


def _hf(name: str):
    import transformers as tr
    small = dict(vocab_size=VOCAB, num_labels=K)
    if name == "bert":
        cfg = tr.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                            max_position_embeddings=16, **small)
        return tr.BertForSequenceClassification(cfg)
    if name == "roberta":
        cfg = tr.RobertaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                               max_position_embeddings=20, pad_token_id=1, **small)
        return tr.RobertaForSequenceClassification(cfg)
    if name == "distilbert":
        cfg = tr.DistilBertConfig(dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=16, **small)
        return tr.DistilBertForSequenceClassification(cfg)
    if name == "gpt2":
        cfg = tr.GPT2Config(n_embd=8, n_layer=1, n_head=2, n_positions=16, pad_token_id=0, bos_token_id=0,
                             eos_token_id=0, **small)
        return tr.GPT2ForSequenceClassification(cfg)
    raise ValueError(name)


_BUILDERS = {"torchvision": _tv, "timm": _timm, "transformers": _hf}


def _spec(requires: str, what: str, layers: str, *, smooth: bool = True, train: bool = False,
          coupled: bool = False) -> dict:
    """A third-party model's spec (the zoo's keys): requires (the package), build (its builder for ``what``),
    smooth, train (the mode), coupled (batch statistics), layers."""
    return dict(requires=requires, build=functools.partial(_BUILDERS[requires], what), smooth=smooth, train=train,
                coupled=coupled, layers=layers)


_TV_RESNET = "torchvision resnet18: conv, BatchNorm ({} statistics), ReLU, max-pool"
SPECS: dict[str, dict] = {
    "tv_resnet18_train": _spec("torchvision", "resnet18", _TV_RESNET.format("batch"), smooth=False, train=True,
                               coupled=True),
    "tv_resnet18_eval": _spec("torchvision", "resnet18", _TV_RESNET.format("running"), smooth=False),
    "tv_mobilenet_v3": _spec("torchvision", "mobilenet_v3", "torchvision MobileNetV3 (3 blocks): Hardswish, SE with "
                             "Hardsigmoid, BN (eval)", smooth=False),
    "tv_efficientnet": _spec("torchvision", "efficientnet",
                             "torchvision EfficientNet (b0's first 3 stages): SiLU, SE (sigmoid), BN (eval)"),
    "tv_convnext": _spec("torchvision", "convnext", "torchvision ConvNeXt: depthwise conv, LayerNorm2d, GELU, "
                         "layer scale", train=True),
    "tv_vit": _spec("torchvision", "vit", "torchvision VisionTransformer: patch conv, nn.MultiheadAttention, GELU"),
    "tv_swin": _spec("torchvision", "swin",
                     "torchvision SwinTransformer: shifted windows, relative position bias, GELU"),
    "tv_regnet": _spec("torchvision", "regnet", "torchvision RegNet (regnet_y_400mf's design, 3 stages): grouped "
                       "conv, SE (sigmoid), BN (eval), ReLU", smooth=False),
    "timm_resnet": _spec("timm", "test_resnet", "timm test_resnet: deep stem, BN (eval), ReLU, max-pool", smooth=False),
    "timm_vit_tiny": _spec("timm", "vit_tiny", "timm vit_tiny (depth 1, 32 px): attention, GELU"),
    "timm_efficientnet": _spec("timm", "test_efficientnet", "timm test_efficientnet: SiLU, SE, BN (eval)"),
    "timm_convnext": _spec("timm", "test_convnext", "timm test_convnext: depthwise conv, LayerNorm, GELU"),
    "hf_bert": _spec("transformers", "bert", "transformers BERT (train: dropout), attention mask, w.r.t. embeddings",
                     train=True),
    "hf_roberta": _spec("transformers", "roberta", "transformers RoBERTa, attention mask, w.r.t. embeddings"),
    "hf_distilbert": _spec("transformers", "distilbert", "transformers DistilBERT, attention mask, w.r.t. embeddings"),
    "hf_gpt2": _spec("transformers", "gpt2",
                     "transformers GPT-2 (causal, last token), attention mask, w.r.t. embeddings"),
}
NAMES = tuple(SPECS)


def available(name: str) -> bool:
    """Whether the package the case needs is installed (and imports beside this torch)."""
    pkg = SPECS[name]["requires"]
    if importlib.util.find_spec(pkg) is None:
        return False
    try:
        importlib.import_module(pkg)
    except Exception:   # e.g. a torchvision built for another torch
        return False
    return True


def _redraw_zero_parameters(model: nn.Module, gen: torch.Generator) -> None:
    """Parameters a library initializes to all zeros (torchvision ViT's classification head) redrawn
    N(0, 0.1²): with a zero head the logits do not depend on x, every penalty and its gradient are 0,
    and a cell would be right vacuously. Biases may stay zero (the weight before them carries x)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_case(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> Case:
    """A fresh third-party case: random parameters (torch.manual_seed(seed)), fresh random inputs."""
    from gradreg_fast.nn import FromEmbeddings
    spec = SPECS[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(2000 + seed)
    model = spec["build"]().to(dtype)
    _redraw_zero_parameters(model, gen)
    y = torch.randint(K, (BATCH,), generator=gen)
    kwargs = {}
    if spec["requires"] == "transformers":
        model = FromEmbeddings(model)
        tokens = torch.randint(2, VOCAB, (BATCH, TOKENS), generator=gen)
        mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
        mask[0, -2:] = 0            # one padded sample
        kwargs = {"attention_mask": mask}
        make_input = lambda: model.embed(tokens)  # noqa: E731  (a new lookup, with its graph, per call)
    else:
        x = torch.randn((BATCH,) + IMAGE, generator=gen, dtype=dtype)
        make_input = lambda: x.clone()  # noqa: E731
    model.train(spec["train"])
    return Case(name=name, model=model, make_input=make_input, y=y, params=list(model.parameters()),
                smooth=spec["smooth"], coupled=spec["coupled"], twin=composite_twin(model),
                layers=spec["layers"], k=K, model_kwargs=kwargs)
