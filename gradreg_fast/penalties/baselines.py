"""The paper's non-gradient baselines."""
from __future__ import annotations

import torch
from torch import nn

_WEIGHTED = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)


def confidence_penalty(logits: torch.Tensor) -> torch.Tensor:
    """Confidence penalty (CP): mean_i Σ_k p_ik log p_ik, the negative entropy of p = softmax(logits).

    Adding λ·CP to the loss rewards high-entropy (less confident) predictions.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("confidence_penalty: logits must be a floating tensor of shape (B, K)")
    if logits.dim() != 2:
        raise ValueError(f"confidence_penalty: logits must be (B, K), got shape {tuple(logits.shape)}")
    logp = torch.log_softmax(logits, dim=1)
    return (logp.exp() * logp).sum(dim=1).mean()


def weight_decay(model: nn.Module) -> torch.Tensor:
    """½ Σ ‖W‖² over the weights of dense and convolutional layers (biases and norm layers excluded)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"weight_decay: model must be an nn.Module, got {type(model).__name__}")
    weights = [m.weight for m in model.modules() if isinstance(m, _WEIGHTED)]
    if not weights:
        raise ValueError("weight_decay: the model has no Linear or Conv layers")
    return 0.5 * sum(w.pow(2).sum() for w in weights)
