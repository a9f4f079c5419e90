"""A user's own small CNN on FashionMNIST, read from the data set's own files as a torch Dataset.

The data is handed to fuse_tune as ``torch.utils.data.Dataset`` objects (not tensors), so the trainer reads it
through a DataLoader in its own seeded order. Validation is a fixed hold-out of 1/6 of the official training
set (10,000 of 60,000 images; drawn once with a generator seeded with 0, the same for every run seed); the test
split is the official test set, which the tuner never selects on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Subset
from torchvision import datasets, transforms

import fuse_tune


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (``channels``, then ``2 * channels``), each followed by ReLU and 2x2 max pooling,
    then dropout and a linear layer to the 10 classes."""

    def __init__(self, channels: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),           # 28 -> 14
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 7
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels * 7 * 7, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(*, data_dir: str | None = None, download: bool = False, channels: int = 8,
          dropout: float = 0.0) -> fuse_tune.Problem:
    """Small CNN (2 conv layers) on FashionMNIST, read as a torch Dataset"""
    if data_dir is None:
        raise ValueError("data_dir: FashionMNIST needs a data folder holding FashionMNIST/raw/*-ubyte: pass "
                         "--data-dir DIR (`fuse-tune train ... --download` fetches the files) or set data_dir: "
                         "in the study file")
    if channels < 1:
        raise ValueError(f"channels: expected >= 1, got {channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected 0 <= dropout < 1, got {dropout}")
    to_tensor = transforms.ToTensor()  # uint8 28x28 image -> float32 1x28x28 in [0, 1]
    full_train = datasets.FashionMNIST(root=data_dir, train=True, download=download, transform=to_tensor)
    test = datasets.FashionMNIST(root=data_dir, train=False, download=download, transform=to_tensor)

    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = len(full_train) // 6
    return fuse_tune.Problem(
        model=SmallCNN(channels, dropout),
        loss=nn.CrossEntropyLoss(),
        train=Subset(full_train, order[n_val:]),
        validation=Subset(full_train, order[:n_val]),
        test=test,
        metric=fuse_tune.ACCURACY,
    )
