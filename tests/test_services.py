"""The server fixtures work for real: Optuna's RDBStorage on PostgreSQL with worker processes, and an MLflow client
against a tracking server with nested runs, batched metrics and artifacts proxied over HTTP."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid

import pytest

N_WORKERS = 3
N_TRIALS = 24


def _objective(trial) -> float:
    trial.set_user_attr("pid", os.getpid())
    x = trial.suggest_float("x", -10.0, 10.0)
    return (x - 2.0) ** 2


def _optuna_worker(url: str, study_name: str, n_trials: int, barrier) -> None:
    """Runs in a spawned process: load the study from PostgreSQL and optimize until the study holds n_trials
    COMPLETE trials (counted across all workers by MaxTrialsCallback)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=url)
    barrier.wait(timeout=120)  # start together, so that the workers really run concurrently
    stop = optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))
    study.optimize(_objective, n_trials=n_trials, callbacks=[stop])


def test_postgres_requires_the_password(postgres_server):
    import psycopg2

    with postgres_server.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user, current_database()")
        assert cur.fetchone() == (postgres_server.user, postgres_server.dbname)
    conn.close()
    assert postgres_server.password in postgres_server.url
    assert postgres_server.password not in repr(postgres_server)
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=postgres_server.host, port=postgres_server.port, user=postgres_server.user,
                         password="wrong", dbname=postgres_server.dbname, connect_timeout=5)


def test_optuna_rdb_storage_with_worker_processes(postgres_server, postgres_url):
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(postgres_url)
    study_name = f"services-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize")

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_WORKERS)
    procs = [ctx.Process(target=_optuna_worker, args=(postgres_url, study_name, N_TRIALS, barrier))
             for _ in range(N_WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * N_WORKERS

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # Each worker stops after the trial that brings the study to N_TRIALS; trials other workers are running
    # at that moment still finish, so up to N_WORKERS - 1 more.
    assert N_TRIALS <= len(complete) <= N_TRIALS + N_WORKERS - 1
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["pid"] for t in complete}) >= 2, "trials should come from several processes"
    assert study.best_value == min(t.value for t in complete)

    # The rows are really in PostgreSQL.
    conn = postgres_server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) "
                        "WHERE studies.study_name = %s AND trials.state = 'COMPLETE'", (study_name,))
            assert cur.fetchone()[0] == len(complete)
    finally:
        conn.close()


def test_mlflow_nested_runs_metrics_and_artifacts(mlflow_server, tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp_id = client.create_experiment(f"services-{uuid.uuid4().hex[:8]}")
    # Artifacts are proxied by the server (--serve-artifacts), not written into a local path by the client.
    assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")

    parent = client.create_run(exp_id, run_name="study")
    parent_id = parent.info.run_id
    child = client.create_run(exp_id, run_name="trial-0", tags={"mlflow.parentRunId": parent_id})
    child_id = child.info.run_id

    now = int(time.time() * 1000)
    losses = [1.0 / (step + 1) for step in range(10)]
    metrics = [Metric("train_loss", v, now + step, step) for step, v in enumerate(losses)]
    metrics += [Metric("phase", float(step >= 5), now + step, step) for step in range(10)]
    client.log_batch(child_id, metrics=metrics, params=[Param("lr", "0.01"), Param("optimizer", "fuse_pv")])

    report = tmp_path / "report.txt"
    report.write_text("switched to L-BFGS at epoch 5\n")
    client.log_artifact(child_id, str(report), artifact_path="reports")
    client.set_terminated(child_id, RunStatus.to_string(RunStatus.FINISHED))
    client.set_terminated(parent_id, RunStatus.to_string(RunStatus.FINISHED))

    # Read everything back through the server.
    history = sorted(client.get_metric_history(child_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(10))
    assert [m.value for m in history] == pytest.approx(losses)
    run = client.get_run(child_id)
    assert run.data.params == {"lr": "0.01", "optimizer": "fuse_pv"}
    assert run.data.metrics["phase"] == 1.0
    assert run.info.status == "FINISHED"

    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert [r.info.run_id for r in children] == [child_id]

    assert [a.path for a in client.list_artifacts(child_id, "reports")] == ["reports/report.txt"]
    local = client.download_artifacts(child_id, "reports/report.txt", str(tmp_path / "downloaded"))
    assert open(local).read() == report.read_text()
    # The upload went over HTTP into the server's artifact destination.
    stored = list(mlflow_server.artifacts_dir.rglob("report.txt"))
    assert len(stored) == 1 and child_id in str(stored[0])
