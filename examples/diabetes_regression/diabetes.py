"""An MLP regressor on scikit-learn's diabetes data (442 patients, 10 features; bundled, offline).

The split is fixed (60/20/20 train/validation/test, drawn once from a generator seeded with 0, whatever the run
seed), and both the features and the target are standardized with the *training* split's mean and standard
deviation, so ``val_mse`` is in units of the target's training variance (1.0 = predicting the training mean).
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_diabetes
from torch import nn

import fuse_tune


def _mlp(inputs: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def build(hidden: int = 32, depth: int = 1) -> fuse_tune.Problem:
    """MLP regressor on scikit-learn diabetes (standardized target; val_mse, minimize)"""
    if hidden < 1 or depth < 0:
        raise ValueError(f"hidden: expected >= 1 (and depth >= 0), got hidden={hidden}, depth={depth}")
    x_np, y_np = load_diabetes(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.float32).unsqueeze(1)  # (N, 1), the model's output shape

    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # the same split for every seed
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]

    x_mean, x_std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()

    def split(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x[index] - x_mean) / x_std, (y[index] - y_mean) / y_std

    return fuse_tune.Problem(
        model=_mlp(x.shape[1], hidden, depth),
        loss=nn.MSELoss(),
        train=split(train),
        validation=split(val),
        test=split(test),
        metric=fuse_tune.MSE,
    )
