"""The Ray Tune backend with a real Ray: a local Ray started here (num_cpus=2), a killed and resumed experiment, a
real two-node cluster on this machine, checkpoints that continue exactly, and resource requests refused up front.

Tiny studies on digits-logreg (2-6 epochs, 1-2 seeds) keep the module to a few minutes on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")

from fuse_tune.cli import main  # noqa: E402
from fuse_tune.ray_backend import (  # noqa: E402
    TRIAL_KEY,
    RayContext,
    ResourceError,
    TrialLoop,
    check_resources,
    load_checkpoint,
)
from fuse_tune.trial import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def write_study(directory: Path, name: str, *, epochs: int = 2, seeds: str = "[0, 1]", trials: int = 4,
                pruner: str = "{name: median, n_warmup_steps: 1}", resources: str = "{cpu: 1}",
                search: tuple[str, ...] = ("lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}",
                                           "history_size: {type: int, low: 3, high: 10}",
                                           "batch_size_after_switch: {type: categorical, choices: [64, 256]}")) -> Path:
    """A tiny FUSE-PV study on digits-logreg that switches to L-BFGS after epoch 1."""
    lines = [f"name: {name}", "workload: digits-logreg", "optimizer: fuse_pv", f"epochs: {epochs}", f"seeds: {seeds}",
             "fixed:", "  batch_size: 64", "  switch: {criterion: epoch, epoch: 1}", "search:",
             *(f"  {line}" for line in search), "objective: {metric: val_accuracy}", f"budget: {{trials: {trials}}}",
             "sampler: {name: tpe, seed: 0, n_startup_trials: 2}", f"pruner: {pruner}", f"resources: {resources}"]
    path = directory / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **extra})
    return env


def cli(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``fuse-tune ARGS`` in its own process group (so a timeout ends it and its local Ray, nothing else)."""
    process = subprocess.Popen([sys.executable, "-m", "fuse_tune.cli", *args], cwd=cwd, env=env or _env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        out, err = process.communicate()
        pytest.fail(f"fuse-tune {' '.join(args)} did not finish in {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _kill_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """End the process group this test started (the process is its leader), SIGTERM then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; its children may linger a moment
            time.sleep(1.0)


def mlflow_runs(uri: str, experiment: str) -> tuple[list, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [], []
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("fuse.role") == "study"]
    children = [r for r in runs if r.data.tags.get("fuse.role") == "trial"]
    return parents, children


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for the in-process tests, started here with 2 CPUs (as fuse-tune starts one)."""
    import ray

    from fuse_tune.ray_backend import start_local_ray

    start_local_ray(num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ no cluster needed


def test_check_resources_refuses_what_no_node_can_run():
    one_node = [{"CPU": 2.0, "GPU": 0.0}]
    check_resources({"cpu": 2, "gpu": 0}, one_node, "this machine")
    check_resources({"cpu": 0.5, "gpu": 0}, one_node, "this machine")
    check_resources({"cpu": 1, "gpu": 0.5}, [{"CPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}], "the cluster")
    with pytest.raises(ResourceError, match=r"^resources\.gpu: each trial asks for 1 GPU\(s\), but this machine has "
                                            r"no GPU \(2 CPU\(s\) and 0 GPU\(s\) on 1 node\(s\)\)"):
        check_resources({"cpu": 1, "gpu": 1}, one_node, "this machine")
    with pytest.raises(ResourceError, match=r"^resources\.cpu: each trial asks for 3 CPU\(s\), but the largest node"):
        check_resources({"cpu": 3, "gpu": 0}, [{"CPU": 2.0}, {"CPU": 2.0}], "the cluster")  # 4 in all, 2 per node
    with pytest.raises(ResourceError, match="no node of the cluster has both"):
        check_resources({"cpu": 4, "gpu": 1}, [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 4.0}], "the cluster")


def test_restored_checkpoints_continue_exactly(tmp_path):
    """Through the trainable's own checkpoint code: restoring from every checkpoint (L-BFGS phase included)
    reproduces the uninterrupted run's following epochs and its final objective."""
    from ray import tune

    spec = load_spec(write_study(tmp_path, "exact", epochs=4,
                                 search=("lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}",
                                         "history_size: {type: int, low: 3, high: 10}")))
    ctx = RayContext(spec=spec, tracking_uri=None, parent_run_id=None, experiment_id="test", threads=1, device="cpu")
    config = {"lr": 0.01, "history_size": 5, TRIAL_KEY: 0}
    keys = ("objective", "step", "seeds", "epoch", "epoch/train_loss", "epoch/batch_loss", "epoch/test_loss",
            "epoch/val_accuracy", "epoch/grad_sq_norm", "epoch/grad_evals", "epoch/samples", "epoch/phase_second",
            "epoch/switch_epoch", "epoch/batch_size")

    def collect(into: list, snapshots: list | None = None):
        def report(metrics: dict, directory: str) -> None:
            into.append({k: metrics[k] for k in keys if k in metrics} | {"final": metrics["fuse_final"]})
            if snapshots is not None:
                copy = tmp_path / f"ckpt-{len(snapshots)}"
                shutil.copytree(directory, copy)
                snapshots.append(copy)
        return report

    reference: list[dict] = []
    checkpoints: list[Path] = []
    TrialLoop(ctx, config, trial_id="t0").run(collect(reference, checkpoints))
    # One report per epoch: the mean over both seeds, which advance together.
    assert len(reference) == 4 and reference[-1]["final"] and [r["step"] for r in reference] == list(range(4))
    assert all(r["seeds"] == 2 for r in reference)
    in_lbfgs = [i for i, r in enumerate(reference) if r["epoch/phase_second"] == 1.0 and not r["final"]]
    assert in_lbfgs, "the study must checkpoint inside the L-BFGS phase"
    for index, directory in enumerate(checkpoints[:-1]):
        payload = load_checkpoint(tune.Checkpoint.from_directory(str(directory)))
        assert len(payload["runs"]["trainers"]) == 2 and not payload["finished"]
        if index in in_lbfgs:
            assert all(t["history"][-1]["phase"] == "lbfgs" for t in payload["runs"]["trainers"])
        resumed: list[dict] = []
        final = TrialLoop(ctx, config, trial_id="t0", restored=payload).run(collect(resumed))
        assert resumed == reference[index + 1:], f"restored from checkpoint {index}"
        assert final["objective"] == reference[-1]["objective"]
    # Restored from the final checkpoint (the driver died before it saw the trial end): nothing runs again.
    resumed = []
    final = TrialLoop(ctx, config, trial_id="t0", restored=load_checkpoint(checkpoints[-1])).run(collect(resumed))
    assert resumed == [] and final["objective"] == reference[-1]["objective"] and final["fuse_final"]


def test_restored_trial_logs_into_its_run_once_and_a_clone_gets_its_own(tmp_path):
    """MLflow side of a restore, without Tune: same trial id -> the same child run, no epoch logged twice; another
    trial id (a PBT clone) -> a run of its own that names the run it was cloned from."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_spec(write_study(tmp_path, "attach", epochs=3))
    ctx = RayContext(spec=spec, tracking_uri=uri, parent_run_id=None, experiment_id="e1", threads=1, device="cpu")
    config = {"lr": 0.01, "history_size": 5, "batch_size_after_switch": 64, TRIAL_KEY: 7}
    checkpoints: list[Path] = []

    def keep(metrics: dict, directory: str) -> None:
        copy = tmp_path / f"ckpt-{len(checkpoints)}"
        shutil.copytree(directory, copy)
        checkpoints.append(copy)

    TrialLoop(ctx, config, trial_id="a").run(keep)
    middle = load_checkpoint(checkpoints[1])  # both seeds after epoch 1
    client = MlflowClient(tracking_uri=uri)
    client.set_terminated(middle["mlflow_run_id"], status="KILLED")  # as an interrupted driver leaves it
    TrialLoop(ctx, config, trial_id="a", restored=middle).run(lambda m, d: None)
    TrialLoop(ctx, config, trial_id="b", restored=middle).run(lambda m, d: None)
    runs = client.search_runs([client.get_experiment_by_name("attach").experiment_id])
    assert len(runs) == 2
    original = client.get_run(middle["mlflow_run_id"])
    clone = next(r for r in runs if r.info.run_id != original.info.run_id)
    assert original.info.status == clone.info.status == "FINISHED"
    assert original.data.tags["fuse.state"] == "complete" and original.data.tags["fuse.trial"] == "7"
    assert clone.data.tags["fuse.cloned_from"] == original.info.run_id
    for seed in (0, 1):
        steps = [m.step for m in client.get_metric_history(original.info.run_id, f"train_loss/seed_{seed}")]
        assert steps == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(original.info.run_id, "train_loss")] == [0, 1, 2]
    for seed in (0, 1):
        assert [m.step for m in client.get_metric_history(clone.info.run_id, f"train_loss/seed_{seed}")] == [2]


def test_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    from fuse_tune.ray_backend import _absolute_spec, resolve_storage_path, resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert resolve_storage_path(None) == str(tmp_path / "ray_results")
    assert resolve_storage_path("out") == str(tmp_path / "out")
    assert resolve_storage_path("s3://bucket/results") == "s3://bucket/results"
    spec = load_spec(write_study(tmp_path, "paths"))
    spec = _absolute_spec(dataclasses.replace(spec, data_dir="data"))
    assert spec.data_dir == str(tmp_path / "data") and Path(spec.path).is_absolute()


def test_resource_request_no_node_can_meet_exits_2_at_once(tmp_path):
    study = write_study(tmp_path, "wants_gpu", resources="{cpu: 1, gpu: 1}")
    started = time.monotonic()
    done = cli("run", str(study), "--backend", "ray", "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "--storage", str(tmp_path / "ray_results"), "--quiet", cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuse-tune: error: resources.gpu: each trial asks for 1 GPU(s)")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ray_results").exists()  # refused before anything started
    assert elapsed < 60


def test_resume_without_an_experiment_is_one_line(tmp_path, capsys):
    study = write_study(tmp_path, "never_ran")
    code = main(["resume", str(study), "--backend", "ray", "--no-mlflow", "--storage", str(tmp_path / "rr"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Ray experiment for study 'never_ran'" in err[0]


# ------------------------------------------------------------------ a local Ray


def test_study_with_asha_runs_through_the_cli_and_nests_mlflow_runs(tmp_path, local_ray, capsys):
    from fuse_tune.optuna_backend import run_study

    study = write_study(tmp_path, "asha")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["run", str(study), "--backend", "ray", "--mlflow-uri", uri, "--storage", str(tmp_path / "rr"),
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "study asha:" in out and "ray results:" in out
    parents, children = mlflow_runs(uri, "asha")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.data.tags["fuse.backend"] == "ray" and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["fuse.trial"]) for c in children) == [0, 1, 2, 3]
    assert all(c.info.status == "FINISHED" and c.data.tags["fuse.backend"] == "ray" for c in children)
    states = [c.data.tags["fuse.state"] for c in children]
    assert set(states) <= {"complete", "pruned"} and "complete" in states
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for child in children:  # every epoch it ran, on both seeds (they advance together), logged once, step = epoch
        steps = [[m.step for m in client.get_metric_history(child.info.run_id, f"val_accuracy/seed_{seed}")]
                 for seed in (0, 1)]
        complete = child.data.tags["fuse.state"] == "complete"
        assert steps == ([[0, 1], [0, 1]] if complete else [[0], [0]]), (child.data.tags["fuse.state"], steps)

    # The Optuna backend on the same study logs the same params, metrics and tags (dashboards cannot tell).
    optuna_uri = f"sqlite:///{tmp_path / 'optuna-mlflow.db'}"
    spec = load_spec(study)
    run_study(spec, n_trials=1, storage=f"journal:{tmp_path / 'optuna.log'}", tracking_uri=optuna_uri, progress=False)
    optuna_parents, optuna_children = mlflow_runs(optuna_uri, "asha")
    theirs = optuna_children[0]
    ours = next(c for c in children if c.data.tags["fuse.trial"] == "0")
    assert ours.data.tags["fuse.state"] == theirs.data.tags["fuse.state"] == "complete"
    ray_only = {"fuse.ray_trial_id", "fuse.ray_experiment", "fuse.node_id", "fuse.host", "fuse.ray_outcome_logged"}
    assert set(ours.data.tags) - ray_only == set(theirs.data.tags)
    assert ours.data.params == theirs.data.params  # same sampler, same trial number: same configuration
    assert set(ours.data.metrics) == set(theirs.data.metrics)
    assert set(parent.data.params) == set(optuna_parents[0].data.params)
    assert set(parent.data.tags) - {"fuse.ray_scheduler"} == set(optuna_parents[0].data.tags)


def test_killed_experiment_resumes_to_the_full_budget(tmp_path, local_ray, capsys):
    """SIGKILL the driver (and its local Ray) once a trial has finished, then `fuse-tune resume --backend ray`."""
    study = write_study(tmp_path, "killed", epochs=6, pruner="{name: none}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "rr"
    process = subprocess.Popen(
        [sys.executable, "-m", "fuse_tune.cli", "run", str(study), "--backend", "ray", "--n-jobs", "1",
         "--mlflow-uri", uri, "--storage", str(storage), "--quiet"],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            _, children = mlflow_runs(uri, "killed")
            if any(c.data.tags.get("fuse.state") == "complete" for c in children):
                break
            assert process.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.3)
        else:
            pytest.fail("no trial finished in time")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    _, children = mlflow_runs(uri, "killed")
    finished_before = sum(c.data.tags.get("fuse.state") == "complete" for c in children)
    assert 1 <= finished_before < 4

    code = main(["resume", str(study), "--backend", "ray", "--mlflow-uri", uri, "--storage", str(storage), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "study killed: complete 4" in out
    parents, children = mlflow_runs(uri, "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert all(c.info.status == "FINISHED" and c.data.tags["fuse.state"] == "complete" for c in children)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for child in children:  # a restored trial continues its run and never logs an epoch twice
        for seed in (0, 1):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, f"train_loss/seed_{seed}")]
            assert steps == list(range(6)), (child.data.tags["fuse.trial"], seed, steps)
    experiment = storage / "killed"
    assert not list(experiment.rglob("error.txt")), "a trial failed (e.g. its checkpoint was gone) and was retried"
    for child in children:  # a finished experiment keeps each trial's last checkpoint only
        (trial_dir,) = experiment.glob(f"trial-*-{child.data.tags['fuse.ray_trial_id']}")
        assert len(list(trial_dir.glob("checkpoint_*"))) == 1


# ------------------------------------------------------------------ a real two-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"the Ray head did not open port {port} in {timeout} s")


def _wait_for_alive_nodes(address: str, count: int, env: dict[str, str], logs: Path, timeout: float) -> None:
    """Until the cluster at ``address`` has ``count`` alive nodes as a driver's ``ray.nodes()`` sees them (what
    fuse-tune sees): a worker node's `ray start` is under way, not done, when the head's port is open."""
    probe = ("import sys, time, ray\n"
             "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
             "alive = lambda: sum(1 for node in ray.nodes() if node['Alive'])\n"
             "deadline = time.monotonic() + float(sys.argv[3])\n"
             "while alive() < int(sys.argv[2]) and time.monotonic() < deadline:\n"
             "    time.sleep(0.5)\n"
             "print(alive())\n")
    done = subprocess.run([sys.executable, "-c", probe, address, str(count), str(timeout)], env=env,
                          capture_output=True, text=True, timeout=timeout + 120)
    alive = (done.stdout.split() or ["?"])[-1]
    assert done.returncode == 0 and alive == str(count), (
        f"{alive} alive node(s) of {count} after {timeout:.0f} s:\n{done.stderr[-2000:]}"
        + "".join(p.read_text()[-2000:] for p in logs.iterdir()))


def test_study_runs_on_both_nodes_of_a_two_node_cluster(tmp_path):
    """`ray start --head` and `ray start --address` as separate processes; the study joins with --address.

    The nodes run with --block in process groups of their own, and are stopped by ending those groups: unlike
    `ray stop --force`, that cannot touch another user's Ray on a shared machine.
    """
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: Ray's socket paths live under it
    # Ray 2.60 clusters use token authentication: give the nodes and the driver a token of this test's own.
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with open(logs / f"{name}.out", "w") as out:
            nodes.append(subprocess.Popen([RAY, "start", *args, "--num-cpus=1", "--block", "--disable-usage-stats"],
                                          cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    try:
        start("head", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
              f"--dashboard-agent-listen-port={_free_port()}")
        _wait_for_port(port, 120)
        start("worker", f"--address=127.0.0.1:{port}", f"--dashboard-agent-listen-port={_free_port()}")
        # Both nodes in the cluster before the study starts: a worker node joining late would leave every trial to
        # the head (one node in the summary, one node id on the runs).
        _wait_for_alive_nodes(f"127.0.0.1:{port}", 2, env, logs, 180)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        study = write_study(tmp_path, "two_nodes", pruner="{name: none}", seeds="[0]")
        done = cli("run", str(study), "--backend", "ray", "--address", f"127.0.0.1:{port}", "--n-jobs", "2",
                   "--mlflow-uri", uri, "--storage", str(tmp_path / "rr"), "--quiet", cwd=tmp_path, timeout=400,
                   env=env)
        assert done.returncode == 0, done.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in logs.iterdir())
        assert "ray results:" in done.stdout and "(2 node(s))" in done.stdout
        parents, children = mlflow_runs(uri, "two_nodes")
        assert len(parents) == 1 and len(children) == 4
        assert all(c.data.tags["fuse.state"] == "complete" for c in children)
        assert len({c.data.tags["fuse.node_id"] for c in children}) == 2, "trials ran on one node only"

        # More CPUs per trial than any node has (2 > 1, though the cluster has 2 in all): refused, not pending.
        greedy = write_study(tmp_path, "greedy", resources="{cpu: 2}")
        refused = cli("run", str(greedy), "--backend", "ray", "--address", f"127.0.0.1:{port}", "--no-mlflow",
                      "--storage", str(tmp_path / "rr"), "--quiet", cwd=tmp_path, timeout=180, env=env)
        assert refused.returncode == 2
        lines = [line for line in refused.stderr.strip().splitlines() if line.startswith("fuse-tune:")]
        assert lines and lines[-1].startswith("fuse-tune: error: resources.cpu: each trial asks for 2 CPU(s)")
    finally:
        for process in reversed(nodes):
            _kill_group(process)
        shutil.rmtree(temp, ignore_errors=True)
