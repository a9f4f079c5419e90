"""Fuse (paper Algorithm 3): its two ends are Adam and FusePV's L-BFGS exactly; in between it blends."""

from __future__ import annotations

import pytest
import torch

from fuse_optim import Fuse, FusePV
from fuse_optim.test_functions import TEST_FUNCTIONS

from .problems import step_iterates

ROSENBROCK = TEST_FUNCTIONS["rosenbrock"]


def start(dim: int = 4) -> torch.Tensor:
    return torch.tensor(ROSENBROCK.default_start(dim), dtype=torch.float64).requires_grad_()


def run(opt: torch.optim.Optimizer, x: torch.Tensor, steps: int, fn=ROSENBROCK.fn) -> list[torch.Tensor]:
    return step_iterates(opt, x, steps, fn)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("theta", [1.0, 1, {"schedule": "constant", "theta": 1.0}, lambda step: 1.0],
                         ids=["float", "int", "dict", "callable"])
@pytest.mark.parametrize("options", [{"lr": 1e-2}, {"lr": 3e-2, "betas": (0.8, 0.99), "weight_decay": 1e-2,
                                                    "amsgrad": True, "foreach": False}], ids=["plain", "amsgrad_wd"])
def test_theta_one_is_torch_adam(theta, options: dict) -> None:
    x_adam, x_fuse = start(), start()
    adam = torch.optim.Adam([x_adam], **options)
    fuse = Fuse([x_fuse], theta=theta, **options)
    expected, got = run(adam, x_adam, 30), run(fuse, x_fuse, 30)
    assert max_diff(expected, got) <= 1e-12
    assert max_diff(got, [start().detach()] * 30) > 1e-2
    assert fuse.phase == "adam" and fuse.last_step_info.theta == 1.0 and fuse.closure_calls == 30
    assert fuse.pairs_accepted == 0 and fuse._memory is None  # no L-BFGS work at all


def test_theta_one_without_closure() -> None:
    x_adam, x_fuse = start(), start()
    adam, fuse = torch.optim.Adam([x_adam], lr=1e-2), Fuse([x_fuse], lr=1e-2, theta=1.0)
    for _ in range(10):
        for opt, x in ((adam, x_adam), (fuse, x_fuse)):
            opt.zero_grad()
            ROSENBROCK.fn(x).backward()
            opt.step()
    assert torch.equal(x_adam, x_fuse)


@pytest.mark.parametrize("policy", ["strong_wolfe", "armijo", "fixed"])
def test_theta_zero_is_fuse_pv_lbfgs_exactly(policy: str) -> None:
    x_pv, x_fuse = start(), start()
    fuse_pv = FusePV([x_pv], switch={"criterion": "step", "step": 0}, line_search=policy, history_size=5)
    fuse = Fuse([x_fuse], theta=0.0, line_search=policy, history_size=5)
    expected, got = run(fuse_pv, x_pv, 30), run(fuse, x_fuse, 30)
    assert max_diff(expected, got) == 0.0
    assert fuse.closure_calls == fuse_pv.closure_calls and fuse.pairs_accepted == fuse_pv.pairs_accepted > 0
    assert fuse.phase == "lbfgs" and fuse.last_step_info.theta == 0.0
    assert len(fuse.state[x_fuse]) == 0  # Adam's moments untouched


def test_step_schedule_equals_fuse_pv_with_a_step_switch() -> None:
    x_pv, x_fuse = start(), start()
    fuse_pv = FusePV([x_pv], lr=1e-2, switch={"criterion": "step", "step": 6}, line_search="strong_wolfe")
    fuse = Fuse([x_fuse], lr=1e-2, theta={"schedule": "step", "boundaries": [6], "values": [1.0, 0.0]},
                line_search="strong_wolfe")
    assert max_diff(run(fuse_pv, x_pv, 25), run(fuse, x_fuse, 25)) == 0.0


@pytest.mark.parametrize("theta", [0.3, 0.8])
@pytest.mark.parametrize("policy", ["armijo", "strong_wolfe"])
def test_first_blend_step_is_the_convex_combination(theta: float, policy: str) -> None:
    x_adam, x_lbfgs, x_fuse = start(), start(), start()
    run(torch.optim.Adam([x_adam], lr=0.1), x_adam, 1)
    run(FusePV([x_lbfgs], switch={"criterion": "step", "step": 0}, line_search=policy), x_lbfgs, 1)
    fuse = Fuse([x_fuse], lr=0.1, theta=theta, line_search=policy)
    run(fuse, x_fuse, 1)
    expected = theta * x_adam.detach() + (1 - theta) * x_lbfgs.detach()
    torch.testing.assert_close(x_fuse.detach(), expected, rtol=0, atol=1e-14)
    assert (x_adam - x_lbfgs).abs().max() > 1e-3  # the two updates differ: the blend is not trivial
    assert fuse.phase == "blend" and fuse.last_step_info.theta == theta
    # the curvature pair is (x_1 - x_0, g(x_1) - g(x_0)), from the blended point
    assert fuse.pairs_accepted == 1


@pytest.mark.parametrize("policy", ["armijo", "strong_wolfe", "fixed"])
def test_blend_reports_closure_calls_and_descends(policy: str, make_closure, quadratic_problem) -> None:
    a, b = quadratic_problem["A"], quadratic_problem["b"]
    x = quadratic_problem["x0"].clone().requires_grad_()
    fuse = Fuse([x], lr=0.05, theta={"schedule": "linear", "steps": 20, "start": 0.9, "end": 0.1},
                line_search=policy)

    def fn(v):
        return 0.5 * v @ a @ v - b @ v

    closure = make_closure(fuse, [x], fn)
    losses, thetas = [], []
    for _ in range(40):
        before = make_closure.calls
        losses.append(fuse.step(closure).item())
        info = fuse.last_step_info
        thetas.append(info.theta)
        assert info.closure_calls == make_closure.calls - before
        assert info.closure_calls >= 3  # x_k, at least one trial, and the blended point
        if policy == "fixed":
            assert info.closure_calls == 3
    assert fuse.closure_calls == make_closure.calls
    assert thetas[0] == pytest.approx(0.9) and thetas[10] == pytest.approx(0.5) and thetas[-1] == pytest.approx(0.1)
    f_star = float(fn(quadratic_problem["x_star"]))
    assert losses[-1] < losses[0]
    assert (losses[-1] - f_star) < 1e-2 * (losses[0] - f_star)


def test_schedule_out_of_range_at_step_time() -> None:
    x = start()
    fuse = Fuse([x], theta=lambda step: 1.0 if step < 2 else 1.5)
    run(fuse, x, 2)
    with pytest.raises(ValueError, match="theta"):
        run(fuse, x, 1)
    nan_fuse = Fuse([start()], theta=lambda step: float("nan"))
    with pytest.raises(ValueError, match="theta"):
        nan_fuse.step(lambda: torch.tensor(0.0))


def test_blend_needs_a_closure() -> None:
    x = start()
    fuse = Fuse([x], theta=0.5)
    ROSENBROCK.fn(x).backward()
    with pytest.raises(RuntimeError, match="closure"):
        fuse.step()


def test_end_epoch_counts_epochs() -> None:
    fuse = Fuse([start()], theta=0.5)
    assert fuse.end_epoch() is False and fuse.end_epoch() is False
    assert fuse.epoch == 2


def record_points(opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> list[list[torch.Tensor]]:
    """The point of every closure call, per step."""
    per_step: list[list[torch.Tensor]] = []

    def closure() -> torch.Tensor:
        per_step[-1].append(x.detach().clone())
        opt.zero_grad()
        loss = ROSENBROCK.fn(x)
        loss.backward()
        return loss

    for _ in range(steps):
        per_step.append([])
        opt.step(closure)
    return per_step


@pytest.mark.parametrize("theta", [0.3, 0.7])
@pytest.mark.parametrize("policy", ["armijo", "strong_wolfe"])
def test_blend_line_search_starts_from_x_k(theta: float, policy: str) -> None:
    """Algorithm 3: both updates start from x_k. Every line-search trial of a blend step is x_k + t d with
    d FusePV's L-BFGS direction at x_k (the same memory), not the Adam point x^A + t d; so the trials and the
    accepted step equal those of a pure L-BFGS step (theta = 0) taken from the same x_k and memory."""
    x_fuse, x_lbfgs = start(), start()
    fuse = Fuse([x_fuse], lr=0.1, theta=theta, line_search=policy)
    reference = Fuse([x_lbfgs], lr=0.1, theta=theta, line_search=policy)
    for step in range(6):
        # the reference continues from this step's state with theta = 0: one L-BFGS step from the same x_k
        reference.load_state_dict(fuse.state_dict())
        with torch.no_grad():
            x_lbfgs.copy_(x_fuse)
        reference.theta = lambda _: 0.0
        expected = record_points(reference, x_lbfgs, 1)[0]
        got = record_points(fuse, x_fuse, 1)[0]
        assert torch.equal(got[0], expected[0])  # x_k
        trials_got, trials_expected = got[1:-1], expected[1:]  # the blend step ends with a call at x_{k+1}
        assert len(trials_got) == len(trials_expected), f"step {step}"
        for p, q in zip(trials_got, trials_expected, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-15)
        assert fuse.last_step_info.step_size == reference.last_step_info.step_size


@pytest.mark.parametrize("policy", ["armijo", "strong_wolfe", "fixed"])
def test_blend_at_a_stationary_point_stays_exactly_and_records_no_recovery(policy: str) -> None:
    """At the minimiser both updates are zero: x_{k+1} = x_k bit for bit (no theta x + (1 - theta) x rounding)
    and the zero gradient is convergence, not a failed direction."""
    x = torch.ones(4, dtype=torch.float64, requires_grad=True)  # Rosenbrock's minimiser: g = 0 exactly
    fuse = Fuse([x], lr=0.1, theta=0.3, line_search=policy)
    run(fuse, x, 20)
    assert torch.equal(x.detach(), torch.ones(4, dtype=torch.float64))
    assert fuse.recoveries == 0 and fuse.recovery_log == [] and fuse.last_step_info.failure == "converged"
