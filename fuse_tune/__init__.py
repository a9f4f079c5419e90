"""fuse_tune: workloads, the trainer, studies and the ``fuse-tune`` CLI around fuse_optim.

The names users need are importable from here (loaded on first use, so ``fuse-tune --help`` stays fast):
:func:`run_study` and :class:`StudyResult` (:mod:`fuse_tune.api`); :class:`Problem`, :class:`Metric`,
``ACCURACY``, ``MSE``, ``MAE``, ``L2RE`` (:mod:`fuse_tune.workloads.interface`); :class:`TrainConfig` and :func:`train`
(:mod:`fuse_tune.train`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_study": "fuse_tune.api", "StudyResult": "fuse_tune.api",
    "Problem": "fuse_tune.workloads.interface", "Metric": "fuse_tune.workloads.interface",
    "ACCURACY": "fuse_tune.workloads.interface", "MSE": "fuse_tune.workloads.interface",
    "MAE": "fuse_tune.workloads.interface", "L2RE": "fuse_tune.workloads.interface",
    "WorkloadError": "fuse_tune.workloads.interface",
    "TrainConfig": "fuse_tune.train", "train": "fuse_tune.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fuse_tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
