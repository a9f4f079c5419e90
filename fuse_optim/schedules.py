"""Theta schedules for FUSE (paper Algorithm 3): plain callables ``step -> theta`` in [0, 1].

FUSE blends the two updates computed from the same minibatch,
``x_{k+1} = theta_k * x^A_{k+1} + (1 - theta_k) * x^L_{k+1}``; the paper's advice is theta near 1
early (Adam leads) and decaying towards 0 (L-BFGS leads). ``step`` counts completed optimizer
steps, starting at 0. Every schedule here is a small frozen dataclass so that it prints, compares
and serialises (``config()``) cleanly; any other callable works too.

Build from a study file's dict with :func:`make_schedule`::

    {"schedule": "constant", "theta": 0.5}
    {"schedule": "linear", "steps": 1000, "start": 1.0, "end": 0.0}
    {"schedule": "cosine", "steps": 1000}
    {"schedule": "exponential", "rate": 0.995}            # theta_k = start * rate**k
    {"schedule": "step", "boundaries": [100, 200], "values": [1.0, 0.5, 0.0]}
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "ThetaSchedule",
    "Constant",
    "Linear",
    "Cosine",
    "Exponential",
    "Piecewise",
    "make_schedule",
    "SCHEDULES",
]

ThetaSchedule = Callable[[int], float]


def _unit(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{argument} must be a number in [0, 1], got {value!r}")
    return float(value)


def _positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be an integer >= 1, got {value!r}")
    return value


class _Schedule:
    kind = ""

    def config(self) -> dict[str, Any]:
        return {"schedule": self.kind, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class Constant(_Schedule):
    """theta_k = theta for every k."""

    theta: float
    kind = "constant"

    def __post_init__(self) -> None:
        _unit(self.theta, "theta")

    def __call__(self, step: int) -> float:
        return self.theta


@dataclass(frozen=True)
class Linear(_Schedule):
    """theta_k = start + (end - start) * min(k / steps, 1)."""

    steps: int
    start: float = 1.0
    end: float = 0.0
    kind = "linear"

    def __post_init__(self) -> None:
        _positive_int(self.steps, "steps")
        _unit(self.start, "start")
        _unit(self.end, "end")

    def __call__(self, step: int) -> float:
        fraction = min(step / self.steps, 1.0)
        return self.start + (self.end - self.start) * fraction


@dataclass(frozen=True)
class Cosine(_Schedule):
    """theta_k = end + (start - end) * (1 + cos(pi * min(k / steps, 1))) / 2."""

    steps: int
    start: float = 1.0
    end: float = 0.0
    kind = "cosine"

    def __post_init__(self) -> None:
        _positive_int(self.steps, "steps")
        _unit(self.start, "start")
        _unit(self.end, "end")

    def __call__(self, step: int) -> float:
        fraction = min(step / self.steps, 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


@dataclass(frozen=True)
class Exponential(_Schedule):
    """theta_k = start * rate**k, with 0 < rate <= 1 (decays towards 0)."""

    rate: float
    start: float = 1.0
    kind = "exponential"

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 < self.rate <= 1:
            raise ValueError(f"rate must be a number in (0, 1], got {self.rate!r}")
        _unit(self.start, "start")

    def __call__(self, step: int) -> float:
        return self.start * self.rate**step


@dataclass(frozen=True)
class Piecewise(_Schedule):
    """Step schedule: theta = values[i] for boundaries[i-1] <= k < boundaries[i]."""

    boundaries: tuple[int, ...]
    values: tuple[float, ...]
    kind = "step"

    def __post_init__(self) -> None:
        object.__setattr__(self, "boundaries", tuple(self.boundaries))
        object.__setattr__(self, "values", tuple(self.values))
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"values must have one more entry than boundaries, got {len(self.values)} values "
                f"for {len(self.boundaries)} boundaries"
            )
        if any(b < 0 for b in self.boundaries) or list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(f"boundaries must be increasing integers >= 0, got {list(self.boundaries)}")
        for v in self.values:
            _unit(v, "values")

    def __call__(self, step: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, step)]

    def config(self) -> dict[str, Any]:
        return {"schedule": "step", "boundaries": list(self.boundaries), "values": list(self.values)}


SCHEDULES: dict[str, type] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "exponential": Exponential,
    "step": Piecewise,
}


def make_schedule(spec: ThetaSchedule | Mapping[str, Any] | float) -> ThetaSchedule:
    """A schedule from a callable (returned as is), a number (constant) or a plain dict."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(float(spec))
    if callable(spec):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"theta must be a number in [0, 1], a callable step -> theta or a dict, got {spec!r}")
    options = dict(spec)
    kind = options.pop("schedule", None)
    if kind not in SCHEDULES:
        raise ValueError(f"theta schedule must be one of {sorted(SCHEDULES)}, got {kind!r}")
    try:
        return SCHEDULES[kind](**options)
    except TypeError as exc:
        raise ValueError(f"theta schedule {kind!r}: {exc}") from None
