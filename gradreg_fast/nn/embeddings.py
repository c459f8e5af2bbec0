"""``FromEmbeddings``: a Hugging Face model (or any model that takes ``inputs_embeds=``) called on its
input embeddings, so that gradient penalties are taken with respect to the embeddings.

    model = transformers.BertForSequenceClassification(config)
    net = gr.nn.FromEmbeddings(model)
    x = net.embed(input_ids)                         # the model's own embedding lookup (trained too)
    loss = crit(net, x, y, model_kwargs={"attention_mask": mask})
    loss.backward()

Token ids are integers, so the penalty's input is the embedding lookup x = E[ids] (B, T, E): its
gradient reaches the embedding table E through the caller's backward, under every method. Pass the
attention mask (and any other per-call argument) as ``model_kwargs``, not as state held by a wrapper:
the library then selects its rows for ``subsample`` and repeats them for fd's stacked passes.
"""
from __future__ import annotations

import torch
from torch import nn


class FromEmbeddings(nn.Module):
    """``model(inputs_embeds=x, **kwargs)``, returning the logits (B, K).

    Args:
        model: a module whose forward takes ``inputs_embeds=`` (Hugging Face ``*ForSequenceClassification``
            and the like) and whose output is a tensor or has a ``logits`` attribute.
        output: the attribute of the model's output to return (default "logits").
    """

    def __init__(self, model: nn.Module, output: str = "logits"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"FromEmbeddings: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(output, str):
            raise TypeError(f"FromEmbeddings: output must be an attribute name such as 'logits', got {output!r}")
        self.model = model
        self.output = output

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's input embeddings of ``input_ids`` (its ``get_input_embeddings()`` layer): the x to
        penalize. Differentiable with respect to the embedding table."""
        get = getattr(self.model, "get_input_embeddings", None)
        layer = get() if callable(get) else None
        if not isinstance(layer, nn.Module):
            raise TypeError(f"FromEmbeddings.embed: {type(self.model).__name__} has no get_input_embeddings(); "
                            "look the embeddings up yourself and pass them as x")
        return layer(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model(inputs_embeds=inputs_embeds, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, self.output, None)
        if logits is None and isinstance(out, dict):
            logits = out.get(self.output)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"FromEmbeddings: the model's output ({type(out).__name__}) has no tensor "
                            f"{self.output!r}; pass output= naming the field that holds the logits")
        return logits

    def extra_repr(self) -> str:
        return f"output={self.output!r}"
