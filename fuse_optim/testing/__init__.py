"""Reusable test helpers for optimisers: test functions with known minima and starting points."""

from __future__ import annotations

from fuse_optim.testing.functions import (
    HIMMELBLAU_MINIMIZERS,
    TEST_FUNCTIONS,
    TestFunction,
    ackley,
    get_test_function,
    himmelblau,
    quadratic,
    rastrigin,
    rosenbrock,
)

__all__ = [
    "HIMMELBLAU_MINIMIZERS",
    "TEST_FUNCTIONS",
    "TestFunction",
    "ackley",
    "get_test_function",
    "himmelblau",
    "quadratic",
    "rastrigin",
    "rosenbrock",
]
