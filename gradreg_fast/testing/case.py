"""A conformance case: one model with its input, labels and the parameters the ground truth
differentiates (shared by the project's zoo, gradreg_fast.testing.zoo, and the third-party zoo,
gradreg_fast.testing.third_party)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

K = 4          # classes of every zoo model


@dataclass
class Case:
    name: str
    model: nn.Module
    make_input: Callable[[], torch.Tensor]
    y: torch.Tensor | None          # None for the discriminators
    params: list[torch.Tensor]
    smooth: bool
    coupled: bool = False
    twin: nn.Module | None = None
    layers: str = ""
    notes: dict = field(default_factory=dict)
    k: int = K                      # classes
    model_kwargs: dict = field(default_factory=dict)   # model(x, **model_kwargs) (an attention mask)

    def input(self) -> torch.Tensor:
        """A fresh x (for the embedding model, a fresh embedding lookup with its own graph)."""
        return self.make_input()
