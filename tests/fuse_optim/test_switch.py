"""Switch criteria fire exactly when they should, build from dicts, name their errors and round-trip."""

from __future__ import annotations

import pytest
import torch

from fuse_optim import FusePV, make_criterion
from fuse_optim.switch import (
    CRITERIA,
    AllOf,
    AnyOf,
    EpochCriterion,
    GradNormCriterion,
    LossChangeCriterion,
    Never,
    StepCriterion,
    SwitchCriterion,
)


def feed(criterion: SwitchCriterion, values: list[float], *, loss: bool = False) -> None:
    for value in values:
        tensor = torch.tensor(value, dtype=torch.float64)
        criterion.observe_step(tensor if loss else None, None if loss else tensor)


# --------------------------------------------------------------------------- criteria on their own
def test_step_criterion() -> None:
    criterion = StepCriterion(3)
    assert [criterion.ready(step, 0) for step in range(6)] == [False, False, False, True, True, True]
    assert StepCriterion(0).ready(0, 0)
    assert "3" in criterion.reason


def test_epoch_criterion() -> None:
    criterion = EpochCriterion(2)
    assert [criterion.ready(100, epoch) for epoch in range(4)] == [False, False, True, True]
    assert EpochCriterion(0).ready(0, 0)


def test_never() -> None:
    criterion = make_criterion("never")
    assert isinstance(criterion, Never)
    feed(criterion, [0.0] * 10)
    criterion.end_epoch()
    assert not any(criterion.ready(step, epoch) for step in range(0, 10**6, 997) for epoch in range(50))


def test_grad_norm_per_epoch_uses_the_mean_of_that_epoch_only() -> None:
    # epoch means 4 then 2; a cumulative mean would be 3 and must not be what is compared
    criterion = GradNormCriterion(zeta=2.5)
    feed(criterion, [4.0, 4.0])
    assert not criterion.ready(2, 0)  # nothing is decided before the epoch ends
    criterion.end_epoch()
    assert criterion.last_mean == 4.0 and not criterion.ready(2, 1)
    feed(criterion, [1.0, 3.0, 2.0])
    assert not criterion.ready(4, 1)
    criterion.end_epoch()
    assert criterion.last_mean == 2.0 and criterion.ready(5, 2)
    assert "grad_norm" in criterion.reason and "2" in criterion.reason


def test_grad_norm_fires_at_equality_and_stays_fired() -> None:
    criterion = GradNormCriterion(zeta=3.0)
    feed(criterion, [2.0, 4.0])
    criterion.end_epoch()
    assert criterion.ready(2, 1)  # mean 3 <= zeta 3
    feed(criterion, [100.0])
    criterion.end_epoch()
    assert criterion.ready(3, 2)  # once fired it does not un-fire


def test_grad_norm_window_decides_every_window_steps() -> None:
    criterion = GradNormCriterion(zeta=1.5, window=3)
    feed(criterion, [5.0, 5.0, 5.0])
    assert criterion.last_mean == 5.0 and not criterion.ready(3, 0)
    feed(criterion, [1.0, 1.0])
    criterion.end_epoch()  # with a window, the epoch boundary does not decide
    assert criterion.last_mean == 5.0 and not criterion.ready(5, 1)
    feed(criterion, [2.5])  # window of (1, 1, 2.5): mean 1.5
    assert criterion.last_mean == pytest.approx(1.5) and criterion.ready(6, 1)


def test_grad_norm_needs_the_norm() -> None:
    with pytest.raises(RuntimeError, match="gradient norm"):
        GradNormCriterion(zeta=1.0).observe_step(torch.tensor(1.0), None)


@pytest.mark.parametrize("window", [None, 2])
def test_loss_change_absolute(window: int | None) -> None:
    criterion = LossChangeCriterion(sigma=0.4, window=window)

    def period(values):
        feed(criterion, values, loss=True)
        if window is None:
            criterion.end_epoch()

    period([10.5, 9.5])  # mean 10: nothing to compare with yet
    assert not criterion.ready(2, 1) and criterion.previous == 10.0
    period([9.0, 10.0])  # mean 9.5: change 0.5 > 0.4
    assert criterion.last_change == pytest.approx(0.5) and not criterion.ready(4, 2)
    period([9.0, 9.4])  # mean 9.2: change 0.3 <= 0.4
    assert criterion.last_change == pytest.approx(0.3) and criterion.ready(6, 3)


def test_loss_change_relative() -> None:
    criterion = LossChangeCriterion(sigma=0.01, relative=True, window=1)
    feed(criterion, [1000.0, 985.0], loss=True)  # |change| 15 > 0.01 * 1000
    assert not criterion.ready(2, 0)
    feed(criterion, [976.0], loss=True)  # |change| 9 <= 0.01 * 985 = 9.85
    assert criterion.ready(3, 0)
    # the same numbers in absolute terms would not fire with sigma = 0.01
    absolute = LossChangeCriterion(sigma=0.01, window=1)
    feed(absolute, [1000.0, 985.0, 976.0], loss=True)
    assert not absolute.ready(3, 0)


def test_loss_change_ignores_non_finite_losses() -> None:
    criterion = LossChangeCriterion(sigma=1.0, window=1)
    feed(criterion, [5.0, float("nan"), 5.0, float("inf"), float("inf")], loss=True)
    assert not criterion.ready(5, 0)
    with pytest.raises(RuntimeError, match="loss"):
        criterion.observe_step(None, torch.tensor(1.0))


def test_any_and_all() -> None:
    any_of = make_criterion({"criterion": "any", "of": [{"criterion": "step", "step": 5},
                                                        {"criterion": "epoch", "epoch": 1}]})
    all_of = make_criterion({"criterion": "all", "of": [{"criterion": "step", "step": 5},
                                                        {"criterion": "epoch", "epoch": 1}]})
    assert isinstance(any_of, AnyOf) and isinstance(all_of, AllOf)
    for step, epoch, expect_any, expect_all in [(0, 0, False, False), (5, 0, True, False), (2, 1, True, False),
                                                (5, 1, True, True)]:
        assert any_of.ready(step, epoch) is expect_any
        assert all_of.ready(step, epoch) is expect_all
    any_of.ready(2, 1)
    assert "epoch" in any_of.reason and "step" not in any_of.reason
    assert "step" in all_of.reason and "epoch" in all_of.reason


def test_combinations_forward_observations_and_needs() -> None:
    combined = AnyOf([GradNormCriterion(zeta=1.0, window=2), LossChangeCriterion(sigma=0.1, window=1)])
    assert combined.needs_grad_norm and combined.needs_loss
    combined.observe_step(torch.tensor(3.0), torch.tensor(0.5))
    combined.observe_step(torch.tensor(2.0), torch.tensor(0.5))
    assert combined.ready(2, 0)
    assert "grad_norm" in combined.reason  # the first of the criteria that fired
    assert not AllOf([StepCriterion(1), Never()]).needs_grad_norm


# --------------------------------------------------------------------------- building from dicts
@pytest.mark.parametrize("spec", [
    {"criterion": "epoch", "epoch": 5},
    {"criterion": "step", "step": 0},
    {"criterion": "grad_norm", "zeta": 1e-3},
    {"criterion": "grad_norm", "zeta": 1e-3, "window": 10},
    {"criterion": "loss_change", "sigma": 1e-4},
    {"criterion": "loss_change", "sigma": 0.01, "window": 50, "relative": True},
    {"criterion": "never"},
    {"criterion": "any", "of": [{"criterion": "epoch", "epoch": 3}, {"criterion": "grad_norm", "zeta": 1.0}]},
    {"criterion": "all", "of": [{"criterion": "step", "step": 3}, {"criterion": "never"}]},
])
def test_make_criterion_round_trips_its_config(spec: dict) -> None:
    criterion = make_criterion(spec)
    assert isinstance(criterion, CRITERIA[spec["criterion"]])
    config = criterion.config()
    assert {k: v for k, v in config.items() if k in spec} == {k: v for k, v in spec.items() if k != "of"} | (
        {"of": config["of"]} if "of" in spec else {})
    assert make_criterion(config).config() == config
    assert repr(criterion).startswith(type(criterion).__name__)
    assert make_criterion(criterion) is criterion


@pytest.mark.parametrize(("spec", "expected"), [
    ({"epoch": 5}, {"criterion": "epoch", "epoch": 5}),
    ({"step": 0}, {"criterion": "step", "step": 0}),
    ({"zeta": 1e-3, "window": 4}, {"criterion": "grad_norm", "zeta": 1e-3, "window": 4}),
    ({"sigma": 1e-4, "relative": True}, {"criterion": "loss_change", "sigma": 1e-4, "window": None, "relative": True}),
])
def test_a_key_only_one_criterion_takes_names_it(spec: dict, expected: dict) -> None:
    """``--set switch.epoch=5`` means the epoch criterion: the criterion is implied by its own key."""
    assert make_criterion(spec).config() == expected


@pytest.mark.parametrize(("spec", "named"), [
    ({"criterion": "epochs", "epoch": 5}, "criterion"),
    ({"window": 3}, "criterion"),  # no criterion named, and no key that names one
    ({"epoch": 5, "zeta": 1.0}, "criterion"),  # keys of two criteria
    ("sometimes", "criterion"),
    (5, "switch"),
    ({"criterion": "epoch", "epoch": 5, "patience": 2}, "patience"),
    ({"criterion": "grad_norm", "zeta": 1.0, "sigma": 1.0}, "sigma"),
    ({"criterion": "never", "step": 1}, "step"),
    ({"criterion": "epoch"}, "epoch"),
    ({"criterion": "step"}, "step"),
    ({"criterion": "grad_norm", "window": 3}, "zeta"),
    ({"criterion": "loss_change", "relative": True}, "sigma"),
    ({"criterion": "epoch", "epoch": -1}, "epoch"),
    ({"criterion": "epoch", "epoch": 1.5}, "epoch"),
    ({"criterion": "step", "step": -3}, "step"),
    ({"criterion": "step", "step": True}, "step"),
    ({"criterion": "grad_norm", "zeta": 0.0}, "zeta"),
    ({"criterion": "grad_norm", "zeta": -1e-3}, "zeta"),
    ({"criterion": "grad_norm", "zeta": float("nan")}, "zeta"),
    ({"criterion": "grad_norm", "zeta": "small"}, "zeta"),
    ({"criterion": "grad_norm", "zeta": 1.0, "window": 0}, "window"),
    ({"criterion": "loss_change", "sigma": 1.0, "window": 2.5}, "window"),
    ({"criterion": "loss_change", "sigma": float("inf")}, "sigma"),
    ({"criterion": "loss_change", "sigma": 1.0, "relative": "yes"}, "relative"),
    ({"criterion": "any", "of": []}, "of"),
    ({"criterion": "any"}, "of"),
    ({"criterion": "all", "of": [{"criterion": "step", "step": 1}], "extra": 1}, "of"),
    ({"criterion": "any", "of": [{"criterion": "step", "step": -1}]}, "step"),
])
def test_make_criterion_errors_name_the_key(spec, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        make_criterion(spec)


def test_fuse_pv_rejects_a_bad_switch() -> None:
    with pytest.raises(ValueError, match="zeta"):
        FusePV([torch.zeros(2, requires_grad=True)], switch={"criterion": "grad_norm", "zeta": -1.0})


# --------------------------------------------------------------------------- criterion state round trips
def lockstep(criterion_spec: dict, first: list[tuple[float, float]], second: list[tuple[float, float]],
             epoch_every: int) -> None:
    """Feed ``first`` to a criterion, copy it through state_dict, feed ``second`` to both, compare."""
    source = make_criterion(criterion_spec)

    def run(criterion, values, offset):
        decisions = []
        for i, (loss, grad_sq) in enumerate(values, start=offset):
            criterion.observe_step(torch.tensor(loss, dtype=torch.float64), torch.tensor(grad_sq, dtype=torch.float64))
            if (i + 1) % epoch_every == 0:
                criterion.end_epoch()
            decisions.append((criterion.ready(i + 1, (i + 1) // epoch_every), criterion.reason))
        return decisions

    run(source, first, 0)
    state = source.state_dict()
    copy = make_criterion(criterion_spec)
    copy.load_state_dict(state)
    assert copy.state_dict() == state
    assert run(copy, second, len(first)) == run(source, second, len(first))
    assert copy.state_dict() == source.state_dict()


@pytest.mark.parametrize("spec", [
    {"criterion": "grad_norm", "zeta": 0.5},
    {"criterion": "grad_norm", "zeta": 0.5, "window": 4},
    {"criterion": "loss_change", "sigma": 0.05},
    {"criterion": "loss_change", "sigma": 0.05, "window": 3, "relative": True},
    {"criterion": "any", "of": [{"criterion": "grad_norm", "zeta": 0.2, "window": 3},
                                {"criterion": "loss_change", "sigma": 0.01}]},
    {"criterion": "all", "of": [{"criterion": "step", "step": 7}, {"criterion": "grad_norm", "zeta": 0.6}]},
    {"criterion": "epoch", "epoch": 2},
    {"criterion": "step", "step": 9},
    {"criterion": "never"},
])
def test_criterion_state_dict_round_trip(spec: dict) -> None:
    values = [(1.0 / (1 + 0.3 * i), 1.0 / (1 + 0.5 * i)) for i in range(24)]
    lockstep(spec, values[:7], values[7:], epoch_every=5)  # stops mid-window and mid-epoch


# --------------------------------------------------------------------------- through FusePV
def quadratic_setup(switch, **options):
    x = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = FusePV([x], lr=0.1, switch=switch, **options)
    record = {"grad_sq": [], "loss": []}

    def closure():
        opt.zero_grad()
        loss = (x**2).sum() + 0.5 * x[0] * x[1]
        loss.backward()
        record["grad_sq"].append((x.grad**2).sum().item())
        record["loss"].append(loss.item())
        return loss

    return x, opt, closure, record


def test_step_switch_in_fuse_pv() -> None:
    _, opt, closure, _ = quadratic_setup({"criterion": "step", "step": 3})
    phases = []
    for _ in range(6):
        opt.step(closure)
        phases.append(opt.last_step_info.phase)
    assert phases == ["adam"] * 3 + ["lbfgs"] * 3
    assert (opt.phase, opt.switched_at_step, opt.switched_at_epoch) == ("lbfgs", 3, 0)
    assert opt.switch_reason == opt.criterion.reason and "step" in opt.switch_reason


def test_step_zero_is_lbfgs_from_the_first_step() -> None:
    x, opt, closure, _ = quadratic_setup({"criterion": "step", "step": 0})
    assert opt.phase == "adam"  # nothing decided before the first step
    opt.step(closure)
    assert opt.phase == "lbfgs" and opt.switched_at_step == 0 and opt.last_step_info.phase == "lbfgs"
    assert len(opt.state[x]) == 0  # no Adam step was taken


def test_epoch_switch_is_driven_by_end_epoch() -> None:
    _, opt, closure, _ = quadratic_setup({"criterion": "epoch", "epoch": 2})
    for epoch in range(3):
        for _ in range(4):
            opt.step(closure)
            assert opt.last_step_info.phase == ("adam" if epoch < 2 else "lbfgs")
        now_lbfgs = opt.end_epoch()
        assert now_lbfgs is (epoch >= 1)
        assert opt.phase == ("lbfgs" if epoch >= 1 else "adam")  # effective at once, not at the next step
    assert (opt.switched_at_step, opt.switched_at_epoch, opt.epoch) == (8, 2, 3)
    assert "epoch" in opt.switch_reason


def test_grad_norm_switch_matches_a_hand_computation_per_epoch() -> None:
    steps_per_epoch = 5
    # run once with a criterion that never fires to get the hand-computed epoch means of ||g||^2
    _, probe, closure, record = quadratic_setup("never")
    for _ in range(6 * steps_per_epoch):
        probe.step(closure)
    means = [sum(record["grad_sq"][i:i + steps_per_epoch]) / steps_per_epoch
             for i in range(0, 6 * steps_per_epoch, steps_per_epoch)]
    assert all(a > b for a, b in zip(means, means[1:], strict=False))  # Adam makes progress
    zeta = (means[2] + means[3]) / 2  # first epoch mean below zeta: epoch 3
    _, opt, closure, record = quadratic_setup({"criterion": "grad_norm", "zeta": zeta})
    for epoch in range(6):
        for _ in range(steps_per_epoch):
            opt.step(closure)
        opt.end_epoch()
        assert opt.criterion.last_mean == pytest.approx(means[min(epoch, 3)], rel=1e-12)
        assert opt.phase == ("lbfgs" if epoch >= 3 else "adam")
    assert opt.switched_at_epoch == 4 and opt.switched_at_step == 4 * steps_per_epoch
    assert f"{means[3]:.3g}" in opt.switch_reason


def test_grad_norm_switch_with_a_window() -> None:
    window = 4
    _, probe, closure, record = quadratic_setup("never")
    for _ in range(40):
        probe.step(closure)
    means = [sum(record["grad_sq"][i:i + window]) / window for i in range(0, 40, window)]
    zeta = (means[5] + means[6]) / 2  # the 7th window (steps 24-27) is the first at or below zeta
    _, opt, closure, record = quadratic_setup({"criterion": "grad_norm", "zeta": zeta, "window": window})
    for step in range(40):
        opt.step(closure)
        if step == 27:
            assert opt.criterion.last_mean == pytest.approx(means[6], rel=1e-12)
    assert opt.switched_at_step == 28
    assert opt.phase == "lbfgs" and opt.switched_at_epoch == 0


def test_loss_change_switch_in_fuse_pv() -> None:
    window = 5
    _, probe, closure, record = quadratic_setup("never")
    for _ in range(60):
        probe.step(closure)
    means = [sum(record["loss"][i:i + window]) / window for i in range(0, 60, window)]
    changes = [abs(b - a) for a, b in zip(means, means[1:], strict=False)]
    first = next(i for i, c in enumerate(changes) if c <= 0.05)  # change between windows first and first + 1
    _, opt, closure, _ = quadratic_setup({"criterion": "loss_change", "sigma": 0.05, "window": window})
    for _ in range(60):
        opt.step(closure)
    assert opt.switched_at_step == (first + 2) * window
    assert opt.criterion.last_change == pytest.approx(changes[first], rel=1e-12)


def test_never_stays_adam_and_manual_switch() -> None:
    _, opt, closure, _ = quadratic_setup("never")
    for _ in range(3):
        for _ in range(5):
            opt.step(closure)
        assert opt.end_epoch() is False
    assert opt.phase == "adam" and opt.switched_at_step is None and opt.switch_reason is None
    opt.switch_to_lbfgs()
    assert (opt.phase, opt.switched_at_step, opt.switched_at_epoch, opt.switch_reason) == ("lbfgs", 15, 3, "manual")
    opt.step(closure)
    opt.switch_to_lbfgs("again")  # idempotent
    assert opt.switched_at_step == 15 and opt.switch_reason == "manual"
    assert opt.last_step_info.phase == "lbfgs"


def test_loss_criterion_needs_the_closure_loss() -> None:
    x, opt, _, _ = quadratic_setup({"criterion": "loss_change", "sigma": 0.1})
    (x**2).sum().backward()
    with pytest.raises(RuntimeError, match="loss"):
        opt.step()


def test_switch_state_is_in_the_state_dict() -> None:
    x, opt, closure, _ = quadratic_setup({"criterion": "any", "of": [{"criterion": "epoch", "epoch": 1},
                                                                     {"criterion": "grad_norm", "zeta": 1e-12}]})
    for _ in range(4):
        opt.step(closure)
    opt.end_epoch()
    opt.step(closure)
    state = opt.state_dict()["state"][0]["fuse"]
    assert (state["phase"], state["switched_at_step"], state["switched_at_epoch"]) == ("lbfgs", 4, 1)
    assert state["switch_reason"] == opt.switch_reason and "epoch" in state["switch_reason"]
    x2 = x.detach().clone().requires_grad_()
    copy = FusePV([x2], lr=0.1, switch=opt.criterion.config())
    copy.load_state_dict(opt.state_dict())
    assert (copy.phase, copy.switched_at_step, copy.switched_at_epoch, copy.switch_reason, copy.epoch,
            copy.step_count) == ("lbfgs", 4, 1, opt.switch_reason, 1, 5)
    assert copy.criterion.state_dict() == opt.criterion.state_dict()


def test_switch_state_fires_once_and_round_trips() -> None:
    """The switch FusePV and fuse_tune's Adam-then-SGD share: fires once, records when and why, stops feeding
    the criterion afterwards, and its state dict restores all of it."""
    from fuse_optim.switch import SwitchState

    state = SwitchState({"criterion": "epoch", "epoch": 2})
    assert not state.check(step=5, epoch=1) and not state.fired
    assert not state.end_epoch(step=10, epoch=1)
    assert state.end_epoch(step=20, epoch=2) and state.fired
    assert (state.at_step, state.at_epoch, state.reason) == (20, 2, "epoch(epoch >= 2)")
    assert not state.check(step=21, epoch=2) and not state.end_epoch(step=30, epoch=3)  # once only
    assert state.at_step == 20
    copy = SwitchState({"criterion": "epoch", "epoch": 2})
    copy.load_state_dict(state.state_dict())
    assert (copy.fired, copy.at_step, copy.at_epoch, copy.reason) == (True, 20, 2, "epoch(epoch >= 2)")
