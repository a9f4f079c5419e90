"""Failures in the L-BFGS phase are named and recovered: parameters stay finite and training goes on."""

from __future__ import annotations

import pytest
import torch

from fuse_optim import Fuse, FusePV, LBFGSMemory
from fuse_optim.fuse import RECOVERY_NON_FINITE, RECOVERY_NOT_DESCENT
from fuse_optim.line_search import INTERVAL_TOO_SMALL, MAX_EVALUATIONS, NO_DECREASE

LR = 1e-2


class PoisonedProblem:
    """A convex problem whose closure can be poisoned for one step at a time.

    Modes: ``loss_nan`` (every call returns NaN), ``grad_nan`` (finite loss, NaN gradients),
    ``trials_inf`` (+inf everywhere except at x_k, the step's first call), ``first_trial_nan``
    (only the first line-search trial is NaN).
    """

    def __init__(self, quadratic_problem, optimizer_class=FusePV, **options) -> None:
        self.a, self.b = quadratic_problem["A"], quadratic_problem["b"]
        self.x_star = quadratic_problem["x_star"]
        self.x = quadratic_problem["x0"].clone().requires_grad_()
        if optimizer_class is FusePV:
            options.setdefault("switch", {"criterion": "step", "step": 0})
        options.setdefault("lbfgs_lr", 1.0)
        self.opt = optimizer_class([self.x], lr=LR, **options)
        self.mode: str | None = None
        self.calls_this_step = 0

    def closure(self) -> torch.Tensor:
        self.calls_this_step += 1
        self.opt.zero_grad()
        loss = 0.5 * self.x @ self.a @ self.x - self.b @ self.x
        loss.backward()
        if self.mode == "grad_nan":
            self.x.grad.fill_(float("nan"))
        if (self.mode == "loss_nan" or (self.mode == "trials_inf" and self.calls_this_step > 1)
                or (self.mode == "first_trial_nan" and self.calls_this_step == 2)):
            return torch.full_like(loss, float("inf") if self.mode == "trials_inf" else float("nan"))
        return loss

    def step(self, mode: str | None = None) -> torch.Tensor:
        self.mode, self.calls_this_step = mode, 0
        loss = self.opt.step(self.closure)
        assert torch.isfinite(self.x).all(), f"non-finite parameters after a {mode!r} step"
        self.mode = None
        return loss

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        return self.a @ x - self.b

    def gap(self) -> float:
        """Relative gap f(x) - f(x*), over |f(x*)|."""
        with torch.no_grad():
            def f(x):
                return float(0.5 * x @ self.a @ x - self.b @ x)
            return (f(self.x) - f(self.x_star)) / abs(f(self.x_star))

    def steps_to_converge(self, max_steps: int, tolerance: float = 1e-9) -> int | None:
        """Clean steps until the relative gap is below ``tolerance`` (None if it never is)."""
        for k in range(max_steps):
            if self.gap() <= tolerance:
                return k
            self.step()
        return None


def memory_count(opt) -> int:
    return opt._memory.count


@pytest.mark.parametrize("policy", ["armijo", "strong_wolfe", "fixed"])
@pytest.mark.parametrize("mode", ["loss_nan", "grad_nan"])
def test_non_finite_at_x_k_restores_and_resets(quadratic_problem, policy: str, mode: str) -> None:
    problem = PoisonedProblem(quadratic_problem, line_search=policy)
    iterates = [problem.x.detach().clone()]
    for _ in range(5):
        problem.step()
        iterates.append(problem.x.detach().clone())
    opt = problem.opt
    assert opt.recoveries == 0 and memory_count(opt) > 0
    problem.step(mode)
    assert opt.recoveries == 1
    assert opt.recovery_log == [(5, RECOVERY_NON_FINITE)]
    assert memory_count(opt) == 0
    info = opt.last_step_info
    assert (info.phase, info.failure, info.closure_calls, info.recoveries) == ("lbfgs", RECOVERY_NON_FINITE, 1, 1)
    assert info.step_size is None
    # the parameters are a point that was good before: x_k itself or the start of the previous step
    now = problem.x.detach()
    assert torch.equal(now, iterates[-1]) or torch.equal(now, iterates[-2])
    # training continues and converges, with no further failure on the way
    assert problem.steps_to_converge(max_steps=60) is not None
    assert opt.recoveries == 1


@pytest.mark.parametrize(("policy", "expected_failures"), [
    ("armijo", {NO_DECREASE}),
    ("strong_wolfe", {INTERVAL_TOO_SMALL, MAX_EVALUATIONS}),
    ("fixed", {NO_DECREASE}),
])
def test_no_acceptable_step_restores_x_k_and_stays_there(quadratic_problem, policy: str,
                                                          expected_failures: set[str]) -> None:
    problem = PoisonedProblem(quadratic_problem, line_search=policy)
    for _ in range(4):
        problem.step()
    opt = problem.opt
    assert memory_count(opt) > 0
    x_k = problem.x.detach().clone()
    failures_before = opt.line_search_failures
    problem.step("trials_inf")
    info = opt.last_step_info
    assert info.failure in expected_failures
    assert opt.recovery_log == [(4, info.failure)]
    assert opt.recoveries == 1 and opt.line_search_failures == failures_before + 1
    assert info.step_size == 0.0 and info.closure_calls == problem.calls_this_step
    assert memory_count(opt) == 0
    # x_{k+1} = x_k: no unchecked "safe" step (its length would be unbounded in lr); the next step
    # starts again from steepest descent with the memory forgotten
    assert torch.equal(problem.x.detach(), x_k)
    # training continues and converges, with no further failure on the way
    assert problem.steps_to_converge(max_steps=60) is not None
    assert opt.recoveries == 1


@pytest.mark.parametrize("policy", ["armijo", "strong_wolfe"])
def test_a_nan_trial_point_is_searched_away_without_recovery(quadratic_problem, policy: str) -> None:
    problem = PoisonedProblem(quadratic_problem, line_search=policy, lbfgs_lr=1.0)
    for _ in range(4):
        problem.step()
    opt = problem.opt
    count = memory_count(opt)
    loss_before = problem.gap()
    problem.step("first_trial_nan")
    info = opt.last_step_info
    assert opt.recoveries == 0 and info.failure is None and 0 < info.step_size < 1.0
    assert info.closure_calls >= 3
    assert problem.gap() < loss_before
    assert memory_count(opt) == min(count + 1, 10)
    if policy == "armijo":
        assert info.step_size == 0.5  # one backtrack by shrink = 0.5 from t0 = 1


def test_strong_wolfe_budget_exhausted_still_takes_the_best_step(quadratic_problem) -> None:
    # with one evaluation the first trial is rarely a strong-Wolfe point, but it may decrease f
    problem = PoisonedProblem(quadratic_problem, line_search="strong_wolfe", max_evaluations=1, lbfgs_lr=0.05)
    x_k = problem.x.detach().clone()
    gap0 = problem.gap()
    problem.step()
    info = problem.opt.last_step_info
    assert info.failure == MAX_EVALUATIONS and info.step_size > 0
    assert problem.opt.line_search_failures == 1 and problem.opt.recoveries == 0
    assert problem.gap() < gap0 and not torch.equal(problem.x.detach(), x_k)


def test_not_a_descent_direction_falls_back_to_steepest_descent(quadratic_problem, monkeypatch) -> None:
    problem = PoisonedProblem(quadratic_problem, line_search="armijo")
    for _ in range(3):
        problem.step()
    original = LBFGSMemory.direction
    calls = []

    def uphill_once(self, grad, scale=None, *, out=None):
        calls.append(self.count)
        return grad.clone() if len(calls) == 1 else original(self, grad, scale, out=out)

    monkeypatch.setattr(LBFGSMemory, "direction", uphill_once)
    gap_before = problem.gap()
    problem.step()
    opt = problem.opt
    assert opt.recovery_log == [(3, RECOVERY_NOT_DESCENT)] and opt.recoveries == 1
    assert calls[0] > 0 and calls[1] == 0  # memory reset before the second direction: -g
    assert opt.last_step_info.failure == RECOVERY_NOT_DESCENT and opt.last_step_info.step_size > 0
    assert problem.gap() < gap_before


def test_recovery_in_the_fuse_blend_step(quadratic_problem) -> None:
    problem = PoisonedProblem(quadratic_problem, optimizer_class=Fuse, theta=0.5)
    for _ in range(3):
        problem.step()
    opt = problem.opt
    problem.step("loss_nan")
    assert opt.recovery_log[-1] == (3, RECOVERY_NON_FINITE) and memory_count(opt) == 0
    problem.step("trials_inf")  # the line search fails and the point x_{k+1} is +inf too
    assert opt.recoveries >= 2
    assert problem.steps_to_converge(max_steps=60, tolerance=1e-4) is not None


def test_recovery_log_is_bounded_and_round_trips(quadratic_problem) -> None:
    problem = PoisonedProblem(quadratic_problem, line_search="armijo")
    for _ in range(130):
        problem.step("loss_nan")
    opt = problem.opt
    assert opt.recoveries == 130 and len(opt.recovery_log) == 100
    assert opt.recovery_log[-1] == (129, RECOVERY_NON_FINITE) and opt.recovery_log[0][0] == 30
    copy = FusePV([problem.x.detach().clone().requires_grad_()], lr=LR, switch={"criterion": "step", "step": 0})
    copy.load_state_dict(opt.state_dict())
    assert copy.recoveries == 130 and copy.recovery_log == opt.recovery_log
    assert torch.equal(problem.x.detach(), quadratic_problem["x0"])  # every step was refused


@pytest.mark.parametrize("policy", ["armijo", "strong_wolfe"])
def test_at_the_optimum_rounding_is_not_a_failure_and_x_stays(quadratic_problem, policy: str) -> None:
    """With no gradient tolerance the iteration runs on at the optimum, where f cannot decrease any more
    in float64: a loss change at the rounding level of f is not a failed search, and x stays near x*."""
    problem = PoisonedProblem(quadratic_problem, line_search=policy, tolerance_grad=0.0)
    for _ in range(80):
        problem.step()
    for _ in range(40):
        problem.step()
        assert (problem.x.detach() - problem.x_star).norm() < 1e-6
    if policy == "armijo":  # Armijo tests f alone; strong Wolfe's curvature test can still fail on noise
        assert problem.opt.line_search_failures == 0
