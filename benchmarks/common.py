"""Small shared helpers: interleaved timing and the digits logistic-regression problem."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_times(candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds per call of each candidate, calls interleaved so drift hits all alike."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def environment() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu"
