"""The trainer: closures on one minibatch, cost accounting, paired seeding, switch bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.bench_test_functions import FUNCTIONS, compare
from fuse_tune.optimizers import AdamThenSGD, build_optimizer
from fuse_tune.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: digits' training split: 1,347 less the 224 samples held out for validation
N_TRAIN = 1123


def digits(optimizer: str, **kwargs) -> TrainConfig:
    return TrainConfig(workload="digits-logreg", optimizer=optimizer, **kwargs)


def test_fuse_pv_switches_at_the_middle_epoch_by_default_and_reports_it():
    result = train(digits("fuse_pv", epochs=4, optimizer_args={"lr": 1e-2}))
    phases = [m.phase for m in result.history]
    assert phases == ["adam", "adam", "lbfgs", "lbfgs"]
    assert result.final.switch_epoch == 2
    assert result.final.switch_step == 2 * math.ceil(N_TRAIN / 64)
    assert "epoch" in result.final.switch_reason
    # Adam: one closure call per step; L-BFGS: at least two (x_k and one line-search trial).
    adam_epoch = result.history[1]
    assert adam_epoch.grad_evals == adam_epoch.steps == 2 * math.ceil(N_TRAIN / 64)
    lbfgs_calls = result.final.grad_evals - adam_epoch.grad_evals
    assert lbfgs_calls >= 2 * (result.final.steps - adam_epoch.steps)
    assert result.final.samples > result.final.grad_evals * 40  # batch 64, last batch 35 samples
    assert result.final.train_loss < result.history[0].train_loss
    assert 0.8 < result.final.scores["test_accuracy"] <= 1.0 and 0.8 < result.final.scores["val_accuracy"] <= 1.0
    assert result.final.val_loss is not None and result.final.test_loss is not None


def test_batch_size_changes_at_the_switch_and_samples_are_counted():
    result = train(digits("fuse_pv", epochs=2, batch_size=64, batch_size_after_switch=512,
                          optimizer_args={"switch": {"criterion": "epoch", "epoch": 1}}))
    first, second = result.history
    assert first.batch_size == 64 and second.batch_size == 512
    assert second.steps - first.steps == math.ceil(N_TRAIN / 512)
    assert first.samples == N_TRAIN
    # every closure call of the second epoch sees a full 512 batch except the last step's
    assert second.samples - first.samples > 512 * (second.grad_evals - first.grad_evals - 10)


def test_paired_seeding_same_seed_same_run_other_seed_differs():
    a = train(digits("adam", epochs=2, seed=3))
    b = train(digits("adam", epochs=2, seed=3))
    c = train(digits("adam", epochs=2, seed=4))
    assert [m.train_loss for m in a.history] == [m.train_loss for m in b.history]
    assert a.final.train_loss != c.final.train_loss


def test_mean_squared_gradient_norm_matches_a_hand_computation():
    """One epoch of SGD with lr 0: the parameters never move, so Eq. 3's mean is computable directly."""
    from fuse_tune.workloads import build_supervised

    result = train(digits("sgd", epochs=1, optimizer_args={"lr": 0.0}, seed=1))
    instance = build_supervised("digits-logreg", seed=1)
    perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(1))
    values = []
    for i in range(0, N_TRAIN, 64):
        idx = perm[i:i + 64]
        instance.model.zero_grad()
        inputs, targets = instance.problem.train
        instance.loss_fn(instance.model, inputs[idx], targets[idx]).backward()
        values.append(sum(float(p.grad.pow(2).sum()) for p in instance.model.parameters()))
    assert result.final.grad_sq_norm == pytest.approx(sum(values) / len(values), rel=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adam_sgd", "adam_lbfgs", "lbfgs", "fuse_pv", "fuse"])
def test_every_optimizer_trains_digits(optimizer):
    args = {"theta": {"schedule": "linear", "steps": 30}} if optimizer == "fuse" else {}
    result = train(digits(optimizer, epochs=2, optimizer_args=args))
    assert len(result.history) == 2
    assert all(math.isfinite(m.train_loss) for m in result.history)
    assert result.final.train_loss < 2.3  # below the loss of uniform predictions, log(10)


def test_adam_then_sgd_switches_and_round_trips_state():
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = build_optimizer("adam_sgd", params, {"switch": {"criterion": "step", "step": 2}, "sgd_lr": 0.1})
    assert isinstance(opt, AdamThenSGD)
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = (params[0] ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
    assert opt.phase == "sgd" and opt.switched_at_step == 2
    clone = build_optimizer("adam_sgd", params, {"switch": {"criterion": "step", "step": 2}, "sgd_lr": 0.1})
    clone.load_state_dict(opt.state_dict())
    assert clone.phase == "sgd" and clone.switched_at_step == 2


@pytest.mark.parametrize("workload", FUNCTIONS)
def test_fuse_pv_beats_adam_on_the_papers_test_functions_at_equal_gradient_evaluations(workload):
    """Issue must-show: from the default start, no noise, FusePV ends lower than Adam(lr 1e-3)."""
    result = compare(workload)
    assert result["fuse_pv_gap"] < result["adam_gap"]


def test_test_function_gradient_noise_is_seeded():
    config = dict(workload="rosenbrock", optimizer="adam", optimizer_args={"lr": 1e-2}, epochs=1,
                  steps_per_epoch=20, workload_options={"noise": 1.0})
    a, b = train(TrainConfig(seed=1, **config)), train(TrainConfig(seed=1, **config))
    c = train(TrainConfig(seed=2, **config))
    assert a.final.train_loss == b.final.train_loss != c.final.train_loss


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs"), ("batch_size", -1, "batch_size"), ("batch_size", 10_000, "larger than the training set"),
    ("batch_size_after_switch", 0, "batch_size_after_switch"), ("seed", -1, "seed"), ("device", "tpu", "device"),
    ("workload", "nope", "nope"), ("optimizer", "nope", "optimizer"),
])
def test_bad_settings_are_one_line_value_errors(field, value, message):
    config = digits("adam", epochs=1)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message) as info:
        train(config)
    assert "\n" not in str(info.value)


def test_unknown_optimizer_argument_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['lrr'\]; accepted: .*'lr'"):
        train(digits("fuse_pv", epochs=1, optimizer_args={"lrr": 1}))


@pytest.mark.parametrize("config", [
    dict(workload="digits-logreg", optimizer="fuse_pv",
         optimizer_args={"lr": 1e-2, "switch": {"criterion": "epoch", "epoch": 1}}, batch_size_after_switch=256),
    dict(workload="digits-mlp", optimizer="fuse", optimizer_args={"theta": {"schedule": "linear", "steps": 40}}),
    dict(workload="rosenbrock", optimizer="fuse_pv", steps_per_epoch=20, workload_options={"noise": 0.1},
         optimizer_args={"switch": {"criterion": "step", "step": 30}}),
])
def test_trainer_checkpoint_restores_exactly_in_the_second_phase(config, tmp_path):
    """A trainer saved after 2 epochs (past the switch) and restored continues like the uninterrupted run."""
    from fuse_tune.train import Trainer

    straight = Trainer(TrainConfig(epochs=4, seed=5, **config))
    for _ in range(4):
        straight.run_epoch()
    first = Trainer(TrainConfig(epochs=4, seed=5, **config))
    first.run_epoch()
    first.run_epoch()
    torch.save(first.state_dict(), tmp_path / "trainer.pt")
    restored = Trainer(TrainConfig(epochs=4, seed=5, **config))
    restored.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=False))
    assert restored.optimizer.phase != "adam"
    while not restored.done:
        restored.run_epoch()
    expected = [(m.train_loss, m.grad_evals, m.samples, m.phase) for m in straight.result.history]
    got = [(m.train_loss, m.grad_evals, m.samples, m.phase) for m in restored.result.history]
    assert got == expected


def test_adam_lbfgs_is_adam_then_torch_lbfgs_as_the_pinn_recipe_runs_it():
    """adam_lbfgs against its reference written out by hand: torch.optim.Adam for 3 steps, then
    torch.optim.LBFGS(lr=1, history_size=100, max_iter=20, strong Wolfe) on the same closure."""
    from fuse_optim.test_functions import get_test_function
    from fuse_tune.optimizers import AdamThenLBFGS

    fn = get_test_function("rosenbrock").fn

    def closure_for(x, opt):
        def closure():
            opt.zero_grad()
            loss = fn(x)
            loss.backward()
            return loss
        return closure

    x = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    recipe = build_optimizer("adam_lbfgs", [x], {"lr": 1e-2, "switch": {"criterion": "step", "step": 3}})
    assert isinstance(recipe, AdamThenLBFGS)
    y = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([y], lr=1e-2)
    lbfgs = torch.optim.LBFGS([y], lr=1, history_size=100, max_iter=20, line_search_fn="strong_wolfe")
    phases = []
    for step in range(6):
        recipe.step(closure_for(x, recipe))
        phases.append(recipe.phase)
        (adam if step < 3 else lbfgs).step(closure_for(y, adam if step < 3 else lbfgs))
        assert torch.equal(x, y)
    assert phases == ["adam"] * 3 + ["lbfgs"] * 3 and recipe.switched_at_step == 3
    assert float(fn(x)) < 1e-6  # three torch L-BFGS steps of up to 20 iterations each solve it
    clone = build_optimizer("adam_lbfgs", [x.detach().clone().requires_grad_(True)],
                            {"lr": 1e-2, "switch": {"criterion": "step", "step": 3}})
    clone.load_state_dict(recipe.state_dict())
    assert clone.phase == "lbfgs" and clone.state_dict()["steps"] == 6


@pytest.mark.parametrize("optimizer", ["adam", "fuse_pv", "adam_lbfgs"])
def test_an_evaluation_budget_stops_mid_epoch_after_the_step_that_spends_it(optimizer):
    """grad_eval_budget: no step starts once the closure calls reach the budget, so a run ends within one step's
    calls of it (torch L-BFGS: up to 25) whatever the optimizer; epochs stay the upper limit."""
    config = TrainConfig(workload="rosenbrock", optimizer=optimizer, epochs=50, steps_per_epoch=20,
                         grad_eval_budget=75,
                         optimizer_args={} if optimizer == "adam" else {"switch": {"criterion": "step", "step": 10}})
    result = train(config)
    final = result.final
    assert 75 <= final.grad_evals < 75 + (25 if optimizer == "adam_lbfgs" else 1 if optimizer == "adam" else 20)
    assert len(result.history) < 50 and final.steps < 50 * 20
    with pytest.raises(ValueError, match="grad_eval_budget must be an integer >= 1"):
        TrainConfig(workload="rosenbrock", optimizer="adam", grad_eval_budget=0).validate()


@pytest.mark.parametrize("full_batch", [False, True])
def test_steps_per_epoch_after_switch_takes_over_once_the_second_phase_began(full_batch):
    """steps_per_epoch_after_switch: the epochs after the switch are that many steps (a torch L-BFGS step is up to
    25 evaluations where an Adam step is one), on a test function and on a full-batch data set alike."""
    switched = {"lr": 1e-2, "switch": {"criterion": "epoch", "epoch": 2}}
    if full_batch:
        config = TrainConfig(workload="pinn-reaction", optimizer="adam_lbfgs", epochs=4, full_batch=True,
                             steps_per_epoch=6, steps_per_epoch_after_switch=2, device="cpu", evaluate_test=False,
                             workload_options={"n_residual": 100, "n_x": 17, "n_t": 11, "n_validation": 32,
                                               "width": 8},
                             optimizer_args={**switched, "lr": 1e-3})
    else:
        config = TrainConfig(workload="rosenbrock", optimizer="adam_lbfgs", epochs=4, steps_per_epoch=6,
                             steps_per_epoch_after_switch=2, optimizer_args=switched)
    steps = [m.steps for m in train(config).history]
    assert steps == [6, 12, 14, 16]
    with pytest.raises(ValueError, match="steps_per_epoch_after_switch must be an integer >= 1"):
        TrainConfig(workload="rosenbrock", steps_per_epoch_after_switch=0).validate()


def test_the_plateau_criterion_switches_on_its_own_and_its_statistic_is_logged_each_epoch():
    """switch.criterion plateau (no threshold to set): its progress ratio is a per-epoch score, and the epoch it
    fired on shows the ratio at or below 0.1 where the epochs before it were above."""
    result = train(digits("fuse_pv", epochs=8, optimizer_args={"lr": 1e-2, "switch": {"criterion": "plateau"}}))
    ratios = [m.scores.get("switch_statistic") for m in result.history]
    switched = result.final.switch_epoch
    assert switched is not None and result.final.switch_reason.startswith("plateau(")
    assert ratios[switched - 1] <= 0.1 and all(r is None or r > 0.1 for r in ratios[:switched - 1])


def test_metric_targets_record_the_first_epoch_each_target_was_reached():
    """metric_targets: the epoch, evaluations and wall time at which a measure first reached each target, in the
    measure's direction (accuracy up, loss down), checked against the history."""
    config = digits("fuse_pv", epochs=4, optimizer_args={"lr": 1e-2},
                    metric_targets={"val_accuracy": [0.5, 0.99999], "train_loss": 1.0})
    result = train(config)
    history = result.history
    first = next(m for m in history if m.scores["val_accuracy"] >= 0.5)
    assert result.reached["val_accuracy>=0.5"] == {"epoch": first.epoch, "grad_evals": first.grad_evals,
                                                   "wall_time": first.wall_time}
    loss_first = next(m for m in history if m.train_loss <= 1.0)
    assert result.reached["train_loss<=1"]["epoch"] == loss_first.epoch
    assert "val_accuracy>=0.99999" not in result.reached  # not reached in 4 epochs
    assert result.targets == ["val_accuracy>=0.5", "val_accuracy>=0.99999", "train_loss<=1"]
    with pytest.raises(ValueError, match="metric_targets.val_accuracy must be a finite number"):
        digits("adam", metric_targets={"val_accuracy": "high"}).validate()


def test_the_auto_switch_logs_each_parts_statistic_and_counts_its_probes_evaluations():
    """switch.criterion auto on logistic regression at a small Adam lr (where Adam's progress never plateaus): a probe
    of the L-BFGS phase wins, its gain ratio (>= 1) is the score ``switch_statistic.probe`` of the epoch it won in,
    and the probes' evaluations are in ``grad_evals`` (more than one per step)."""
    result = train(digits("fuse_pv", epochs=4, optimizer_args={"lr": 3e-4, "switch": {"criterion": "auto"}}))
    switched = result.final.switch_epoch
    assert switched is not None and result.final.switch_reason.startswith("any[probe(")
    won = result.history[switched]  # the probe began after epoch `switched` and was kept during the next one
    assert won.scores["switch_statistic.probe"] >= 1.0
    assert result.final.grad_evals > result.final.steps
