"""A LightningModule classifier on scikit-learn's digits (8x8 images, 1,797 samples; bundled, offline) whose
``configure_optimizers`` returns :class:`fuse_optim.FusePV`, and the fixed data split it trains on.

``train.py`` trains it with a ``lightning.Trainer``; ``workload.py`` hands the same module (its ``forward`` and
its ``loss``) to fuse-tune, so that a study tunes FusePV's switch for exactly this model.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from sklearn.datasets import load_digits
from torch import nn

from fuse_optim import FusePV


def digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train", "validation", "test"}`` -> ``(inputs, labels)``: pixels scaled to [0, 1], a fixed 60/20/20
    split drawn once from a generator seeded with 0 (the same for every run seed)."""
    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np / 16.0, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    parts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: (x[index], y[index]) for name, index in parts.items()}


class DigitsClassifier(L.LightningModule):
    """An MLP (64 -> ``hidden`` -> 10, tanh) trained with FusePV: Adam for ``switch_epoch`` epochs, then L-BFGS.

    Args:
        hidden: width of the hidden layer.
        lr: FusePV's learning rate (Adam's; it also scales the L-BFGS step).
        switch_epoch: completed epochs after which FusePV switches to L-BFGS (the ``epoch`` criterion; the
            ``FuseSwitchCallback`` tells it when an epoch ends).
        history_size: L-BFGS memory.
    """

    def __init__(self, hidden: int = 32, lr: float = 1e-2, switch_epoch: int = 3, history_size: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.net(x)

    @staticmethod
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch: the objective in Lightning and in fuse-tune alike."""
        return nn.functional.cross_entropy(outputs, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        outputs = self(x)
        self.log(f"{stage}_loss", self.loss(outputs, y))
        self.log(f"{stage}_accuracy", (outputs.argmax(dim=-1) == y).float().mean())

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> FusePV:
        return FusePV(self.parameters(), lr=self.hparams.lr, history_size=self.hparams.history_size,
                      switch={"criterion": "epoch", "epoch": self.hparams.switch_epoch})
