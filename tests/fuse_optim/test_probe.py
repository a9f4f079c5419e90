"""The probe criterion: a short trial of FusePV's L-BFGS phase, kept when it gains more loss per gradient evaluation
than Adam's measured pace, else undone. Checked against scipy's regression, against the probe written out here with
a separately built L-BFGS-from-the-start FusePV, against torch.optim.Adam for the undone probes, for its state
mid-probe, and for its errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy import stats

from fuse_optim import FusePV, make_criterion
from fuse_optim.switch import ADAM_PACE_ERRORS, ProbeCriterion, _TrendAccumulator


def quadratic(dimension: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(dimension, dimension, generator=generator, dtype=torch.float64)
    return a @ a.T / dimension + 0.1 * torch.eye(dimension, dtype=torch.float64), torch.randn(
        dimension, generator=generator, dtype=torch.float64)


def make_closure(optimizer_ref: list, x: torch.Tensor, q: torch.Tensor, b: torch.Tensor, calls: list[int]):
    def closure() -> torch.Tensor:
        optimizer_ref[0].zero_grad()
        calls[0] += 1
        loss = 0.5 * x @ q @ x - b @ x
        loss.backward()
        return loss

    return closure


def test_trend_matches_scipy_linregress() -> None:
    generator = torch.Generator().manual_seed(1)
    values = (3.0 - 0.05 * torch.arange(17, dtype=torch.float64) + 0.1 * torch.randn(17, generator=generator,
                                                                                     dtype=torch.float64))
    trend = _TrendAccumulator()
    for value in values:
        trend.add(value)
    summary = trend.pop()
    reference = stats.linregress(range(17), values.tolist())
    assert summary.slope == pytest.approx(reference.slope, rel=1e-9)
    assert summary.slope_error == pytest.approx(reference.stderr, rel=1e-9)
    assert summary.mean == pytest.approx(float(values.mean()), rel=1e-12)
    residuals = values.numpy() - (reference.intercept + reference.slope * torch.arange(17).numpy())
    assert summary.residual_variance == pytest.approx(float((residuals**2).sum() / 15), rel=1e-9)
    assert trend.count == 0 and trend.pop() is None  # reset; an empty period has no summary


def run_probe_fuse_pv(ratio: float, lr: float = 1e-3, steps: int = 10, epochs: int = 2, probe_steps: int = 4):
    q, b = quadratic()
    x = torch.zeros(q.shape[0], dtype=torch.float64, requires_grad=True)
    ref: list = [None]
    calls = [0]
    optimizer = FusePV([x], lr=lr, switch={"criterion": "probe", "ratio": ratio, "probe_steps": probe_steps},
                       line_search="strong_wolfe", deterministic_closure=True)
    ref[0] = optimizer
    closure = make_closure(ref, x, q, b, calls)
    snapshots = []
    for _ in range(epochs):
        for _ in range(steps):
            snapshots.append((optimizer.probing, x.detach().clone()))
            optimizer.step(closure)
        optimizer.end_epoch()
    return optimizer, x, snapshots, calls[0]


def written_out_rho(x0: torch.Tensor, adam_losses: list[float], probe_steps: int) -> float:
    """The statistic as stated, with a FusePV built to run L-BFGS from its first step (``step`` criterion 0)."""
    q, b = quadratic()
    fit = stats.linregress(range(len(adam_losses)), adam_losses)
    rate = -fit.slope + ADAM_PACE_ERRORS * fit.stderr
    x = x0.clone().requires_grad_(True)
    ref: list = [None]
    calls = [0]
    lbfgs = FusePV([x], switch={"criterion": "step", "step": 0}, line_search="strong_wolfe",
                   deterministic_closure=True)
    ref[0] = lbfgs
    closure = make_closure(ref, x, q, b, calls)
    f0 = float(0.5 * x0 @ q @ x0 - b @ x0)
    gain = weighted = 0.0
    for j in range(probe_steps):
        value = float(0.5 * x.detach() @ q @ x.detach() - b @ x.detach())
        if j > 0:
            gain += f0 - value
            weighted += lbfgs.closure_calls
        lbfgs.step(closure)
    return gain / (rate * weighted)


def test_a_won_probe_is_the_rule_written_out_and_starts_the_lbfgs_phase() -> None:
    optimizer, x, snapshots, _ = run_probe_fuse_pv(ratio=1.0, lr=1e-3)
    assert optimizer.phase == "lbfgs" and optimizer.criterion.probes == 1
    assert optimizer.switched_at_step == 10  # the probe's 4 steps became the first of the L-BFGS phase
    assert optimizer.switched_at_epoch == 1
    assert optimizer.switch_reason.startswith("probe(")
    # Adam's losses over the first epoch, from a plain Adam run on the same problem
    q, b = quadratic()
    y = torch.zeros(q.shape[0], dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([y], lr=1e-3)
    losses = []
    for _ in range(10):
        adam.zero_grad()
        loss = 0.5 * y @ q @ y - b @ y
        loss.backward()
        losses.append(float(loss.detach()))
        adam.step()
    torch.testing.assert_close(snapshots[10][1], y.detach(), rtol=1e-12, atol=1e-12)
    expected = written_out_rho(y.detach(), losses, 4)
    assert optimizer.criterion.statistic == pytest.approx(expected, rel=1e-9)
    assert expected > 1  # Adam at lr 1e-3 is far slower than L-BFGS on a quadratic


def test_a_lost_probe_is_undone_exactly_and_adam_continues_as_torch_adam() -> None:
    optimizer, x, snapshots, calls = run_probe_fuse_pv(ratio=1e12, lr=1e-2, steps=10, epochs=3)
    # one probe, at the end of period 1: L-BFGS's gain was far below 1e12 x Adam's, so the next waits
    assert optimizer.phase == "adam" and optimizer.criterion.probes == 1
    assert math.isfinite(optimizer.criterion.statistic) and optimizer.criterion.statistic < 1e12
    adam_steps = int(optimizer.state[x]["step"])
    assert adam_steps == 30 - 4
    q, b = quadratic()
    y = torch.zeros(q.shape[0], dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([y], lr=1e-2)
    for _ in range(adam_steps):
        adam.zero_grad()
        (0.5 * y @ q @ y - b @ y).backward()
        adam.step()
    torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-12, atol=1e-12)
    assert calls == optimizer.closure_calls > adam_steps  # the probes' evaluations are counted


@pytest.mark.parametrize(("rho", "asked"), [
    (0.5, [1, 2, 4, 8]),        # Adam twice as fast: ask again after twice the periods so far
    (0.1, [1, 10]),             # ten times as fast: not before period 10
    (0.9, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),  # nearly level: the next period
    (-1.0, [1]),                # the probe gained nothing: never again
])
def test_lost_probes_wait_for_adams_pace_to_fall_to_lbfgss(rho: float, asked: list[int]) -> None:
    criterion = ProbeCriterion(ratio=1.0)
    periods = []
    for period in range(1, 11):
        for t in range(5):
            criterion.observe_step(torch.tensor(1.0 - 0.01 * t - 0.05 * period, dtype=torch.float64), None)
        criterion.end_epoch()
        if criterion.wants_probe:
            periods.append(period)
            rate = criterion.take_rate()
            assert not criterion.judge(gain=rho * rate * 10.0, weighted_evaluations=10.0, rate=rate)
            assert criterion.statistic == pytest.approx(rho)
    assert periods == asked
    assert not criterion.ready(0, 10)


def test_a_minibatch_probe_measures_its_gain_on_each_steps_own_closure() -> None:
    """Two alternating 'minibatches': each reference f_j(x_0) costs one evaluation on that step's closure."""
    q, b = quadratic()
    shifts = [b, -0.5 * b]
    x = torch.zeros(q.shape[0], dtype=torch.float64, requires_grad=True)
    optimizer = FusePV([x], lr=1e-3, switch={"criterion": "probe", "probe_steps": 3}, line_search="armijo")
    calls = [0]
    for epoch in range(2):
        for step in range(8):
            target = shifts[step % 2]

            def closure(target: torch.Tensor = target) -> torch.Tensor:
                optimizer.zero_grad()
                calls[0] += 1
                loss = 0.5 * x @ q @ x - target @ x
                loss.backward()
                return loss

            before = optimizer.closure_calls
            probing = optimizer.probing or (epoch == 1 and step == 0)
            optimizer.step(closure)
            if probing and step > 0:
                assert optimizer.closure_calls - before >= 2  # the reference at x_0, then the L-BFGS step
        optimizer.end_epoch()
    assert optimizer.criterion.probes == 1 and optimizer.criterion.statistic is not None
    assert calls[0] == optimizer.closure_calls


def test_state_dict_mid_probe_resumes_identically() -> None:
    q, b = quadratic()

    def build():
        x = torch.zeros(q.shape[0], dtype=torch.float64, requires_grad=True)
        optimizer = FusePV([x], lr=1e-3, switch={"criterion": "probe", "probe_steps": 4}, line_search="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = 0.5 * x @ q @ x - b @ x
            loss.backward()
            return loss

        return x, optimizer, closure

    x, optimizer, closure = build()
    for _ in range(6):
        optimizer.step(closure)
    optimizer.end_epoch()
    for _ in range(2):
        optimizer.step(closure)
    assert optimizer.probing
    saved, saved_x = copy.deepcopy(optimizer.state_dict()), x.detach().clone()
    for _ in range(6):
        optimizer.step(closure)
    x2, resumed, closure2 = build()
    with torch.no_grad():
        x2.copy_(saved_x)
    resumed.load_state_dict(saved)
    assert resumed.probing
    for _ in range(6):
        resumed.step(closure2)
    assert resumed.phase == optimizer.phase == "lbfgs"
    assert resumed.criterion.statistic == optimizer.criterion.statistic
    torch.testing.assert_close(x2.detach(), x.detach(), rtol=0, atol=0)


def test_any_of_probe_and_plateau_runs_the_probe_inside_fuse_pv() -> None:
    q, b = quadratic()
    x = torch.zeros(q.shape[0], dtype=torch.float64, requires_grad=True)
    optimizer = FusePV([x], lr=1e-3, switch={"criterion": "any", "of": [{"criterion": "probe"},
                                                                         {"criterion": "plateau"}]})

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * x @ q @ x - b @ x
        loss.backward()
        return loss

    for _ in range(2):
        for _ in range(10):
            optimizer.step(closure)
        optimizer.end_epoch()
    assert optimizer.phase == "lbfgs" and optimizer.switch_reason.startswith("any[probe(")


@pytest.mark.parametrize(("options", "message"), [
    ({"ratio": 0}, "ratio must be a finite number > 0"),
    ({"probe_steps": 1}, "probe_steps must be an integer >= 2"),
    ({"min_periods": 0}, "min_periods must be an integer >= 1"),
    ({"window": 0}, "window must be None"),
])
def test_bad_settings_name_the_argument(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_criterion({"criterion": "probe", **options})


def test_probe_steps_alone_names_the_criterion_and_two_probes_are_refused() -> None:
    assert isinstance(make_criterion({"probe_steps": 3}), ProbeCriterion)
    with pytest.raises(ValueError, match="at most one 'probe'"):
        make_criterion({"criterion": "any", "of": ["probe", "probe"]})


def test_the_adam_then_sgd_baseline_refuses_the_probe_in_one_line() -> None:
    from fuse_tune.optimizers import build_optimizer

    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="switch: the 'probe' criterion") as error:
        build_optimizer("adam_sgd", model.parameters(), {"switch": {"criterion": "probe"}})
    assert "\n" not in str(error.value)
