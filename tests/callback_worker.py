"""The tiny training run behind tests/test_callbacks.py, and its DDP worker.

Imported by the tests for the model, the data and :func:`train`. Run as a
script it trains twice in one set of DDP processes (Lightning's subprocess
launcher re-runs this file for rank 1): once without and once with
``MergeSearch``, each from the same seed. Each rank saves its final weights
and optimizer state with ``torch.save``, and the callback's history as JSON
(every rank keeps it)::

    python tests/callback_worker.py OUT_DIR [DEVICES]

The model has dropout (so the training RNG matters), BatchNorm (buffers that
differ across DDP ranks) and Adam (optimizer state). Validation has 45
samples: neither 2 ranks nor the batch size divide it.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

STEPS, EVERY, K = 40, 10, 3


def make_data() -> tuple[TensorDataset, TensorDataset]:
    """Fixed regression data (its own generator: the global RNG is the training's)."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(6, 1, generator=g)

    def split(n: int) -> TensorDataset:
        x = torch.randn(n, 6, generator=g)
        return TensorDataset(x, torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g))

    return split(120), split(45)


class Regressor(L.LightningModule):
    """An MLP with BatchNorm and dropout; ``validation_step`` returns the batch's mean squared error."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def plain_loss(model: torch.nn.Module, val: TensorDataset, batch_size: int = 7) -> float:
    """The reference: ``sum(mse x batch) / n`` over ``val`` in a plain loop, no Lightning."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in DataLoader(val, batch_size=batch_size):
            total += torch.nn.functional.mse_loss(model(x), y).double().item() * len(x)
            n += len(x)
    return total / n


def train(root: Path, callback=None, devices: int = 1, logger=False):
    """Train :class:`Regressor` for ``STEPS`` steps with a checkpoint every ``EVERY``; returns (trainer, model)."""
    L.seed_everything(0, verbose=False)
    model = Regressor()
    train_set, val_set = make_data()
    # save_last: a second save at the same step, which MergeSearch must not count as a new checkpoint
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=EVERY, save_top_k=-1,
                           save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=STEPS, callbacks=[ckpt] + ([callback] if callback is not None else []),
                        logger=logger, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                        default_root_dir=root)
    # The validation loader owns a generator (each iterator draws its base seed from it): it must be put back too.
    val = DataLoader(val_set, batch_size=7, generator=torch.Generator().manual_seed(7))
    trainer.fit(model, DataLoader(train_set, batch_size=8, shuffle=True), val)
    return trainer, model


def final_state(trainer, model) -> dict:
    """The weights, buffers, optimizer state and validation generator at the end (for ``torch.equal``)."""
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "val_generator": trainer.val_dataloaders.generator.get_state()}


def main(out: Path, devices: int) -> None:
    from lightning_merge.callbacks import MergeSearch

    logging.basicConfig(level=logging.INFO)
    runs = {}
    for name, cb in (("plain", None), ("merge", MergeSearch(k=K, trials=4, seed=0))):
        trainer, model = train(out / name, cb, devices=devices)
        torch.save(final_state(trainer, model), out / f"{name}-rank{trainer.global_rank}.pt")
        runs[name] = cb.history if cb is not None else None
    (out / f"history-rank{trainer.global_rank}.json").write_text(json.dumps(runs["merge"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
