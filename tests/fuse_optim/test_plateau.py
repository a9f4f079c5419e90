"""The plateau criterion: switch when the smoothed loss falls at most `ratio` times as fast as in Adam's best
period. Checked against the rule written out here, for invariance to the loss's scale and offset, for its state,
and inside FusePV."""

from __future__ import annotations

import math

import pytest
import torch

from fuse_optim import FusePV, make_criterion
from fuse_optim.switch import PlateauCriterion


def reference_fire(epoch_means: list[float], ratio: float, min_periods: int = 2) -> int | None:
    """The rule as stated: the first epoch count e >= min_periods + 1 whose decrease is <= ratio x the best."""
    best = -math.inf
    for e in range(1, len(epoch_means)):
        progress = epoch_means[e - 1] - epoch_means[e]
        best = max(best, progress)
        if e >= min_periods and best > 0 and progress <= ratio * best:
            return e + 1  # epochs completed when it fires
    return None


def feed(criterion: PlateauCriterion, epochs: list[list[float]]) -> int | None:
    """Feed per-step losses epoch by epoch; the number of completed epochs at which it fired."""
    for e, losses in enumerate(epochs, start=1):
        for loss in losses:
            criterion.observe_step(torch.tensor(loss, dtype=torch.float64), None)
        criterion.end_epoch()
        if criterion.ready(0, e):
            return e
    return None


CURVES = {
    "fast then flat": [1.0, 0.5, 0.3, 0.26, 0.24, 0.235, 0.233],  # no progress on a ratio boundary
    "slow start": [1.0, 0.95, 0.7, 0.4, 0.3, 0.28, 0.275],
    "noisy rise": [1.0, 0.6, 0.65, 0.5, 0.45],
    "steady": [1.0 - 0.1 * e for e in range(8)],
}


@pytest.mark.parametrize("name", sorted(CURVES))
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3])
def test_fires_where_the_rule_written_out_fires(name: str, ratio: float) -> None:
    means = CURVES[name]
    # three steps per epoch around each mean: the criterion works on epoch means
    epochs = [[m - 0.01, m, m + 0.01] for m in means]
    assert feed(PlateauCriterion(ratio=ratio), epochs) == reference_fire(means, ratio)


def reference_fire_noisy(epochs: list[list[float]], ratio: float, min_periods: int = 2) -> int | None:
    """The rule with its noise allowance, written out with numpy: per-step progress between epoch means plus two
    standard errors (residual scatter about each epoch's fitted line), against the best progress so far."""
    import numpy as np

    def mean_and_variance(losses: list[float]) -> tuple[float, float, int]:
        t = np.arange(len(losses))
        slope, intercept = np.polyfit(t, losses, 1)
        residual = np.asarray(losses) - (intercept + slope * t)
        return float(np.mean(losses)), float(residual @ residual / (len(losses) - 2)) / len(losses), len(losses)

    summaries = [mean_and_variance(e) for e in epochs]
    best = -math.inf
    for e in range(1, len(summaries)):
        (m0, v0, n0), (m1, v1, n1) = summaries[e - 1], summaries[e]
        steps = (n0 + n1) / 2
        progress = (m0 - m1) / steps
        best = max(best, progress)
        if e >= min_periods and best > 0 and (progress + 2 * math.sqrt(v0 + v1) / steps) <= ratio * best:
            return e + 1
    return None


@pytest.mark.parametrize("seed", range(6))
def test_noisy_epochs_fire_where_the_rule_with_its_standard_errors_fires(seed: int) -> None:
    """Minibatch-like noise on a fast-then-flat curve: the criterion allows two standard errors of it, as written
    out; and without the allowance it would fire earlier or at the same epoch, never later."""
    generator = torch.Generator().manual_seed(seed)
    means = [1.0, 0.5, 0.3, 0.22, 0.2, 0.19, 0.185, 0.183, 0.182]
    epochs = [(m + 0.03 * torch.randn(12, generator=generator, dtype=torch.float64)).tolist() for m in means]
    fired = feed(PlateauCriterion(ratio=0.1), epochs)
    assert fired == reference_fire_noisy(epochs, 0.1)
    plain = reference_fire([sum(e) / len(e) for e in epochs], 0.1)
    assert plain is not None and (fired is None or fired >= plain)


def test_the_statistic_is_invariant_to_the_losss_scale_and_offset() -> None:
    means = CURVES["fast then flat"]
    fired, statistics = set(), set()
    for scale, offset in ((1.0, 0.0), (1e-4, 0.0), (250.0, -3.0), (3.0, 1e6)):
        criterion = PlateauCriterion(ratio=0.1)
        fired.add(feed(criterion, [[scale * m + offset] for m in means]))
        statistics.add(criterion.statistic)
    assert fired == {reference_fire(means, 0.1)}
    assert max(statistics) == pytest.approx(min(statistics), rel=1e-6)  # up to float64 rounding of the offset


def test_window_mode_decides_every_window_steps_and_reason_reports_the_statistic() -> None:
    criterion = make_criterion({"criterion": "plateau", "ratio": 0.2, "window": 2})
    assert isinstance(criterion, PlateauCriterion)
    losses = [1.0, 1.0, 0.5, 0.5, 0.45, 0.45, 0.44, 0.44]  # window means 1.0, 0.5, 0.45, 0.44
    decided = []
    for loss in losses:
        criterion.observe_step(torch.tensor(loss), None)
        decided.append(criterion.ready(0, 0))
    assert decided == [False] * 5 + [True] * 3  # 0.05 / 0.5 = 0.1 <= 0.2 after the third window
    assert criterion.statistic == pytest.approx(0.1, rel=1e-5)  # the value it fired on, kept
    assert criterion.reason == "plateau((progress + 2 s.e.) / best progress = 0.1 <= ratio=0.2)"


def test_state_dict_resumes_the_decision_exactly() -> None:
    means = CURVES["slow start"]
    whole = PlateauCriterion(ratio=0.1)
    first = PlateauCriterion(ratio=0.1)
    feed(first, [[m] for m in means[:3]])
    resumed = make_criterion(first.config())
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict()
    rest = feed(resumed, [[m] for m in means[3:]])
    assert rest is not None and rest + 3 == feed(whole, [[m] for m in means])


@pytest.mark.parametrize(("options", "message"), [
    ({"ratio": 1.0}, "ratio must be a number in"),
    ({"ratio": 0}, "ratio must be a finite number > 0"),
    ({"min_periods": 0}, "min_periods must be an integer >= 1"),
    ({"window": 0}, "window must be None"),
])
def test_bad_settings_name_the_argument(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_criterion({"criterion": "plateau", **options})


def test_fuse_pv_switches_on_a_plateau_of_a_quadratic_and_keeps_the_criterion_in_its_state() -> None:
    """Adam on an ill-conditioned quadratic: fast progress, then a crawl; FusePV hands over to L-BFGS there."""
    torch.manual_seed(0)
    scales = torch.logspace(0, 3, 20)
    x = torch.nn.Parameter(torch.ones(20))
    optimizer = FusePV([x], lr=0.05, switch={"criterion": "plateau"})

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (scales * x.pow(2)).sum()
        loss.backward()
        return loss

    for _ in range(40):
        for _step in range(10):
            optimizer.step(closure)
        if optimizer.end_epoch():
            break
    assert optimizer.switched_at_epoch is not None and 2 < optimizer.switched_at_epoch < 40
    assert optimizer.switch_reason.startswith("plateau((progress + 2 s.e.) / best progress = ")
    state = optimizer.state_dict()
    clone = FusePV([torch.nn.Parameter(x.detach().clone())], lr=0.05, switch={"criterion": "plateau"})
    clone.load_state_dict(state)
    assert clone.criterion.state_dict() == optimizer.criterion.state_dict()


# --------------------------------------------------------------------------- the absolute-threshold baseline
def absolute_rules_fire(losses: list[float], sq_norms: list[float], min_steps: int, window: int,
                        variance: float, norm: float, improvement: float) -> tuple[int, str] | None:
    """opifex's rules written out: checked every `window` steps once `min_steps` were taken; (steps, rule)."""
    previous = None
    for end in range(window, len(losses) + 1, window):
        part = losses[end - window:end]
        mean = sum(part) / window
        values = {"loss_variance": sum((f - mean) ** 2 for f in part) / (window - 1),
                  "grad_norm": math.sqrt(sq_norms[end - 1]),
                  "improvement": ((previous if previous is not None else part[0]) - part[-1])
                  / abs(previous if previous is not None else part[0])}
        previous = part[-1]
        if end < min_steps:
            continue
        for rule, bound in (("loss_variance", variance), ("grad_norm", norm), ("improvement", improvement)):
            if values[rule] < bound:
                return end, rule
    return None


@pytest.mark.parametrize("decay", [0.999, 0.99, 0.9])
def test_absolute_rules_fire_where_written_out_and_not_before_min_steps(decay: float) -> None:
    losses = [10.0 * decay**k + 0.5 for k in range(600)]
    sq_norms = [(10.0 * decay**k) ** 2 for k in range(600)]
    options = {"min_steps": 200, "window": 20, "loss_variance": 1e-4, "grad_norm": 1e-3, "improvement": 1e-4}
    expected = absolute_rules_fire(losses, sq_norms, options["min_steps"], options["window"],
                                   options["loss_variance"], options["grad_norm"], options["improvement"])
    criterion = make_criterion({"criterion": "absolute_rules", **options})
    fired = None
    for k, (loss, sq) in enumerate(zip(losses, sq_norms, strict=True), start=1):
        criterion.observe_step(torch.tensor(loss, dtype=torch.float64), torch.tensor(sq, dtype=torch.float64))
        if fired is None and criterion.ready(k, 0):
            fired = (k, criterion.fired_rule)
    assert fired == expected
    if expected is not None:
        assert expected[0] >= 200 and criterion.reason.startswith(f"absolute_rules({expected[1]}=")


def test_absolute_rules_state_round_trips_mid_window() -> None:
    criterion = make_criterion({"min_steps": 0, "window": 4})
    for k in range(6):
        criterion.observe_step(torch.tensor(1.0 / (k + 1)), torch.tensor(1.0))
    clone = make_criterion(criterion.config())
    clone.load_state_dict(criterion.state_dict())
    assert clone.state_dict() == criterion.state_dict()
    for c in (criterion, clone):
        for k in range(6, 8):
            c.observe_step(torch.tensor(1.0 / (k + 1)), torch.tensor(1.0))
    assert clone.state_dict() == criterion.state_dict() and clone.statistics
