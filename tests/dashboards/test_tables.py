"""The plot tables as pure functions, on hand-made tidy tables whose answers are known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from dashboards import tables
from dashboards.data import COLUMNS


def tidy_rows(specs, metric="val_accuracy", objective="val_accuracy", epochs=2):
    """specs: (trial, criterion, {param: value}, {seed: (final value, switch epoch)}, optimizer, workload)."""
    rows = []
    for trial, criterion, params, seeds, optimizer, workload in specs:
        for seed, (final, switch) in seeds.items():
            for epoch in range(epochs):
                value = final if epoch == epochs - 1 else final / 2
                rows.append({"study": f"s_{workload}", "trial": trial, "run_id": f"{workload}-{trial}",
                             "variant": f"{optimizer}[t={trial}]", "workload": workload, "optimizer": optimizer,
                             "objective": objective, "seed": seed, "epoch": epoch, "metric": metric, "value": value,
                             "phase": "adam", "switch_epoch": switch, "criterion": criterion, "state": "complete",
                             **{f"param.{k}": v for k, v in params.items()}})
    frame = pd.DataFrame(rows)
    return frame[list(COLUMNS) + sorted(c for c in frame.columns if c.startswith("param."))]


NAN = math.nan


def test_final_values_take_the_last_epoch_of_complete_trials():
    table = tidy_rows([(0, "epoch", {"switch.epoch": 1.0}, {0: (0.9, 1.0), 1: (0.8, 1.0)}, "fuse_pv", "w")], epochs=3)
    pruned = table.assign(trial=1, run_id="w-1", state="pruned")
    finals = tables.final_values(pd.concat([table, pruned]))
    assert list(finals["value"]) == [0.9, 0.8] and list(finals["final_epoch"]) == [2, 2]
    assert set(finals["trial"]) == {0}


def test_sensitivity_uses_each_criterions_threshold_and_log_axis():
    table = tidy_rows([(0, "epoch", {"switch.epoch": 3.0}, {0: (0.9, 3.0)}, "fuse_pv", "w"),
                       (1, "grad_norm", {"switch.zeta": 0.01}, {0: (0.8, 5.0)}, "fuse_pv", "w"),
                       (2, "never", {}, {0: (0.7, NAN)}, "fuse_pv", "w")])
    out = tables.sensitivity_table(table).set_index("criterion")
    assert set(out.index) == {"epoch", "grad_norm"}
    assert out.loc["epoch", "threshold"] == 3.0 and not out.loc["epoch", "log_x"]
    assert out.loc["grad_norm", "threshold"] == 0.01 and out.loc["grad_norm", "log_x"]
    assert out.loc["grad_norm", "threshold_name"] == "switch.zeta" and out.loc["grad_norm", "value"] == 0.8


def test_switch_ecdf_counts_runs_that_never_switched():
    table = tidy_rows([(0, "epoch", {}, {0: (0.9, 2.0), 1: (0.9, 4.0)}, "fuse_pv", "w"),
                       (1, "epoch", {}, {0: (0.9, NAN), 1: (0.9, 2.0)}, "fuse_pv", "w")])
    out = tables.switch_ecdf_table(table)
    assert list(out["switch_epoch"]) == [2.0, 2.0, 4.0]
    assert list(out["fraction"]) == [0.25, 0.5, 0.75]  # the fourth run never switched
    assert set(out["n_runs"]) == {4} and set(out["n_switched"]) == {3}


def test_performance_profile_ratios():
    # Two workloads x one seed; solver a's best configuration has error 0.1 and 0.2, solver b's 0.2 and 0.2.
    table = tidy_rows([(0, "epoch", {}, {0: (0.9, 1.0)}, "a", "w1"), (1, "epoch", {}, {0: (0.7, 1.0)}, "a", "w1"),
                       (2, "epoch", {}, {0: (0.8, 1.0)}, "b", "w1"),
                       (0, "epoch", {}, {0: (0.8, 1.0)}, "a", "w2"), (1, "epoch", {}, {0: (0.8, 1.0)}, "b", "w2")])
    out = tables.performance_profile_table(table)
    a, b = (out[out["solver"] == s].sort_values("tau") for s in ("a", "b"))
    assert list(a["fraction"]) == [1.0, 1.0]  # a is best (or tied) on both problems
    assert list(b["fraction"]) == [0.5, 1.0] and b["tau"].iloc[1] == pytest.approx(2.0)  # b is 2x worse on w1
    assert set(out["n_problems"]) == {2}
    one = tables.performance_profile_table(table[table["optimizer"] == "a"])
    assert one.empty and "two or more solvers" in one.attrs["reason"]


def test_history_batch_cells_average_over_seeds_and_trials():
    table = tidy_rows([(0, "epoch", {"history_size": 3.0, "batch_size_after_switch": 64.0}, {0: (0.9, 1.0),
                                                                                            1: (0.7, 1.0)}, "f", "w"),
                       (1, "epoch", {"history_size": 3.0, "batch_size_after_switch": 64.0}, {0: (0.5, 1.0)}, "f", "w"),
                       (2, "epoch", {"history_size": 10.0, "batch_size_after_switch": 256.0}, {0: (0.6, 1.0)}, "f",
                        "w")])
    out = tables.history_batch_table(table).set_index(["history_size", "batch_size_after_switch"])
    assert out.loc[(3.0, 64.0), "value"] == pytest.approx(0.7) and out.loc[(3.0, 64.0), "n"] == 3
    assert out.loc[(10.0, 256.0), "value"] == 0.6 and len(out) == 2


def test_theta_schedule_marks_the_best_trial_per_schedule():
    table = tidy_rows([(0, "", {"theta.schedule": "linear"}, {0: (0.8, NAN)}, "fuse", "w"),
                       (1, "", {"theta.schedule": "linear"}, {0: (0.9, NAN)}, "fuse", "w"),
                       (2, "", {"theta.schedule": "cosine"}, {0: (0.7, NAN)}, "fuse", "w")])
    out = tables.theta_schedule_table(table)
    assert set(out[out["best"]]["trial"]) == {1, 2}
    assert list(out[out["final"]].sort_values("trial")["value"]) == [0.8, 0.9, 0.7]
    assert list(out["epochs_completed"].unique()) == [1, 2]


def test_empty_tables_say_why():
    table = tidy_rows([(0, "epoch", {"switch.epoch": 1.0}, {0: (0.9, 1.0)}, "fuse_pv", "w")])
    assert "theta.schedule" in tables.theta_schedule_table(table).attrs["reason"]
    assert "batch_size_after_switch" in tables.history_batch_table(table).attrs["reason"]
    missing = tables.learning_curve_table(table.assign(objective="train_loss"))
    assert missing.empty and missing.attrs["reason"].startswith("train_loss is not logged by any run of s_w")
    partial = tables.learning_curve_table(table)
    assert set(partial["metric"]) == {"val_accuracy"} and "train_loss not logged" in partial.attrs["note"]
    assert "no per-epoch metrics" in tables.switch_ecdf_table(table.iloc[0:0]).attrs["reason"]


def test_best_configurations_ties_and_the_optuna_check():
    trials = pd.DataFrame({"study": "s", "trial": [0, 1, 2], "run_id": ["a", "b", "c"], "variant": ["v0", "v1", "v2"],
                           "workload": "w", "optimizer": "fuse_pv", "criterion": "epoch",
                           "state": ["complete", "complete", "pruned"], "seeds": "0", "switch_epochs": "1",
                           "switch_reason": "", "objective": "val_accuracy", "direction": "maximize",
                           "value": [0.9, 0.9, 0.99], "std": 0.0, "epochs_run": 2.0, "param.lr": [0.1, 0.2, 0.3]})
    best = tables.best_configurations(trials, {"s": SimpleNamespace(number=0, value=0.9)})
    assert list(best["trial"]) == [0] and best["checked"][0] == "matches Optuna best_trial #0"
    assert best["params"][0] == "lr=0.1"
    disagree = tables.best_configurations(trials, {"s": SimpleNamespace(number=1, value=0.9)})
    assert list(disagree["trial"]) == [1] and "Optuna's best_trial is #1" in disagree["checked"][0]
    unchecked = tables.best_configurations(trials, {"s": "journal file x not found"})
    assert unchecked["checked"][0] == "not checked: journal file x not found"
