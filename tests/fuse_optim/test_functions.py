"""Test functions: value and gradient at the listed minimisers, reachability from the default start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from fuse_optim.test_functions import TEST_FUNCTIONS, get_test_function, himmelblau, rosenbrock

CASES = [
    (name, dim)
    for name, test_function in sorted(TEST_FUNCTIONS.items())
    for dim in ([test_function.dims] if test_function.dims is not None else [test_function.min_dim, 2, 5])
]


@pytest.mark.parametrize(("name", "dim"), sorted(set(CASES)))
def test_value_and_gradient_at_minimizers(name: str, dim: int) -> None:
    test_function = get_test_function(name)
    minimizers = test_function.minimizers(dim)
    assert minimizers
    for point in minimizers:
        assert len(point) == dim
        x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
        value = test_function(x)
        value.backward()
        assert value.item() == pytest.approx(test_function.f_star, abs=1e-12)
        assert torch.isfinite(x.grad).all()
        assert x.grad.abs().max().item() < 1e-10


@pytest.mark.parametrize(("name", "dim"), sorted(set(CASES)))
def test_default_start_is_away_from_the_minimum(name: str, dim: int) -> None:
    test_function = get_test_function(name)
    start = test_function.default_start(dim)
    assert len(start) == dim
    value = test_function(torch.tensor(start, dtype=torch.float64)).item()
    assert value > test_function.f_star + 0.1


def test_rosenbrock_start_is_the_documented_point() -> None:
    assert get_test_function("rosenbrock").default_start(2) == (-1.5, 2.0)
    assert get_test_function("rosenbrock").default_start(5) == (-1.5, 2.0, -1.5, 2.0, -1.5)
    assert rosenbrock(torch.tensor([-1.5, 2.0], dtype=torch.float64)).item() == pytest.approx(12.5)


def test_himmelblau_has_four_distinct_minimizers() -> None:
    minimizers = get_test_function("himmelblau").minimizers(2)
    assert len(set(minimizers)) == 4
    assert (3.0, 2.0) in minimizers


def test_batched_evaluation_matches_pointwise() -> None:
    points = torch.randn(4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for test_function in TEST_FUNCTIONS.values():
        batched = test_function(points)
        assert batched.shape == (4, 3)
        assert torch.allclose(batched[2, 1], test_function(points[2, 1]))


def _scipy_objective(fn):
    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        point = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = fn(point)
        value.backward()
        return value.item(), point.grad.numpy().copy()

    return objective


@pytest.mark.parametrize("dim", [2, 10])
def test_scipy_lbfgsb_reaches_rosenbrock_minimum_from_default_start(dim: int) -> None:
    test_function = get_test_function("rosenbrock")
    result = minimize(
        _scipy_objective(test_function.fn),
        np.array(test_function.default_start(dim)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10},
    )
    assert result.fun == pytest.approx(test_function.f_star, abs=1e-8)
    assert np.allclose(result.x, test_function.minimizers(dim)[0], atol=1e-4)


def test_scipy_lbfgsb_reaches_a_himmelblau_minimizer() -> None:
    test_function = get_test_function("himmelblau")
    result = minimize(_scipy_objective(himmelblau), np.array(test_function.default_start(2)), jac=True)
    assert result.fun == pytest.approx(0.0, abs=1e-8)
    assert min(np.linalg.norm(result.x - np.array(m)) for m in test_function.minimizers(2)) < 1e-4


def test_unknown_name_raises_value_error_listing_names() -> None:
    with pytest.raises(ValueError, match="name: unknown test function 'sphere'.*rosenbrock"):
        get_test_function("sphere")


@pytest.mark.parametrize(("name", "dim"), [("himmelblau", 3), ("rosenbrock", 1), ("rastrigin", 0)])
def test_check_dim_rejects_undefined_dimensions(name: str, dim: int) -> None:
    with pytest.raises(ValueError, match="dim:"):
        get_test_function(name).check_dim(dim)


def test_himmelblau_rejects_other_dimensions() -> None:
    with pytest.raises(ValueError, match="2 dimensions"):
        himmelblau(torch.zeros(3))
