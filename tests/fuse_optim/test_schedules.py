"""Theta schedules give their documented values and reject bad arguments by name."""

from __future__ import annotations

import math

import pytest

from fuse_optim.schedules import SCHEDULES, Constant, Cosine, Exponential, Linear, Piecewise, make_schedule


@pytest.mark.parametrize(("spec", "expected"), [
    ({"schedule": "constant", "theta": 0.3}, {0: 0.3, 1: 0.3, 10**6: 0.3}),
    ({"schedule": "linear", "steps": 10}, {0: 1.0, 1: 0.9, 5: 0.5, 10: 0.0, 11: 0.0, 500: 0.0}),
    ({"schedule": "linear", "steps": 4, "start": 0.2, "end": 0.6}, {0: 0.2, 2: 0.4, 4: 0.6, 9: 0.6}),
    ({"schedule": "cosine", "steps": 10}, {0: 1.0, 5: 0.5, 10: 0.0, 20: 0.0,
                                           2: 0.5 * (1 + math.cos(math.pi * 0.2))}),
    ({"schedule": "cosine", "steps": 4, "start": 0.9, "end": 0.1}, {0: 0.9, 2: 0.5, 4: 0.1, 8: 0.1}),
    ({"schedule": "exponential", "rate": 0.5}, {0: 1.0, 1: 0.5, 3: 0.125}),
    ({"schedule": "exponential", "rate": 0.9, "start": 0.8}, {0: 0.8, 2: 0.8 * 0.81}),
    ({"schedule": "exponential", "rate": 1}, {0: 1.0, 1000: 1.0}),
    ({"schedule": "step", "boundaries": [2, 5], "values": [1.0, 0.5, 0.0]},
     {0: 1.0, 1: 1.0, 2: 0.5, 4: 0.5, 5: 0.0, 100: 0.0}),
    ({"schedule": "step", "boundaries": [], "values": [0.7]}, {0: 0.7, 9: 0.7}),
])
def test_documented_values(spec: dict, expected: dict[int, float]) -> None:
    schedule = make_schedule(spec)
    assert isinstance(schedule, SCHEDULES[spec["schedule"]])
    for step, theta in expected.items():
        assert schedule(step) == pytest.approx(theta, abs=1e-15), step
    assert make_schedule(schedule.config()) == schedule  # config() round-trips
    assert schedule.config()["schedule"] == spec["schedule"]


def test_monotone_decay_stays_in_unit_interval() -> None:
    for schedule in (Linear(50), Cosine(50), Exponential(0.95), Piecewise([10, 20], [1.0, 0.4, 0.0])):
        values = [schedule(k) for k in range(80)]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_numbers_and_callables() -> None:
    assert make_schedule(0.25) == Constant(0.25)
    assert make_schedule(1) == Constant(1.0)

    def custom(step: int) -> float:
        return 1.0 / (1 + step)

    assert make_schedule(custom) is custom


@pytest.mark.parametrize(("spec", "named"), [
    (1.5, "theta"),
    (-0.1, "theta"),
    ("linear", "theta"),
    (True, "theta"),
    ({"schedule": "triangle", "steps": 3}, "schedule"),
    ({"steps": 3}, "schedule"),
    ({"schedule": "constant", "theta": 2.0}, "theta"),
    ({"schedule": "linear", "steps": 0}, "steps"),
    ({"schedule": "linear", "steps": 2.5}, "steps"),
    ({"schedule": "linear", "steps": 10, "start": 1.2}, "start"),
    ({"schedule": "cosine", "steps": 10, "end": -0.5}, "end"),
    ({"schedule": "linear", "steps": 10, "warmup": 2}, "warmup"),
    ({"schedule": "exponential", "rate": 0.0}, "rate"),
    ({"schedule": "exponential", "rate": 1.5}, "rate"),
    ({"schedule": "exponential"}, "rate"),
    ({"schedule": "step", "boundaries": [1, 2], "values": [1.0, 0.0]}, "values"),
    ({"schedule": "step", "boundaries": [5, 2], "values": [1.0, 0.5, 0.0]}, "boundaries"),
    ({"schedule": "step", "boundaries": [-1], "values": [1.0, 0.0]}, "boundaries"),
    ({"schedule": "step", "boundaries": [3], "values": [1.0, 1.1]}, "values"),
])
def test_bad_schedules_raise_value_error_naming_the_argument(spec, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        make_schedule(spec)
