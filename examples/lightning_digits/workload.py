"""The LightningModule of ``module.py`` as a fuse-tune workload: its ``forward`` is the model, its ``loss`` the
objective, ``digits_splits()`` the data. fuse-tune builds FusePV itself from the study's settings (``lr``,
``switch``, ``history_size``), so the module's ``configure_optimizers`` is not used here: the study's best
settings go back into ``train.py`` (see README.md)."""

from __future__ import annotations

import fuse_tune

# isort: split
from module import DigitsClassifier, digits_splits  # module.py next to this file


def build(hidden: int = 32) -> fuse_tune.Problem:
    """DigitsClassifier (a LightningModule) on scikit-learn digits"""
    splits = digits_splits()
    return fuse_tune.Problem(
        model=DigitsClassifier(hidden=hidden),  # called as model(x): the module's forward
        loss=DigitsClassifier.loss,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        metric=fuse_tune.ACCURACY,
    )
