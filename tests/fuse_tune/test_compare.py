"""`fuse-tune compare`: every method tuned alike, each best configuration rerun on paired seeds, a table.

The end-to-end test runs a real (tiny) comparison through the CLI's subprocess with real Optuna journal storage
and a real MLflow SQLite store, and checks the reruns against direct training runs of the same configurations.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dashboards.data import read_experiment, tidy
from dashboards.tables import (
    comparison_markdown,
    comparison_table,
    paired_differences,
    paired_markdown,
    target_markdown,
    target_table,
)
from fuse_tune.compare import load_comparison, method_study
from fuse_tune.spec import SpecError
from fuse_tune.train import TrainConfig, train

TINY = {
    "name": "tiny_cmp",
    "workload": "digits-logreg",
    "epochs": 2,
    "fixed": {"batch_size": 128, "metric_targets": {"test_accuracy": [0.5, 0.999]}},
    "tuning": {"trials": 2, "seeds": [0], "sampler": {"name": "random", "seed": 3}},
    "rerun": {"seeds": [100, 101]},
    "methods": {
        "sgd": {"fixed": {"lr": 0.05}},
        "fuse_pv": {"fixed": {"switch.criterion": "epoch", "switch.epoch": 1},
                    "search": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}},
    },
}


def write(tmp_path: Path, document: dict, name: str = "cmp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def fuse_tune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fuse_tune.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("change, message", [
    ({"epochz": 3}, r"epochz: unknown field; accepted: \['name'"),
    ({"rerun": {"seeds": [0, 5]}}, r"rerun\.seeds: must be disjoint from tuning\.seeds .* both have \[0\]"),
    ({"rerun": {"seeds": [1, 1]}}, r"rerun\.seeds: expected a non-empty list of distinct integers"),
    ({"methods": {"adamw": {}}}, r"methods\.adamw: unknown optimizer; accepted: \['adam'"),
    ({"methods": {"adam": {"serch": {}}}}, r"methods\.adam\.serch: unknown field; accepted: \['fixed', 'search'\]"),
    ({"methods": {"adam": {"fixed": {"lrr": 0.1}}}}, r"methods\.adam\.fixed\.lrr: not a setting of optimizer .adam."),
    ({"methods": {"adam": {"search": {"lr": {"type": "float", "low": 1.0, "high": 0.1}}}}},
     r"methods\.adam\.search\.lr"),
    ({"tuning": {"trials": 0}}, r"tuning\.trials: expected an integer >= 1, got 0"),
    ({"methods": {}}, r"methods: expected a mapping of optimizer name"),
])
def test_bad_comparison_files_fail_in_one_line_naming_the_field(tmp_path, change, message):
    document = {**TINY, **change}
    with pytest.raises(SpecError, match=message) as info:
        load_comparison(write(tmp_path, document), tmp_path / "out")
    assert "\n" not in str(info.value)


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "studies" / "compare").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_comparison_files_load_and_pass_the_dry_run(path, tmp_path):
    """Every comparison behind RESULTS.md (and the GPU one it leaves as a command) is a valid file whose method
    studies pass the dry run; the PINN ones give every method the same evaluation budget and targets."""
    comparison, plans = load_comparison(path, tmp_path / "out")
    assert [plan.method for plan in plans] == list(comparison.methods)
    if comparison.workload.startswith("pinn-"):
        budgets = {plan.method: plan.spec.fixed["grad_eval_budget"] for plan in plans}
        assert len(set(budgets.values())) == 1 and comparison.metric_targets == {"test_l2re": [0.1, 0.01]}
        assert all(plan.spec.fixed["full_batch"] is True for plan in plans)
        assert all(plan.spec.objective.metric == "val_l2re" for plan in plans)


def test_every_method_study_shares_budget_sampler_epochs_and_seeds(tmp_path):
    comparison, plans = load_comparison(write(tmp_path, TINY), tmp_path / "out")
    studies = {plan.method: yaml.safe_load(plan.study_path.read_text()) for plan in plans}
    assert set(studies) == {"sgd", "fuse_pv"}
    for method, study in studies.items():
        assert study == method_study(comparison, method)
        assert (study["epochs"], study["seeds"], study["budget"], study["sampler"]) == (
            2, [0], {"trials": 2}, {"name": "random", "seed": 3})
        assert study["fixed"]["batch_size"] == 128  # the shared settings reach every method
    assert "search" not in studies["sgd"] and [p.tuned for p in plans] == [False, True]


def test_comparison_table_means_stds_and_order():
    rows = []
    for optimizer, finals in (("adam", [0.9, 0.8, 0.7]), ("fuse_pv", [0.95, 0.93, 0.91])):
        for seed, final in enumerate(finals):
            for epoch, value in ((0, 0.5), (1, final)):
                for metric, number in (("val_accuracy", value), ("test_accuracy", value - 0.1),
                                       ("train_loss", 1 - value), ("grad_evals", 10.0), ("wall_time", 1.0)):
                    rows.append({"study": "c", "trial": 0 if optimizer == "adam" else 1, "run_id": optimizer,
                                 "variant": optimizer, "workload": "w", "optimizer": optimizer,
                                 "objective": "val_accuracy", "seed": seed, "epoch": epoch, "metric": metric,
                                 "value": number, "phase": None,
                                 "switch_epoch": 1.0 if optimizer == "fuse_pv" else math.nan,
                                 "criterion": "", "state": "complete"})
    table = comparison_table(pd.DataFrame(rows))
    assert list(table["method"]) == ["fuse_pv", "adam"]  # best mean validation accuracy (the objective) first
    adam = table.set_index("method").loc["adam"]
    assert adam["val_accuracy.mean"] == pytest.approx(0.8)
    assert adam["val_accuracy.std"] == pytest.approx(np.std([0.9, 0.8, 0.7], ddof=1))
    assert adam["test_accuracy.mean"] == pytest.approx(0.7)  # the test split's column beside it
    assert adam["seeds"] == 3 and adam["switched_seeds"] == 0
    assert table.set_index("method").loc["fuse_pv", "switch_epoch.mean"] == 1.0
    # the median and the best seed, in each metric's direction (the paper reports its best run)
    assert (adam["test_accuracy.median"], adam["test_accuracy.best"]) == (pytest.approx(0.7), pytest.approx(0.8))
    assert (adam["train_loss.median"], adam["train_loss.best"]) == (pytest.approx(0.2), pytest.approx(0.1))
    text = comparison_markdown(table)
    assert "| `fuse_pv` | 3 | 0.9300 ± 0.0200 | 0.8300 ± 0.0200 | 0.8300 (0.8500) |" in text
    assert "| `adam` | 3 | 0.8000 ± 0.1000 | 0.7000 ± 0.1000 | 0.7000 (0.8000) |" in text
    assert ("| method | seeds | validation accuracy | test accuracy | test accuracy median (best) | final train loss |"
            in text)

    paired = paired_differences(pd.DataFrame(rows), "fuse_pv", "test_accuracy").set_index("method")
    diffs = np.array([0.95, 0.93, 0.91]) - np.array([0.9, 0.8, 0.7])  # seed by seed
    assert paired.loc["adam", "mean"] == pytest.approx(diffs.mean())
    assert paired.loc["adam", "std"] == pytest.approx(np.std(diffs, ddof=1))
    assert paired.loc["adam", "t"] == pytest.approx(diffs.mean() / (np.std(diffs, ddof=1) / np.sqrt(3)))
    assert (paired.loc["adam", "ahead"], paired.loc["adam", "behind"]) == (3, 0)
    assert "| `adam` | 3 | +0.1300 |" in paired_markdown(paired.reset_index())
    loss = paired_differences(pd.DataFrame(rows), "fuse_pv", "train_loss").set_index("method")
    assert loss.loc["adam", "ahead"] == 3  # lower loss is ahead for a minimized metric


def test_target_table_counts_seeds_and_takes_medians_at_the_first_epoch_reached():
    """Time to target from the per-epoch records: the first epoch at or below a minimized measure's target, per
    seed; medians over the seeds that reached it; a method that never did shows "-"."""
    curves = {"recipe": {0: [0.5, 0.08, 0.009], 1: [0.4, 0.2, 0.05], 2: [0.3, 0.09, 0.12]},
              "adam": {0: [0.5, 0.4, 0.3], 1: [0.6, 0.5, 0.4], 2: [0.7, 0.6, 0.5]}}
    rows = []
    for optimizer, seeds in curves.items():
        for seed, values in seeds.items():
            for epoch, value in enumerate(values):
                for metric, number in (("test_l2re", value), ("grad_evals", 100.0 * (epoch + 1) + seed),
                                       ("wall_time", 2.0 * (epoch + 1))):
                    rows.append({"study": "c", "trial": 0, "run_id": optimizer, "variant": optimizer,
                                 "workload": "pinn-reaction", "optimizer": optimizer, "objective": "val_l2re",
                                 "seed": seed, "epoch": epoch, "metric": metric, "value": number, "phase": None,
                                 "switch_epoch": math.nan, "criterion": "", "state": "complete"})
    table = target_table(pd.DataFrame(rows), {"test_l2re": [0.1, 0.01]}).set_index(["method", "target"])
    recipe = table.loc[("recipe", 0.1)]
    # seed 0 at epoch 1 (200 evaluations), seed 1 at epoch 2 (301), seed 2 at epoch 1 (202; it rose again later)
    assert (recipe["reached"], recipe["seeds"]) == (3, 3)
    assert recipe["grad_evals.median"] == 202.0 and recipe["wall_time.median"] == 4.0
    assert table.loc[("recipe", 0.01), "reached"] == 1 and table.loc[("recipe", 0.01), "grad_evals.median"] == 300.0
    assert table.loc[("adam", 0.1), "reached"] == 0 and math.isnan(table.loc[("adam", 0.1), "grad_evals.median"])
    text = target_markdown(table.reset_index())
    assert "| method | test_l2re <= 0.1: seeds | evaluations (median) | train time (s, median) |" in text
    assert "| `recipe` | 3/3 | 202 | 4.0 | 1/3 | 300 | 6.0 |" in text
    assert "| `adam` | 0/3 | - | - | 0/3 | - | - |" in text
    assert "not logged" in target_table(pd.DataFrame(rows), {"test_accuracy": [0.9]}).attrs["reason"]
    ordered = target_table(pd.DataFrame(rows), {"test_l2re": [0.1]}, order=["recipe", "adam"])
    assert list(ordered["method"]) == ["recipe", "adam"]  # as the comparison table orders them (best first)


def test_compare_tunes_reruns_on_paired_seeds_and_resumes(tmp_path):
    comparison_file = write(tmp_path, TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("compare", str(comparison_file), "--mlflow-uri", uri, "--storage", f"journal:{tmp_path / 'j.log'}",
            "--out", str(tmp_path / "out"), "--threads", "1", "--quiet")
    done = fuse_tune(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| `sgd` | 2 |" in done.stdout and "| `fuse_pv` | 2 |" in done.stdout
    assert "|t| > 12.71 is p < 0.05 two-sided at 1 degrees of freedom" in done.stdout  # 2 rerun seeds
    assert "| method | test_accuracy >= 0.5: seeds | evaluations (median) |" in done.stdout  # fixed.metric_targets
    assert "| `fuse_pv` | 2/2 | " in done.stdout and "| `fuse_pv` | 2/2 | 9 | " in done.stdout  # after 1 epoch
    assert "| `sgd` | 0/2 | - | - | 0/2 | - | - |" in done.stdout  # lr 0.05 for 2 epochs stays below 0.5
    assert (tmp_path / "out" / "results.md").exists() and (tmp_path / "out" / "results.csv").exists()

    runs = read_experiment("tiny_cmp", uri)
    assert runs.parent_run_id is not None and len(runs.trials) == 2
    assert {t.tags["mlflow.parentRunId"] for t in runs.trials} == {runs.parent_run_id}
    assert all(t.tags["fuse.seeds"] == "100,101" and t.state == "complete" for t in runs.trials)
    tuned = next(t for t in runs.trials if t.tags["fuse.optimizer"] == "fuse_pv")
    assert tuned.tags["fuse.tuning_study"] == "tiny_cmp-fuse_pv"
    tuning = read_experiment("tiny_cmp-fuse_pv", uri)
    best = max(tuning.trials, key=lambda t: t.summary["objective.val_accuracy"])
    assert not any(key.startswith("test_") for t in tuning.trials for key in t.summary)  # tuning never saw test
    assert tuned.params["lr"] == best.params["lr"]  # the best tuning trial's configuration is the one rerun

    # Each rerun is exactly the training run of its configuration on that seed.
    table = tidy(runs)
    for trial in runs.trials:
        optimizer = trial.tags["fuse.optimizer"]
        args_ = {"lr": float(trial.params["lr"])}
        if optimizer == "fuse_pv":
            args_["switch"] = {"criterion": "epoch", "epoch": 1}
        for seed in (100, 101):
            reference = train(TrainConfig(workload="digits-logreg", optimizer=optimizer, optimizer_args=args_,
                                          epochs=2, seed=seed, batch_size=128, threads=1))
            logged = table[(table["run_id"] == trial.run_id) & (table["seed"] == seed)
                           & (table["metric"] == "test_accuracy") & (table["epoch"] == 1)]["value"]
            assert float(logged.iloc[0]) == pytest.approx(reference.final.scores["test_accuracy"], abs=1e-12)

    again = fuse_tune(*args, cwd=tmp_path)  # resumes: nothing is trained or logged twice
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(read_experiment("tiny_cmp", uri).trials) == 2
    assert len(read_experiment("tiny_cmp-fuse_pv", uri).trials) == 2


def test_compare_refuses_a_bad_file_in_one_line(tmp_path):
    path = write(tmp_path, {**TINY, "methods": {"adam": {"fixed": {"lr": "fast"}}}})
    done = fuse_tune("compare", str(path), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("fuse-tune: error: ") and done.stderr.count("\n") == 1
    assert "methods.adam" in done.stderr and "Traceback" not in done.stderr
