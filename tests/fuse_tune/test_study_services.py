"""``fuse-tune run`` against real components, as real subprocesses: concurrent workers sharing a PostgreSQL study,
nested runs and artifacts on an MLflow tracking server over HTTP, and a study resumed after its worker was
SIGKILLed mid-trial (journal file storage, one process and a process group of workers).

Each study is tiny (digits logistic regression, FUSE-PV, one seed, random sampler, no pruner), so a trial takes a
second or two on one thread. The server fixtures (tests/conftest.py) skip the tests that need them when PostgreSQL
or MLflow is missing on this machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)
TrialState = optuna.trial.TrialState

EXIT_TIMEOUT = 300  # seconds one CLI process may take on a loaded 2-core machine

STUDY = """\
name: {name}
workload: digits-logreg
optimizer: fuse_pv
epochs: {epochs}
seeds: [0]
fixed:
  batch_size: 64
search:
  lr: {{type: float, low: 1.0e-3, high: 3.0e-2, log: true}}
  switch.criterion: {{type: categorical, choices: [epoch, grad_norm]}}
  switch.epoch: {{type: int, low: 1, high: {last_epoch}, when: {{switch.criterion: epoch}}}}
  switch.zeta: {{type: float, low: 1.0e-3, high: 1.0, log: true, when: {{switch.criterion: grad_norm}}}}
objective: {{metric: val_accuracy}}
budget: {{trials: 4}}
sampler: {{name: random, seed: 7}}
pruner: {{name: none}}
"""


def write_study(directory: Path, name: str, epochs: int = 2) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, epochs=epochs, last_epoch=max(1, epochs - 1)))
    return path


PARKING_CLI = Path(__file__).with_name("parking_cli.py")  # fuse-tune whose trials stop after their first epoch
HOLD_TIMEOUT = 600.0  # seconds for processes to reach the point a test waits for on a loaded 2-core machine


def cli(*args: str, held: bool = False) -> list[str]:
    script = Path(sys.executable).with_name("fuse-tune")
    if held:
        base = [sys.executable, str(PARKING_CLI)]
    else:
        base = [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "fuse_tune.cli"]
    return [*base, "run", *args, "--quiet", "--threads", "1"]


def env() -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    values.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return values


def start(cwd: Path, *args: str, hold: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """``fuse-tune run *args``; with ``hold`` (FUSE_TEST_* variables) through parking_cli.py, whose trials stop
    after their first epoch as those variables say."""
    return subprocess.Popen(cli(*args, held=hold is not None), cwd=cwd, env={**env(), **(hold or {})},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def wait_for(what: str, ready, processes: list[subprocess.Popen], describe=lambda: ""):
    """Poll ``ready()`` until it returns something true, and return that; fail if one of ``processes`` exits first
    or after ``HOLD_TIMEOUT`` seconds (``describe()`` says what was seen)."""
    deadline = time.monotonic() + HOLD_TIMEOUT
    while True:
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"fuse-tune exited ({process.returncode}) before {what}:\n"
                            f"{process.stdout.read()}\n{process.stderr.read()}")
        result = ready()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {HOLD_TIMEOUT:.0f} s {describe()}")
        time.sleep(0.1)  # poll interval; what is waited for stays true until the test acts on it


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cli(*args), cwd=cwd, env=env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def finished(trials) -> list:
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def load(name: str, storage):
    return optuna.load_study(study_name=name, storage=storage)


def journal(path: Path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def trials_so_far(name: str, log: Path) -> list:
    """The study's trials in the journal now; none while the study is not created yet."""
    try:
        return load(name, journal(log)).get_trials(deepcopy=False)
    except KeyError:
        return []


def param_key(trial) -> tuple:
    return tuple(sorted(trial.params.items()))


# ------------------------------------------------------------------ PostgreSQL


def test_concurrent_cli_workers_share_a_postgres_study(postgres_server, tmp_path):
    """Three `fuse-tune run` processes on one PostgreSQL study: exactly N finished trials between them, distinct
    configurations (the seeded sampler must not replay one stream per process), no password in any output.

    Each process's first trial waits after its first epoch until all three have one (parking_cli.py's gate), so the
    processes share the work however unevenly they start on a loaded machine."""
    n_trials, name = 9, "pg-shared"
    url = postgres_server.new_database()
    study_file = write_study(tmp_path, name)
    gate = tmp_path / "gate"
    gate.mkdir()
    processes = [start(tmp_path, str(study_file), "--storage", url, "--n-trials", str(n_trials), "--no-mlflow",
                       hold={"FUSE_TEST_GATE": str(gate)})
                 for _ in range(3)]
    outputs = []

    def waiting() -> list[str]:  # the processes whose first trial waits at the gate (waiting-<pid>-<trial>)
        return sorted({path.name.split("-")[1] for path in gate.glob("waiting-*")})

    try:
        wait_for("each of the three processes had a trial running", lambda: len(waiting()) == 3, processes,
                 lambda: f"(processes with a trial at the gate: {waiting()})")
        (gate / "open").touch()
        for process in processes:
            stdout, stderr = process.communicate(timeout=EXIT_TIMEOUT)
            outputs.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for code, stdout, stderr in outputs:
        assert code == 0, f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        assert postgres_server.password not in stdout + stderr
        assert "Traceback" not in stderr
    assert any("postgresql+psycopg2://fuse:***@" in stdout for _, stdout, _ in outputs)

    trials = load(name, url).get_trials()
    done = finished(trials)
    assert len(done) == n_trials, [(t.number, t.state.name) for t in trials]
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # every trial number exactly once
    others = [t for t in trials if t not in done]
    assert all(t.state == TrialState.FAIL and t.user_attrs.get("fuse.surplus") for t in others), \
        [(t.number, t.state.name, t.user_attrs) for t in others]  # only trials that lost the race for a slot
    # Three processes with the same seeded sampler must not replay the same stream of configurations.
    keys = [param_key(t) for t in done]
    assert len(set(keys)) == len(keys), sorted(keys)
    assert len({t.system_attrs["fuse.pid"] for t in done}) == 3  # the processes really shared the work


def test_workers_starting_together_on_an_empty_postgres_database(postgres_server, tmp_path):
    """Workers that open a fresh database at the same moment race to create Optuna's tables and the study, and
    to tag it with its fingerprint: every one of them must get the study (threads here, so the race is tight)."""
    from fuse_tune.optuna_backend import prepare_study
    from fuse_tune.trial import load_spec

    url = postgres_server.new_database()
    spec = load_spec(write_study(tmp_path, "pg-together"))
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def worker() -> None:
        barrier.wait(timeout=60)
        try:
            study = prepare_study(spec, url)
            outcomes.append(study.user_attrs["fuse.fingerprint"])
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            outcomes.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert outcomes == [spec.fingerprint()] * 4
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["pg-together"]


# ------------------------------------------------------------------ MLflow


def test_mlflow_server_gets_a_parent_run_and_one_child_per_trial(mlflow_server, tmp_path):
    """`--mlflow-uri http://...`: one parent run holding the study file (uploaded and read back over HTTP) and one
    nested child run per trial with its parameters, per-epoch metric history and switch tags."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    n_trials, name = 3, "mlflow-http"
    study_file = write_study(tmp_path, name)
    done = run(tmp_path, str(study_file), "--mlflow-uri", mlflow_server.uri, "--n-trials", str(n_trials))

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(name)
    runs_table = (f"{mlflow_server.uri}/#/experiments/{experiment.experiment_id}/runs"
                  f"?workflowType=machine_learning")
    assert f"browse the runs: {runs_table}" in done.stdout
    assert experiment is not None
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"  # the UI opens on runs
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("fuse.role") == "study"]
    children = [r for r in runs if r.data.tags.get("fuse.role") == "trial"]
    assert len(parents) == 1 and len(runs) == 1 + n_trials
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["fuse.study"] == name
    assert parent.data.params["optimizer"] == "fuse_pv" and parent.data.params["trials"] == str(n_trials)

    # The study file, uploaded and downloaded through the server's artifact proxy.
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == [study_file.name]
    downloaded = client.download_artifacts(parent.info.run_id, study_file.name, str(tmp_path / "download"))
    assert Path(downloaded).read_text() == study_file.read_text()
    stored = [p for p in mlflow_server.artifacts_dir.rglob(study_file.name) if parent.info.run_id in p.parts]
    assert len(stored) == 1 and stored[0].read_text() == study_file.read_text()  # in the server's artifact store

    assert len(children) == n_trials
    assert sorted(int(r.data.tags["fuse.trial"]) for r in children) == list(range(n_trials))
    for child in children:
        run_id = child.info.run_id
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["fuse.state"] == "complete"
        assert "fuse.switch_epoch" in child.data.tags
        params = child.data.params
        assert 1e-3 <= float(params["lr"]) <= 3e-2
        assert params["switch.criterion"] in ("epoch", "grad_norm")
        assert ("switch.epoch" in params) == (params["switch.criterion"] == "epoch")
        assert params["batch_size"] == "64"
        history = client.get_metric_history(run_id, "val_accuracy/seed_0")
        assert sorted(m.step for m in history) == [0, 1]
        assert all(0.0 <= m.value <= 1.0 for m in history)
        final = max(history, key=lambda m: m.step).value
        assert child.data.metrics["objective.val_accuracy"] == pytest.approx(final)
        assert sorted(m.step for m in client.get_metric_history(run_id, "val_accuracy")) == [0, 1]

    # The address printed opens MLflow 3's UI on the runs table in the model-training view, in a fresh browser
    # (whose GenAI/model-training switch defaults to GenAI, which would open on the traces overview).
    from tests.dashboards.chromium import find_chromium, inspect_page

    if find_chromium() is None:
        pytest.skip("chromium is not installed")
    # every part the assertions read: on a busy machine the runs table's header renders after its row count
    page = inspect_page(runs_table, wait_for_text=[f"{1 + n_trials} matching runs", name, "Run Name",
                                                   "Model registry"], timeout=60)
    assert f"{1 + n_trials} matching runs" in page.text and name in page.text
    assert "Run Name" in page.text and "Model registry" in page.text  # the runs table, model-training sidebar
    assert "Observability" not in page.text and "Token Usage" not in page.text  # not the GenAI overview


# ------------------------------------------------------------------ SIGKILL and resume


def kill_parked(cwd: Path, args: tuple[str, ...], log: Path, name: str, workers: int, after: int) -> tuple[list, int]:
    """Start ``fuse-tune run *args`` in its own session with every trial numbered above ``after`` parking after its
    first epoch (parking_cli.py). Once the study has a COMPLETE trial and ``workers`` RUNNING trials, each numbered
    above ``after`` and parked (one epoch reported, worker pid recorded), nothing in the study can move any more:
    SIGKILL the whole process group (the CLI and any worker processes). Returns the study's trials as the kill left
    them (checked to be exactly what the test last saw), and the CLI's process id.

    Waiting for the parked state, rather than for a trial that has "two epochs to go", is what makes the kill land
    mid-trial however slowly the test itself gets to run: a trial that is still training keeps moving between the
    test's last look at the journal and its kill."""
    process = start(cwd, *args, hold={"FUSE_TEST_PARK_ABOVE": str(after)}, start_new_session=True)
    seen: list = []

    def parked() -> list:
        nonlocal seen
        seen = trials_so_far(name, log)
        running = [t for t in seen if t.state == TrialState.RUNNING]
        return running if (any(t.state == TrialState.COMPLETE for t in seen) and len(running) == workers and all(
            t.number > after and len(t.intermediate_values) == 1 and "fuse.pid" in t.system_attrs
            for t in running)) else []

    try:
        wait_for(f"the study had a COMPLETE trial and {workers} parked RUNNING trial(s) above #{after}", parked,
                 [process], lambda: f"(trial, state, epochs reported): "
                                    f"{[(t.number, t.state.name, len(t.intermediate_values)) for t in seen]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    trials = load(name, journal(log)).get_trials()
    assert trials == seen  # nothing was written between the test's last look and the kill
    return trials, process.pid


def test_sigkill_mid_trial_then_rerun_finishes_exactly_n(tmp_path):
    """Kill a two-worker run (process group) mid-trial, then a one-process resume mid-trial (it is running a retry),
    then resume with the same command: exactly N finished trials, completed ones untouched, killed ones failed and
    retried once with the same parameters (a retry killed again is not retried again)."""
    n_trials, epochs, name = 6, 4, "killed"
    study_file = write_study(tmp_path, name, epochs=epochs)
    log = tmp_path / "fuse-studies.log"  # the default journal storage, in the working directory
    args = (str(study_file), "--n-trials", str(n_trials))  # MLflow: the default store, ./mlflow.db

    # Trial 0 completes; the two workers' next trials are killed after one of their four epochs.
    first, cli_pid = kill_parked(tmp_path, (*args, "--n-jobs", "2"), log, name, workers=2, after=0)
    killed_first = [t for t in first if t.state == TrialState.RUNNING]
    assert len(killed_first) == 2
    assert all(1 <= len(t.intermediate_values) < epochs for t in killed_first)  # killed mid-trial
    # Those trials ran in spawned worker processes, which the process-group kill took down with the CLI.
    assert cli_pid not in {t.system_attrs.get("fuse.pid") for t in first}

    # The resume fails the dead workers' trials and enqueues their parameters again (numbered above all of the
    # first run's trials); it is killed after one epoch of the first retry it runs.
    second, _ = kill_parked(tmp_path, args, log, name, workers=1, after=max(t.number for t in first))
    killed = {t.number for t in killed_first}
    killed_second = [t for t in second if t.state == TrialState.RUNNING]
    assert len(killed_second) == 1
    assert 1 <= len(killed_second[0].intermediate_values) < epochs  # killed mid-trial
    # The resume first failed the dead workers' trials and queued their parameters again: it was killed in a retry.
    assert killed_second[0].user_attrs.get("fuse.retry_of") in killed
    assert {t.number: t.state for t in second if t.number in killed} == dict.fromkeys(killed, TrialState.FAIL)

    run(tmp_path, *args)

    after = load(name, journal(log)).get_trials()
    by_number = {t.number: t for t in after}
    assert sorted(by_number) == list(range(len(after)))  # every trial number once
    assert len(finished(after)) == n_trials, [(t.number, t.state.name) for t in after]
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for snapshot in (first, second):
        for trial in snapshot:
            if trial.state == TrialState.COMPLETE:
                assert by_number[trial.number].state == TrialState.COMPLETE
                assert by_number[trial.number].value == trial.value
    killed = {t.number: t for t in killed_first + killed_second}
    for number, trial in killed.items():
        assert by_number[number].state == TrialState.FAIL
        assert "died" in by_number[number].system_attrs.get("fuse.fail_reason", "")
        retries = [t for t in after if t.user_attrs.get("fuse.retry_of") == number]
        if "fuse.retry_of" in trial.user_attrs:
            assert retries == []  # retried once only
            continue
        assert len(retries) == 1, [(t.number, t.user_attrs) for t in after]
        retry = retries[0]
        assert retry.number > number and retry.params == trial.params
        assert retry.state == (TrialState.FAIL if retry.number in killed else TrialState.COMPLETE)

    # MLflow: the resumes ended the killed trials' child runs (KILLED, failed); none is left RUNNING.
    runs = mlflow_runs(tmp_path, name)
    children = {r.info.run_id: r for r in runs if r.data.tags.get("fuse.role") == "trial"}
    assert not [r.data.tags.get("fuse.trial") for r in children.values() if r.info.status == "RUNNING"]
    for number, trial in killed.items():
        run_id = trial.system_attrs["fuse.mlflow_run_id"]
        assert children[run_id].info.status == "KILLED", (number, children[run_id].info.status)
        assert children[run_id].data.tags["fuse.state"] == "failed"
        assert "died" in children[run_id].data.tags["fuse.error"]
    assert [r.info.status for r in runs if r.data.tags.get("fuse.role") == "study"] == ["FINISHED"]


def mlflow_runs(cwd: Path, name: str) -> list:
    """Every run of study ``name``'s experiment in the default MLflow store of a run in ``cwd`` (./mlflow.db)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], max_results=1000)


# ------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_leaves_no_trial_or_run_running(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the process group) of a two-worker run with a trial on each worker: the
    interrupted trials end FAIL in Optuna and their child runs KILLED (state failed) in MLflow before the command
    exits; the experiment is marked as model training, so MLflow 3's UI opens on its runs table."""
    pytest.importorskip("mlflow")
    name = "interrupted"
    study_file = write_study(tmp_path, name, epochs=4)
    log = tmp_path / "fuse-studies.log"
    # Every trial parks after its first epoch (parking_cli.py) until the interrupt.
    process = start(tmp_path, str(study_file), "--n-trials", "4", "--n-jobs", "2",
                    hold={"FUSE_TEST_PARK_ABOVE": "-1"}, start_new_session=True)
    seen: list = []

    def parked() -> list:
        nonlocal seen
        seen = trials_so_far(name, log)
        running = [t for t in seen if t.state == TrialState.RUNNING and len(t.intermediate_values) == 1
                   and "fuse.mlflow_run_id" in t.system_attrs]
        return running if len(running) == 2 else []

    try:
        interrupted = wait_for("both workers had a trial with an epoch reported", parked, [process],
                               lambda: f"(trial, state, epochs): "
                                       f"{[(t.number, t.state.name, len(t.intermediate_values)) for t in seen]}")
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=EXIT_TIMEOUT)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
    assert process.returncode == 130, f"exit {process.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert "fuse-tune: interrupted" in stderr

    trials = {t.number: t for t in load(name, journal(log)).get_trials()}
    assert not [n for n, t in trials.items() if t.state in (TrialState.RUNNING, TrialState.WAITING)], \
        [(n, t.state.name) for n, t in trials.items()]
    assert {trials[t.number].state for t in interrupted} == {TrialState.FAIL}

    runs = mlflow_runs(tmp_path, name)
    children = {r.info.run_id: r for r in runs if r.data.tags.get("fuse.role") == "trial"}
    assert not [r.data.tags.get("fuse.trial") for r in children.values() if r.info.status == "RUNNING"]
    for trial in interrupted:
        run = children[trial.system_attrs["fuse.mlflow_run_id"]]
        assert run.info.status == "KILLED" and run.data.tags["fuse.state"] == "failed"
    assert [r.info.status for r in runs if r.data.tags.get("fuse.role") == "study"] == ["KILLED"]

    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name(name)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"


# ------------------------------------------------------------------ servers that are not there


@pytest.mark.parametrize("flags", [("--mlflow-uri", "http://127.0.0.1:{port}"),
                                   ("--backend", "ray", "--no-mlflow", "--address", "127.0.0.1:{port}")],
                         ids=["mlflow-server", "ray-cluster"])
def test_a_server_that_is_not_there_is_one_line_within_seconds(tmp_path, flags):
    """An MLflow tracking server or a Ray cluster at a closed port: exit 2 and one line within 15 s (MLflow's client
    retries for minutes, Ray prints connection warnings for 90 s and more)."""
    import socket

    study_file = write_study(tmp_path, "unreachable")
    with socket.socket() as closed:  # bound, not listening: a connection is refused while the test holds it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(cli(str(study_file), *(f.format(port=port) for f in flags)), cwd=tmp_path, env=env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=EXIT_TIMEOUT)
        elapsed = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, f"exit {done.returncode}\nstderr:\n{done.stderr}"
    assert lines[0].startswith("fuse-tune: error: ") and f"127.0.0.1:{port}" in lines[0]
    assert elapsed < 15, f"{elapsed:.1f} s: {lines[0]}"


def test_the_readme_postgresql_url_runs_a_study(postgres_server, tmp_path):
    """`--storage postgresql://user:pw@host:port/db` exactly as the README writes it (no driver named: SQLAlchemy
    2.1 would pick psycopg 3 for it), with what `pip install ".[tuning]"` brings."""
    url = postgres_server.new_database().replace("postgresql+psycopg2://", "postgresql://", 1)
    assert url.startswith(f"postgresql://{postgres_server.user}:{postgres_server.password}@")
    assert "--storage postgresql://user:pw@host/db" in (Path(__file__).parents[2] / "README.md").read_text()
    study_file = write_study(tmp_path, "pg-readme")
    done = run(tmp_path, str(study_file), "--storage", url, "--n-trials", "1", "--no-mlflow")
    assert postgres_server.password not in done.stdout + done.stderr
    assert f"postgresql://{postgres_server.user}:***@" in done.stdout
    assert len(finished(load("pg-readme", url.replace("postgresql://", "postgresql+psycopg2://", 1)).get_trials())) == 1
