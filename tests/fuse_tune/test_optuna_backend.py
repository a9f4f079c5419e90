"""The Optuna backend on a tiny study: exact budgets, resuming, refusing a changed search space, keeping passwords
out of every output, MLflow nesting (sqlite store in tmp_path) and recovering from a killed worker.

No servers: the storage is a journal file (or a monkeypatched stand-in for a PostgreSQL URL), MLflow a sqlite file.
"""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
from pathlib import Path

import pytest

from fuse_tune import optuna_backend
from fuse_tune.cli import main
from fuse_tune.optuna_backend import StudyMismatch, prepare_study, resolve_storage_url, run_study
from fuse_tune.tracking import redact
from fuse_tune.trial import load_spec, suggest

STUDY = """\
name: {name}
workload: digits-logreg
optimizer: fuse_pv
epochs: 2
seeds: [0]
fixed:
  batch_size: 128
  switch: {{criterion: epoch, epoch: 1}}
search:
  lr: {{type: float, low: 1.0e-3, high: 3.0e-2, log: true}}
  history_size: {{type: int, low: 3, high: {high}}}
budget: {{trials: 3}}
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
"""
SECRET_URL = "postgresql://u:secret@db.example/studies"


def write_study(folder: Path, name: str = "tiny", high: int = 10) -> Path:
    path = folder / f"{name}-{high}.yaml"
    path.write_text(STUDY.format(name=name, high=high))
    return path


def states(summary_or_study) -> dict[str, int]:
    study = getattr(summary_or_study, "study", summary_or_study)
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def run(spec, storage, **kwargs):
    return run_study(spec, storage=storage, tracking_uri=None, progress=False, **kwargs)


# ------------------------------------------------------------------ budget and resume


def test_exactly_the_budget_then_resume_then_extend(tmp_path):
    spec = load_spec(write_study(tmp_path))
    storage = f"journal:{tmp_path / 'j.log'}"
    first = run(spec, storage)
    assert states(first) == {"COMPLETE": 3}
    params = [t.params for t in first.study.trials]
    assert all(set(p) == {"lr", "history_size"} for p in params)
    assert first.storage_url == storage and first.parent_run_id is None

    again = run(spec, storage)  # the same command resumes: the budget is met, nothing new runs
    assert states(again) == {"COMPLETE": 3} and [t.params for t in again.study.trials] == params

    more = run(spec, storage, n_trials=4)
    assert states(more) == {"COMPLETE": 4}
    assert [t.number for t in more.study.trials] == [0, 1, 2, 3]
    assert [t.params for t in more.study.trials[:3]] == params
    rows = more.best_rows()
    assert len(rows) == 4 and rows[0]["value"] == max(t.value for t in more.study.trials)
    assert rows[0]["switch_epochs"] == [1]


def test_a_changed_search_space_is_refused(tmp_path, capsys):
    storage = f"journal:{tmp_path / 'j.log'}"
    prepare_study(load_spec(write_study(tmp_path, high=10)), resolve_storage_url(storage))
    changed_path = write_study(tmp_path, high=12)
    with pytest.raises(StudyMismatch, match="study 'tiny' .* different search space"):
        run(load_spec(changed_path), storage)
    code = main(["run", str(changed_path), "--no-mlflow", "--storage", storage, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("fuse-tune: error: ") and "'tiny'" in err and "Traceback" not in err
    assert states(prepare_study(load_spec(write_study(tmp_path)), resolve_storage_url(storage))) == {}


# ------------------------------------------------------------------ storage URLs and passwords


def test_resolve_storage_url(tmp_path):
    assert resolve_storage_url(None, tmp_path) == f"journal:{tmp_path / 'fuse-studies.log'}"
    assert resolve_storage_url("journal:sub/j.log", tmp_path) == f"journal:{tmp_path / 'sub' / 'j.log'}"
    assert resolve_storage_url("runs.log", tmp_path) == f"journal:{tmp_path / 'runs.log'}"
    assert resolve_storage_url("sqlite:///s.db", tmp_path) == f"sqlite:///{tmp_path / 's.db'}"
    assert resolve_storage_url("sqlite:////abs/s.db", tmp_path) == "sqlite:////abs/s.db"
    assert resolve_storage_url(SECRET_URL, tmp_path) == SECRET_URL
    with pytest.raises(ValueError, match="storage must be a URL"):
        resolve_storage_url("nowhere", tmp_path)


def test_redact():
    assert redact(SECRET_URL) == "postgresql://u:***@db.example/studies"
    assert redact("postgresql+psycopg2://fuse:p%40ss:w@h:5432/db") == "postgresql+psycopg2://fuse:***@h:5432/db"
    text = f"could not connect to {SECRET_URL} (timeout); also mysql://a:b@c/d"
    assert "secret" not in redact(text) and ":b@" not in redact(text)
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db" and redact(None) is None


def test_an_unreachable_database_is_one_line_without_the_password(tmp_path, capsys):
    path = write_study(tmp_path)
    code = main(["run", str(path), "--no-mlflow", "--storage", "postgresql://u:secret@127.0.0.1:9/db", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and "secret" not in out + err
    assert len(err.splitlines()) == 1 and err.startswith("fuse-tune: error: storage postgresql://u:***@")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tiny study run through the CLI with a password in its storage URL and a sqlite MLflow store.

    The PostgreSQL URL is served by a journal file (``open_storage`` is patched): what is checked is that the
    URL itself never reaches the printed output or MLflow.
    """
    folder = tmp_path_factory.mktemp("tracked")
    path = write_study(folder, name="tiny-tracked")
    journal = folder / "j.log"
    real_open = optuna_backend.open_storage
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optuna_backend, "open_storage",
                      lambda url: real_open(f"journal:{journal}" if url == SECRET_URL else url))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["run", str(path), "--storage", SECRET_URL, "--mlflow-uri",
                         f"sqlite:///{folder / 'mlflow.db'}", "--quiet"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-tracked")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "client": client, "runs": runs,
            "path": path, "journal": journal}


def test_the_password_is_in_no_output_and_no_mlflow_record(tracked):
    assert tracked["code"] == 0, tracked["err"]
    assert "secret" not in tracked["out"] + tracked["err"]
    assert "storage: postgresql://u:***@db.example/studies" in tracked["out"]
    assert "study tiny-tracked: complete 3" in tracked["out"]
    client = tracked["client"]
    for run in tracked["runs"]:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert "secret" not in key + value, (run.info.run_name, key)
    parent = next(r for r in tracked["runs"] if r.data.tags.get("fuse.role") == "study")
    assert parent.data.tags["fuse.storage"] == "postgresql://u:***@db.example/studies"
    artifact_dir = Path(client.download_artifacts(parent.info.run_id, ""))
    for file in artifact_dir.rglob("*"):
        if file.is_file():
            assert "secret" not in file.read_text(errors="replace")


def test_mlflow_nesting(tracked):
    client, runs = tracked["client"], tracked["runs"]
    parents = [r for r in runs if r.data.tags.get("fuse.role") == "study"]
    children = [r for r in runs if r.data.tags.get("fuse.role") == "trial"]
    assert len(parents) == 1 and len(children) == 3 and len(runs) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny-tracked"
    assert parent.data.params["workload"] == "digits-logreg" and parent.data.params["trials"] == "3"
    assert tracked["path"].name in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert sorted(r.info.run_name for r in children) == [f"tiny-tracked-trial-{i}" for i in range(3)]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["fuse.switch_epoch"] == "1" and child.data.tags["fuse.state"] == "complete"
        assert child.data.tags["fuse.criterion"] == "epoch"
        assert {"lr", "history_size", "switch.criterion", "switch.epoch", "batch_size"} <= set(child.data.params)
        for key in ("train_loss", "val_accuracy", "train_loss/seed_0", "val_accuracy/seed_0"):
            history = client.get_metric_history(child.info.run_id, key)
            assert sorted(m.step for m in history) == [0, 1], key
        assert "objective.val_accuracy" in child.data.metrics
    # each Optuna trial points at its MLflow run
    study = optuna_backend.prepare_study(load_spec(tracked["path"]), f"journal:{tracked['journal']}")
    assert {t.system_attrs["fuse.mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in children}


# ------------------------------------------------------------------ a killed worker


def dead_pid() -> int:
    process = subprocess.Popen(["sleep", "0"])
    process.wait()  # exited and reaped: its pid names no process now
    return process.pid


def test_a_killed_workers_trial_is_failed_and_its_parameters_retried(tmp_path):
    spec = load_spec(write_study(tmp_path))
    storage = f"journal:{tmp_path / 'j.log'}"
    study = prepare_study(spec, resolve_storage_url(storage))
    orphan = study.ask()  # what a worker killed with SIGKILL leaves behind: a RUNNING trial with its pid
    orphan_params = suggest(orphan, spec.search)
    study._storage.set_trial_system_attr(orphan._trial_id, "fuse.pid", dead_pid())
    study._storage.set_trial_system_attr(orphan._trial_id, "fuse.host", socket.gethostname())

    summary = run(spec, storage, n_trials=2)
    trials = summary.study.get_trials(deepcopy=False)
    assert states(summary) == {"FAIL": 1, "COMPLETE": 2}
    failed = trials[0]
    assert failed.state.name == "FAIL" and "died" in failed.system_attrs["fuse.fail_reason"]
    retried = [t for t in trials if t.user_attrs.get("fuse.retry_of") == 0]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == orphan_params

    alive = run(spec, storage, n_trials=2)  # nothing left to recover: no new trials
    assert states(alive) == {"FAIL": 1, "COMPLETE": 2}


def test_the_run_of_a_trial_failed_elsewhere_is_ended_killed(tmp_path):
    """A trial that Optuna failed for its worker (a missed heartbeat on PostgreSQL: a worker on another host died)
    leaves its MLflow run RUNNING; the next worker to look ends it KILLED with the failed state."""
    from optuna.trial import TrialState

    from fuse_tune.tracking import MlflowTracker

    spec = load_spec(write_study(tmp_path))
    study = prepare_study(spec, resolve_storage_url(f"journal:{tmp_path / 'j.log'}"))
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'm.db'}", experiment=spec.name)
    orphan = study.ask()
    run_ = tracker.start_trial(None, "tiny-trial-0", {"lr": 0.01}, {"fuse.trial": 0})
    study._storage.set_trial_system_attr(orphan._trial_id, "fuse.mlflow_run_id", run_.run_id)
    study._storage.set_trial_system_attr(orphan._trial_id, "fuse.host", "another-host")
    study._storage.set_trial_state_values(orphan._trial_id, TrialState.FAIL)  # what fail_stale_trials does
    assert tracker.client.get_run(run_.run_id).info.status == "RUNNING"

    optuna_backend._fail_dead_local_trials(study, tracker)
    ended = tracker.client.get_run(run_.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["fuse.state"] == "failed"


def test_a_setting_that_always_fails_stops_the_worker_instead_of_spinning(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot train this")

    monkeypatch.setattr(optuna_backend, "run_trial", broken)
    spec = load_spec(write_study(tmp_path))
    with pytest.raises(ValueError, match=r"5 trials in a row failed; the last with RuntimeError: cannot train this"):
        run(spec, f"journal:{tmp_path / 'j.log'}")
    study = prepare_study(spec, f"journal:{tmp_path / 'j.log'}")
    assert states(study) == {"FAIL": optuna_backend.MAX_FAILURES_IN_A_ROW}
