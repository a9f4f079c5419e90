"""The examples under ``examples/`` run as their READMEs say: ``fuse-tune run`` on a copy of each study (shrunk to
two trials and a few epochs), then MLflow holds a finished parent run with finished child runs that logged the
workload's validation metric per seed and epoch and nothing of the test split; the Lightning example's
``train.py`` trains and switches; ``fuse-tune report`` draws the diabetes study.

Each command runs as a user would run it: the venv's ``fuse-tune`` (or ``python``) in a subprocess, in a
temporary folder holding a copy of the example.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 300  # seconds per command; each takes about 10 on 2 cores


def _fuse_tune() -> str:
    beside = Path(sys.executable).with_name("fuse-tune")  # the venv running these tests
    found = str(beside) if beside.exists() else shutil.which("fuse-tune")
    if found is None:
        pytest.skip("the fuse-tune command is not installed")
    return found


def copy_example(name: str, destination: Path, **changes: Any) -> Path:
    """``examples/<name>`` copied to ``destination/<name>``, its ``study.yaml`` updated with ``changes`` (top-level
    keys; ``search`` entries are merged one parameter at a time). Returns the copied study file."""
    folder = destination / name
    shutil.copytree(EXAMPLES / name, folder, ignore=shutil.ignore_patterns("__pycache__"))
    study = folder / "study.yaml"
    raw = yaml.safe_load(study.read_text())
    for key, value in changes.items():
        if key == "search":
            raw["search"].update(value)
        else:
            raw[key] = value
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    return study


def command(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A folder holding the Optuna journal ``s.log`` and the MLflow store ``mlflow.db`` that every study here
    shares (one experiment per study name), as a user's working folder would: the store is set up once."""
    return tmp_path_factory.mktemp("store")


def run_study(study: Path, store: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``fuse-tune run STUDY --n-trials 2 --quiet`` with the journal and the MLflow store in ``store``."""
    return command([_fuse_tune(), "run", str(study), "--n-trials", "2", "--storage", f"journal:{store / 's.log'}",
                    "--mlflow-uri", mlflow_uri(store), "--quiet"], cwd=cwd)


def mlflow_uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def check_tracked(store: Path, study: Path, metric: str) -> None:
    """One finished parent run; two finished child runs under it, each with ``metric`` per seed at every epoch and
    no metric of the test split (trials select on the validation split and leave the test split alone), each
    switched on every seed at the epoch it sampled (the copies' switch epochs all lie before their last epoch)."""
    from mlflow import MlflowClient

    spec = yaml.safe_load(study.read_text())
    client = MlflowClient(tracking_uri=mlflow_uri(store))
    experiment = client.get_experiment_by_name(spec["name"])
    assert experiment is not None, f"no MLflow experiment {spec['name']!r}"
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("fuse.role") == "study"]
    children = [r for r in runs if r.data.tags.get("fuse.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2, [(r.info.run_name, r.data.tags.get("fuse.role")) for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["workload"] == spec["workload"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["fuse.state"] == "complete"
        for seed in spec["seeds"]:
            key = f"{metric}/seed_{seed}"
            assert key in child.data.metrics, (child.info.run_name, sorted(child.data.metrics))
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, key))
            assert len(steps) == spec["epochs"], (key, steps)
        assert f"objective.{metric}" in child.data.metrics
        switch = child.data.params["switch.epoch"]
        assert child.data.tags["fuse.switch_epoch"] == ",".join([switch] * len(spec["seeds"])), child.data.tags
        leaked = [k for k in child.data.metrics if k.startswith("test_") or ".test_" in k]
        assert not leaked, f"{child.info.run_name} logged test-split metrics while tuning: {leaked}"


def check_summary(result: subprocess.CompletedProcess[str], study: Path, metric: str) -> None:
    name = yaml.safe_load(study.read_text())["name"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"study {name}: complete 2" in result.stdout, result.stdout
    assert f"best configurations ({metric}" in result.stdout, result.stdout


# ------------------------------------------------------------------ diabetes_regression


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory, store) -> tuple[Path, subprocess.CompletedProcess[str]]:
    folder = tmp_path_factory.mktemp("diabetes")
    study = copy_example("diabetes_regression", folder, epochs=6,
                         search={"switch.epoch": {"type": "int", "low": 1, "high": 4}})
    return study, run_study(study, store, cwd=folder)


def test_diabetes_regression_study(diabetes, store):
    study, result = diabetes
    check_summary(result, study, "val_mse")
    check_tracked(store, study, "val_mse")
    # fuse_tune.MSE's direction reached the Optuna study: a smaller val_mse is better
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    stored = optuna.load_study(study_name="diabetes-regression",
                               storage=JournalStorage(JournalFileBackend(str(store / "s.log"))))
    assert stored.direction == optuna.study.StudyDirection.MINIMIZE
    assert stored.best_value == min(t.value for t in stored.trials)


def test_report_on_the_diabetes_study(diabetes, store, tmp_path):
    study, result = diabetes
    assert result.returncode == 0, result.stderr
    out = tmp_path / "report"
    report = command([_fuse_tune(), "report", "--experiment", "diabetes-regression", "--out", str(out),
                      "--mlflow-uri", mlflow_uri(store)], cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (out / "report.html").is_file(), report.stdout
    assert "best of diabetes-regression (diabetes:build)" in report.stdout, report.stdout


# ------------------------------------------------------------------ fashion_cnn


def example_module(path: Path) -> Any:
    """An example's Python file imported under a name of its own (not left on ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(f"example_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fashion_cnn_study_on_tiny_fashionmnist_files(tmp_path, store):
    folder = EXAMPLES / "fashion_cnn"
    data = tmp_path / "data"
    raw = example_module(folder / "write_tiny_fashionmnist.py").write_tiny_fashionmnist(data, 600, 200, seed=0)
    from torchvision import datasets

    train, test = datasets.FashionMNIST(data, train=True), datasets.FashionMNIST(data, train=False)
    assert (len(train), len(test)) == (600, 200) and raw == data / "FashionMNIST" / "raw"
    assert tuple(train.data.shape) == (600, 28, 28) and set(train.targets.tolist()) == set(range(10))

    # the study file as shipped names no data folder: without --data-dir the builder says what is missing
    build = example_module(folder / "fashion.py").build
    with pytest.raises(ValueError, match=r"^data_dir: FashionMNIST needs a data folder"):
        build()
    problem = build(data_dir=str(data))
    assert (len(problem.train), len(problem.validation), len(problem.test)) == (500, 100, 200)
    assert not set(problem.train.indices) & set(problem.validation.indices)

    # switch after epoch 1 of 2: the L-BFGS epoch reads the Dataset in batches of batch_size_after_switch
    study = copy_example("fashion_cnn", tmp_path, epochs=2, data_dir=str(data),
                         search={"switch.epoch": {"type": "int", "low": 1, "high": 1}})
    result = run_study(study, store, cwd=tmp_path)
    check_summary(result, study, "val_accuracy")
    check_tracked(store, study, "val_accuracy")


# ------------------------------------------------------------------ lightning_digits


def test_lightning_digits_study_and_train_script(tmp_path, store):
    pytest.importorskip("lightning")
    study = copy_example("lightning_digits", tmp_path, epochs=3,
                         search={"switch.epoch": {"type": "int", "low": 1, "high": 2}})
    result = run_study(study, store, cwd=tmp_path)
    check_summary(result, study, "val_accuracy")
    check_tracked(store, study, "val_accuracy")

    # train.py with a switch, as README.md feeds a study's best settings back into the Lightning Trainer
    train = command([sys.executable, "train.py", "--epochs", "2", "--switch-epoch", "1", "--lr", "0.01"],
                    cwd=study.parent)
    assert train.returncode == 0, train.stdout + train.stderr
    assert "switched to L-BFGS at epoch 1 " in train.stdout, train.stdout + train.stderr
    assert "final val_accuracy" in train.stdout
