"""A tiny BERT (Hugging Face transformers, built from a config: nothing is downloaded) trained on a small
synthetic text task with SpectReg through ``gr.GradRegLoss``, under every method that serves SpectReg
(exact, hvp, fd; jvp serves FrobReg/JacReg only), penalized with respect to the input embeddings.

    python examples/hf_text_classifier.py                        # every method, 300 steps each
    python examples/hf_text_classifier.py --methods hvp --steps 100

The task (generated here, seeded): sentences of 4-12 tokens over a vocabulary of 30 words, padded to 12
(the attention mask marks the padding). Three "marker" words carry the label: the class is the marker
that occurs most often (ties never generated); the other words are noise. Chance accuracy is 1/3.

Hugging Face models take token ids, which have no gradient: the penalty's input is the model's own
embedding lookup, ``net.embed(ids)`` with ``net = gr.nn.FromEmbeddings(model)``, and the attention mask
goes in ``model_kwargs`` (the library selects and repeats its rows as the methods re-run the model).
The embedding table is trained too: its gradient reaches it through the lookup.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

try:
    import gradreg_fast as gr  # the installed package, with its built extension
except ImportError:  # a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gradreg_fast as gr

VOCAB, MARKERS, MAX_LEN, K = 30, (3, 4, 5), 12, 3
PAD = 0
METHODS = ("exact", "hvp", "fd")   # the methods that serve SpectReg (gradreg_fast._methods)


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n sentences: token ids (n, MAX_LEN), attention mask (n, MAX_LEN), labels (n,)."""
    ids = torch.full((n, MAX_LEN), PAD, dtype=torch.long)
    mask = torch.zeros(n, MAX_LEN, dtype=torch.long)
    y = torch.randint(K, (n,), generator=generator)
    for i in range(n):
        length = int(torch.randint(4, MAX_LEN + 1, (1,), generator=generator))
        words = torch.randint(len(MARKERS) + 3, VOCAB, (length,), generator=generator)   # noise words
        # the label's marker twice, another marker at most once, at random places
        places = torch.randperm(length, generator=generator)
        words[places[0]] = words[places[1]] = MARKERS[int(y[i])]
        other = (int(y[i]) + 1 + int(torch.randint(K - 1, (1,), generator=generator))) % K
        if torch.rand(1, generator=generator) < 0.5:
            words[places[2]] = MARKERS[other]
        ids[i, :length], mask[i, :length] = words, 1
    return ids, mask, y


def make_model(seed: int) -> gr.nn.FromEmbeddings:
    """A one-layer BERT classifier (hidden size 16) with random weights, called on its input embeddings."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=MAX_LEN, num_labels=K,
                                     pad_token_id=PAD, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return gr.nn.FromEmbeddings(transformers.BertForSequenceClassification(config))


def accuracy(net: gr.nn.FromEmbeddings, ids, mask, y) -> float:
    net.eval()
    with torch.no_grad():
        pred = net(net.embed(ids), attention_mask=mask).argmax(1)
    net.train()
    return float((pred == y).float().mean())


def train(method: str, steps: int, *, lam: float = 0.01, batch: int = 32, seed: int = 0) -> dict:
    """Train with cross-entropy + lam · SpectReg (method ``method``); the run's losses and accuracies."""
    gen = torch.Generator().manual_seed(seed)
    train_ids, train_mask, train_y = make_data(512, gen)
    test_ids, test_mask, test_y = make_data(256, gen)
    net = make_model(seed)
    crit = gr.GradRegLoss("spectreg", lam, method=method, seed=seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(train_y), (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        x = net.embed(train_ids[idx])   # the penalty's input: the model's own embedding lookup
        loss = crit(net, x, train_y[idx], model_kwargs={"attention_mask": train_mask[idx]})
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"method": method, "steps": steps, "losses": losses, "seconds": time.perf_counter() - t0,
            "train_accuracy": accuracy(net, train_ids, train_mask, train_y),
            "test_accuracy": accuracy(net, test_ids, test_mask, test_y), "net": net}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for method in args.methods:
        r = train(method, args.steps, lam=args.lam, seed=args.seed)
        print(f"{method:>5}: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, train accuracy "
              f"{r['train_accuracy']:.3f}, test accuracy {r['test_accuracy']:.3f} (chance 0.333), "
              f"{r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
