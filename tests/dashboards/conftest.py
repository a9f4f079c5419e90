"""One small real study per session, shared by the dashboards tests.

``small_study`` runs ``fuse-tune run``'s own driver (``run_study``) in this process: FUSE-PV on digits logistic
regression, 2 epochs x 2 seeds x 4 trials, random sampler, no pruner (so every trial completes and the row
counts are a clean product), Optuna journal file and SQLite MLflow store in a session temporary folder. The
search space has two switch criteria (epoch, grad_norm) and a history size x batch size grid, so most plots
have something to draw. About 10-30 s on a loaded 2-core machine.

``report_run`` builds the report of that study once, in a subprocess that also checks that the whole path
(reading MLflow, tables, seaborn, Optuna, HTML, artifact logging) never imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("optuna")
pytest.importorskip("mlflow")
pytest.importorskip("seaborn")

STUDY_NAME = "dash_small"
STUDY = f"""\
name: {STUDY_NAME}
workload: digits-logreg
optimizer: fuse_pv
epochs: 2
seeds: [0, 1]
fixed:
  batch_size: 64
search:
  lr: {{type: float, low: 3.0e-3, high: 3.0e-2, log: true}}
  switch.criterion: {{type: categorical, choices: [epoch, grad_norm]}}
  switch.epoch: {{type: categorical, choices: [1], when: {{switch.criterion: epoch}}}}
  switch.zeta: {{type: float, low: 5.0e-2, high: 5.0, log: true, when: {{switch.criterion: grad_norm}}}}
  history_size: {{type: categorical, choices: [3, 10]}}
  batch_size_after_switch: {{type: categorical, choices: [64, 256]}}
objective: {{metric: val_accuracy}}
budget: {{trials: 4}}
sampler: {{name: random, seed: 2}}
pruner: {{name: none}}
"""
N_TRIALS, SEEDS, EPOCHS = 4, (0, 1), 2


@dataclass
class SmallStudy:
    name: str
    directory: Path
    spec_path: Path
    tracking_uri: str
    storage_url: str
    parent_run_id: str


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MLFLOW_ENABLE_ASYNC_LOGGING="false")
    return env


@pytest.fixture(scope="session")
def small_study(tmp_path_factory) -> SmallStudy:
    from fuse_tune.optuna_backend import run_study
    from fuse_tune.trial import load_spec

    directory = tmp_path_factory.mktemp("dash_study")
    spec_path = directory / f"{STUDY_NAME}.yaml"
    spec_path.write_text(STUDY)
    tracking_uri = f"sqlite:///{directory / 'mlflow.db'}"
    storage_url = f"journal:{directory / 'fuse-studies.log'}"
    summary = run_study(load_spec(spec_path), storage=storage_url, tracking_uri=tracking_uri, threads=1,
                        progress=False)
    assert summary.counts() == {"COMPLETE": N_TRIALS}
    return SmallStudy(STUDY_NAME, directory, spec_path, tracking_uri, storage_url, summary.parent_run_id)


@pytest.fixture(scope="session")
def study_runs(small_study):
    from dashboards.data import read_experiment

    return read_experiment(small_study.name, small_study.tracking_uri)


@pytest.fixture(scope="session")
def tidy_table(study_runs):
    from dashboards.data import tidy

    return tidy(study_runs)


@pytest.fixture(scope="session")
def optuna_study(small_study):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = small_study.storage_url[len("journal:"):]
    return optuna.load_study(study_name=small_study.name,
                             storage=optuna.storages.JournalStorage(JournalFileBackend(path)))


def fuse_tune_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("fuse-tune")
    base = [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "fuse_tune.cli"]
    return [*base, *args]


@dataclass
class ReportRun:
    out: Path
    html: Path
    stdout: list[str]
    modules: set[str]  # every module the process imported (PYTHONPROFILEIMPORTTIME)
    drawn: list[str]
    skipped: dict[str, str]


@pytest.fixture(scope="session")
def report_run(small_study, tmp_path_factory) -> ReportRun:
    """``fuse-tune report`` on ``small_study``, run as the console script in a fresh interpreter that records
    every import, so the tests can check that the whole report path never imports torch."""
    out = tmp_path_factory.mktemp("dash_report")
    env = clean_env()
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    result = subprocess.run(fuse_tune_command("report", "--experiment", small_study.name, "--mlflow-uri",
                                              small_study.tracking_uri, "--out", str(out)),
                            capture_output=True, text=True, timeout=300, env=env, cwd=small_study.directory)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    skipped = dict(line[len("not drawn: "):].split(": ", 1) for line in lines if line.startswith("not drawn: "))
    drawn = sorted(p.stem for p in out.glob("*.png"))
    return ReportRun(out, out / "report.html", lines, modules, drawn, skipped)
