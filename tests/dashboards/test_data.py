"""The tidy table against the runs a real study wrote: exact row counts, exact values, identities, types."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from dashboards.data import COLUMNS, NoRuns, read_experiment, tidy, trial_table, variant_name

from .conftest import EPOCHS, N_TRIALS, SEEDS

# What the trainer logs per seed and epoch on a data-set workload, whatever the configuration (gap is for test
# functions; switch_epoch only from the epoch of the switch on).
ALWAYS_LOGGED = {"train_loss", "batch_loss", "val_loss", "val_accuracy", "grad_sq_norm", "wall_time",
                 "grad_evals", "samples", "batch_size", "phase_second"}


@pytest.fixture(scope="module")
def mlflow_truth(small_study):
    """Every per-seed metric entry of every trial run, read straight from MLflow (not through dashboards)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(small_study.tracking_uri)
    experiment = client.get_experiment_by_name(small_study.name)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`fuse.role` = 'trial'")
    entries = []
    for run in runs:
        for key in run.data.metrics:
            match = re.fullmatch(r"(.+)/seed_(\d+)", key)
            if match:
                entries += [(run.info.run_id, match[1], int(match[2]), m.step, m.value)
                            for m in client.get_metric_history(run.info.run_id, key)]
    return runs, entries


def test_row_count_is_trials_x_seeds_x_epochs_x_metrics(tidy_table, mlflow_truth):
    _, entries = mlflow_truth
    always = tidy_table[tidy_table["metric"].isin(ALWAYS_LOGGED)]
    assert len(always) == N_TRIALS * len(SEEDS) * EPOCHS * len(ALWAYS_LOGGED)
    switch_rows = tidy_table[tidy_table["metric"] == "switch_epoch"]
    assert len(switch_rows) == sum(1 for e in entries if e[1] == "switch_epoch")
    assert len(tidy_table) == len(always) + len(switch_rows) == len(entries)
    assert set(tidy_table["metric"]) <= ALWAYS_LOGGED | {"switch_epoch"}
    counts = tidy_table[tidy_table["metric"].isin(ALWAYS_LOGGED)].groupby(["trial", "seed", "epoch"]).size()
    assert len(counts) == N_TRIALS * len(SEEDS) * EPOCHS and (counts == len(ALWAYS_LOGGED)).all()


def test_values_are_exactly_what_mlflow_holds(tidy_table, mlflow_truth):
    _, entries = mlflow_truth
    ours = Counter(zip(tidy_table["run_id"], tidy_table["metric"], tidy_table["seed"], tidy_table["epoch"],
                       tidy_table["value"], strict=True))
    assert ours == Counter(entries)  # as multisets: same keys, steps and float values, nothing extra


def test_identity_columns_params_phase_and_switch_match_the_runs(tidy_table, mlflow_truth):
    runs, _ = mlflow_truth
    assert list(tidy_table.columns[:len(COLUMNS)]) == list(COLUMNS)
    assert tidy_table["trial"].dtype == "int64" and tidy_table["value"].dtype == "float64"
    params = sorted({f"param.{k}" for run in runs for k in run.data.params})
    assert list(tidy_table.columns[len(COLUMNS):]) == params
    for run in runs:
        rows = tidy_table[tidy_table["run_id"] == run.info.run_id]
        tags = run.data.tags
        assert set(rows["trial"]) == {int(tags["fuse.trial"])}
        assert set(rows["criterion"]) == {tags["fuse.criterion"]}
        assert set(rows["state"]) == {"complete"} and set(rows["study"]) == {"dash_small"}
        assert set(rows["workload"]) == {"digits-logreg"} and set(rows["optimizer"]) == {"fuse_pv"}
        assert set(rows["objective"]) == {"val_accuracy"}
        for name, text in run.data.params.items():
            column = rows[f"param.{name}"]
            expected = text if name == "switch.criterion" else float(text)
            assert set(column) == {expected}, name
        for name in set(params) - {f"param.{k}" for k in run.data.params}:
            assert rows[name].isna().all()  # a conditional parameter this trial did not sample
        for seed, entry in zip(SEEDS, tags["fuse.switch_epoch"].split(","), strict=True):
            observed = rows[rows["seed"] == seed]["switch_epoch"]
            assert (observed.isna().all() if entry == "none" else set(observed) == {float(entry)})
        phase = rows[rows["metric"] == "phase_second"]
        for row in phase.itertuples():
            assert row.phase == ("adam" if row.value == 0 else "lbfgs")
            assert set(rows[(rows["seed"] == row.seed) & (rows["epoch"] == row.epoch)]["phase"]) == {row.phase}


def test_variant_names_are_readable_and_one_per_trial(tidy_table):
    variants = tidy_table.drop_duplicates("trial").set_index("trial")["variant"]
    assert variants.nunique() == N_TRIALS
    for trial, name in variants.items():
        row = tidy_table[tidy_table["trial"] == trial].iloc[0]
        assert name.startswith(f"fuse_pv[switch.criterion={row['criterion']},")
        threshold = "switch.epoch=1" if row["criterion"] == "epoch" else f"switch.zeta={row['param.switch.zeta']:.3g}"
        assert threshold in name
        assert "batch_size=" not in name.replace("batch_size_after_switch", "")  # the same for all trials


def test_variant_name():
    params = {"switch.criterion": "grad_norm", "switch.zeta": "0.010000000000000002", "lr": "0.001",
              "history_size": "10"}
    assert variant_name("fuse_pv", params, ["switch.zeta", "switch.criterion"]) == \
        "fuse_pv[switch.criterion=grad_norm,switch.zeta=0.01]"
    assert variant_name("fuse_pv", params) == \
        "fuse_pv[switch.criterion=grad_norm,switch.zeta=0.01,history_size=10,lr=0.001]"
    assert variant_name("adam", params, []) == "adam"


def test_trial_table_matches_the_optuna_study(study_runs, optuna_study):
    table = trial_table(study_runs).set_index("trial")
    assert len(table) == N_TRIALS
    for trial in optuna_study.trials:
        row = table.loc[trial.number]
        assert row["value"] == trial.value and row["state"] == "complete"
        assert row["std"] == trial.user_attrs["value_std"]
        switches = trial.user_attrs["switch_epochs"]
        assert row["switch_epochs"] == ",".join("none" if e is None else str(e) for e in switches)
        for name, value in trial.params.items():
            assert row[f"param.{name}"] == (value if isinstance(value, str) else float(value))


def test_missing_experiment_and_experiment_without_runs_raise_no_runs(small_study, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = small_study.tracking_uri
    with pytest.raises(NoRuns, match="no MLflow experiment named 'nope'"):
        read_experiment("nope", uri)
    MlflowClient(uri).create_experiment("hollow", artifact_location=(tmp_path / "a").as_uri())
    with pytest.raises(NoRuns, match="experiment 'hollow' has no trial runs"):
        read_experiment("hollow", uri)


def test_pruned_trial_without_tags_reads_switch_from_its_metrics():
    from dashboards.data import StudyRuns, TrialRun

    trial = TrialRun(run_id="r", trial=7, status="FINISHED", tags={"fuse.state": "pruned", "fuse.seeds": "0,1",
                                                                   "fuse.optimizer": "fuse_pv"},
                     params={"switch.criterion": "loss_change"}, summary={},
                     history={"switch_epoch/seed_0": [(2, 3.0), (3, 3.0)], "phase_second/seed_0": [(2, 0.0), (3, 1.0)],
                              "train_loss/seed_0": [(2, 0.5), (3, 0.4)]})
    table = tidy(StudyRuns("e", "1", "sqlite://", None, trials=[trial]))
    assert len(table) == 6 and set(table["state"]) == {"pruned"} and set(table["seed"]) == {0}
    assert set(table["switch_epoch"]) == {3.0}
    assert list(table[table["metric"] == "train_loss"]["phase"]) == ["adam", "lbfgs"]
    assert math.isnan(trial.switch_epochs()[1])
