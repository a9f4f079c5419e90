"""Line searches checked on the inequalities themselves, and their named failures."""

from __future__ import annotations

import math

import pytest
import torch

from fuse_optim.line_search import (
    INTERVAL_TOO_SMALL,
    LINE_SEARCHES,
    MAX_EVALUATIONS,
    NO_DECREASE,
    Armijo,
    FixedStep,
    LineSearchResult,
    StrongWolfe,
    make_line_search,
)


class Problem:
    """phi(t) = f(x0 + t d) for a random smooth non-convex f in 5-D, recording every evaluation."""

    def __init__(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        self.frequencies, self.amplitudes = 3 * randn(5), randn(5)
        q = randn(5, 5)
        self.hessian = (q + q.T) / 2  # indefinite: the quadratic part is non-convex too
        self.x0 = randn(5)
        grad0 = self.gradient(self.x0)
        direction = -grad0 + grad0.norm() * randn(5)
        if torch.dot(direction, grad0) > 0:
            direction = -direction
        # scale so that t = 1 is sometimes far too long and sometimes far too short
        scale = 10 ** (4 * torch.rand(1, generator=generator, dtype=torch.float64).item() - 2)
        self.direction = direction * scale / direction.norm()
        self.trials: list[float] = []

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.amplitudes * torch.sin(self.frequencies * x)).sum() + 0.5 * x @ self.hessian @ x
                + 0.05 * (x @ x) ** 2)

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(self.f(x), x)
        return grad

    def phi(self, t: float) -> tuple[float, float]:
        x = self.x0 + t * self.direction
        return self.f(x).item(), float(torch.dot(self.gradient(x), self.direction))

    def evaluate(self, t: float) -> tuple[float, torch.Tensor, float]:
        self.trials.append(t)
        x = self.x0 + t * self.direction
        grad = self.gradient(x)
        return self.f(x).item(), grad, float(torch.dot(grad, self.direction))

    def start(self) -> tuple[float, float]:
        return self.phi(0.0)


def one_dimensional(phi):
    """evaluate(t) for a function phi of a scalar tensor t (direction d = 1)."""
    def evaluate(t: float) -> tuple[float, torch.Tensor, float]:
        tensor = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        value = phi(tensor)
        (grad,) = torch.autograd.grad(value, tensor)
        return value.item(), grad.reshape(1), grad.item()

    return evaluate


@pytest.mark.parametrize(("c1", "c2"), [(1e-4, 0.9), (1e-4, 0.1), (0.3, 0.4)])
def test_strong_wolfe_accepted_steps_satisfy_both_inequalities(c1: float, c2: float) -> None:
    search = StrongWolfe(c1=c1, c2=c2, max_evaluations=30)
    accepted = 0
    for seed in range(150):
        problem = Problem(seed)
        loss0, gtd0 = problem.start()
        assert gtd0 < 0
        result = search(problem.evaluate, loss0, gtd0, 1.0)
        assert result.evaluations == len(problem.trials) <= 30
        if not result.ok:
            assert result.failure in (MAX_EVALUATIONS, INTERVAL_TOO_SMALL)
            continue
        accepted += 1
        t = result.step
        loss, gtd = problem.phi(t)
        assert t > 0 and t in problem.trials
        # the result reports the values at the accepted point
        assert result.loss == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert result.gtd == pytest.approx(gtd, rel=1e-12, abs=1e-12)
        assert torch.allclose(result.grad, problem.gradient(problem.x0 + t * problem.direction))
        # Nocedal & Wright Eq. 3.7
        assert loss <= loss0 + c1 * t * gtd0 + 1e-12 * abs(loss0), f"sufficient decrease, seed {seed}"
        assert abs(gtd) <= c2 * abs(gtd0) + 1e-12, f"curvature, seed {seed}"
    assert accepted >= 140  # the check is not vacuous: almost every search succeeds


def test_strong_wolfe_on_a_quadratic_takes_the_exact_minimiser_first() -> None:
    # phi(t) = (t - 2)^2: t = 1 is too short, extrapolation brackets, interpolation lands on t = 2
    problem = one_dimensional(lambda t: (t - 2.0) ** 2)
    result = StrongWolfe(c2=0.1)(problem, 4.0, -4.0, 1.0)
    assert result.ok
    assert abs(result.gtd) <= 0.1 * 4.0
    assert result.step == pytest.approx(2.0, abs=0.2)


def test_failed_strong_wolfe_returns_the_best_decreasing_point() -> None:
    # phi(t) = -t decreases forever: no step satisfies the curvature condition
    result = StrongWolfe(max_evaluations=5)(one_dimensional(lambda t: -t), 0.0, -1.0, 1.0)
    assert result.failure == MAX_EVALUATIONS and not result.ok
    assert result.evaluations == 5
    assert result.step > 10.0 and result.loss == -result.step  # the furthest trial, which decreased f most


@pytest.mark.parametrize("seed", range(40))
def test_armijo_backtracks_geometrically_to_the_first_sufficient_decrease(seed: int) -> None:
    problem = Problem(seed)
    c1, shrink, initial = 1e-4, 0.3, 1.0
    loss0, gtd0 = problem.start()
    result = Armijo(c1=c1, shrink=shrink, max_evaluations=40)(problem.evaluate, loss0, gtd0, initial)
    assert result.ok, result.failure
    trials = problem.trials
    assert result.evaluations == len(trials)
    for i, t in enumerate(trials):
        assert t == pytest.approx(initial * shrink**i, rel=1e-12)
    for t in trials[:-1]:  # rejected: not enough decrease
        assert problem.phi(t)[0] > loss0 + c1 * t * gtd0
    assert result.step == trials[-1]
    loss, gtd = problem.phi(result.step)
    assert loss <= loss0 + c1 * result.step * gtd0
    assert result.loss == pytest.approx(loss, rel=1e-12, abs=1e-12)
    assert result.gtd == pytest.approx(gtd, rel=1e-12, abs=1e-12)


def test_armijo_takes_the_first_trial_when_it_is_good() -> None:
    evaluations = []

    def phi(t):
        evaluations.append(t)
        return (t - 1.0) ** 2

    result = Armijo()(one_dimensional(phi), 1.0, -2.0, 0.5)
    assert result.ok and result.step == 0.5 and result.evaluations == 1 and len(evaluations) == 1


def ascent(t):
    return (t + 1.0) ** 2  # phi'(0) = +2: the direction goes uphill


def nan_beyond_zero(t):
    return t * float("nan")  # NaN for every trial t > 0


def test_ascent_direction_fails_with_named_reasons() -> None:
    armijo = Armijo(max_evaluations=7)(one_dimensional(ascent), 1.0, 2.0, 1.0)
    assert (armijo.failure, armijo.step, armijo.evaluations, armijo.grad) == (NO_DECREASE, 0.0, 7, None)
    assert armijo.loss == 1.0
    wolfe = StrongWolfe()(one_dimensional(ascent), 1.0, 2.0, 1.0)
    assert wolfe.failure == INTERVAL_TOO_SMALL and wolfe.step == 0.0 and wolfe.grad is None
    assert wolfe.evaluations < 25


def test_nan_loss_fails_with_named_reasons() -> None:
    assert Armijo(max_evaluations=4)(one_dimensional(nan_beyond_zero), 0.0, -1.0, 1.0).failure == NO_DECREASE
    fixed = FixedStep()(one_dimensional(nan_beyond_zero), 0.0, -1.0, 1.0)
    assert (fixed.failure, fixed.step, fixed.evaluations) == (NO_DECREASE, 0.0, 1)
    # a NaN trial counts as f = +inf: the strong Wolfe search bisects towards 0 ...
    wolfe = StrongWolfe(max_evaluations=25)(one_dimensional(nan_beyond_zero), 0.0, -1.0, 1.0)
    assert (wolfe.failure, wolfe.step, wolfe.evaluations) == (MAX_EVALUATIONS, 0.0, 25)
    # ... until its bracket is shorter than the relative tolerance (2^-10 < 1e-3 after 11 trials)
    wolfe = StrongWolfe(tolerance_change=1e-3)(one_dimensional(nan_beyond_zero), 0.0, -1.0, 1.0)
    assert (wolfe.failure, wolfe.step, wolfe.evaluations) == (INTERVAL_TOO_SMALL, 0.0, 11)


def test_strong_wolfe_steps_back_from_a_nan_region() -> None:
    # f = (t - 1)^2 for t < 3 and NaN beyond: a first trial of t = 8 must be bracketed back
    def phi(t):
        return (t - 1.0) ** 2 if t.item() < 3 else t * float("nan")

    result = StrongWolfe()(one_dimensional(phi), 1.0, -2.0, 8.0)
    assert result.ok and 0 < result.step < 3 and math.isfinite(result.loss)


def test_fixed_step_evaluates_once() -> None:
    result = FixedStep()(one_dimensional(lambda t: (t - 1.0) ** 2), 1.0, -2.0, 0.25)
    assert (result.step, result.evaluations, result.failure) == (0.25, 1, None)
    assert result.loss == pytest.approx(0.5625)
    # no decrease is required: a fixed step is taken even when it increases f
    result = FixedStep()(one_dimensional(lambda t: (t - 1.0) ** 2), 1.0, -2.0, 3.0)
    assert result.ok and result.loss == pytest.approx(4.0)


def test_failure_constants_are_distinct_names() -> None:
    names = {MAX_EVALUATIONS, NO_DECREASE, INTERVAL_TOO_SMALL}
    assert len(names) == 3 and all(isinstance(n, str) and n for n in names)
    assert LineSearchResult(0.0, 0.0, None, 0.0, 1, NO_DECREASE).ok is False
    assert LineSearchResult(1.0, 0.0, None, 0.0, 1).ok is True


def test_make_line_search() -> None:
    assert isinstance(make_line_search("strong_wolfe", c1=0.1, c2=0.5), StrongWolfe)
    assert isinstance(make_line_search("armijo"), Armijo)
    assert isinstance(make_line_search(None), FixedStep)
    assert set(LINE_SEARCHES) == {"strong_wolfe", "armijo", "fixed"}
    custom = Armijo(shrink=0.25)
    assert make_line_search(custom) is custom
    with pytest.raises(ValueError, match="line_search"):
        make_line_search("wolfe")
    with pytest.raises(ValueError, match="line_search"):
        make_line_search("armijo", c2=0.9)  # Armijo has no curvature constant
    with pytest.raises(ValueError, match="line_search"):
        make_line_search(3)


@pytest.mark.parametrize(("factory", "argument"), [
    (lambda: StrongWolfe(c1=0.5, c2=0.4), "c1"),
    (lambda: StrongWolfe(c1=0.0), "c1"),
    (lambda: StrongWolfe(c2=1.0), "c2"),
    (lambda: StrongWolfe(max_evaluations=0), "max_evaluations"),
    (lambda: Armijo(c1=1.0), "c1"),
    (lambda: Armijo(shrink=1.0), "shrink"),
    (lambda: Armijo(shrink=0.0), "shrink"),
    (lambda: Armijo(max_evaluations=2.5), "max_evaluations"),
])
def test_bad_line_search_constants(factory, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        factory()
