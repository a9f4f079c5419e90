"""The Ray backend's driver: the searcher, the scheduler, the Tuner (new or restored), the callback that records
how Tune ended a trial, and :func:`run_ray_study`, which wires them.

Nothing here is module-global state: the callback is given the tracking URI it writes to, and a restored
experiment is given this driver's callback (:func:`_use_callbacks`), so a resume that logs elsewhere logs there.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuse_tune.errors import UserError
from fuse_tune.ray_backend.resources import (
    absolute_spec,
    alive_nodes,
    capacity,
    check_cluster_address,
    check_local_resources,
    check_ray_cluster,
    check_resources,
    import_ray,
    local_cores,
    resolve_storage_path,
    resolve_tracking_uri,
)
from fuse_tune.ray_backend.worker import TRIAL_KEY, RayContext, fuse_trainable
from fuse_tune.records import MAXIMIZE, STATE_FAILED, STATE_PRUNED, Tags, decode_switch_epochs, redact
from fuse_tune.spec import SpecError, StudySpec
from fuse_tune.summary import StudySummaryBase, TrialRow
from fuse_tune.tracking import MlflowTracker, _MlflowRun, end_trial_run
from fuse_tune.trial import resolved, start_study_run, suggest
from fuse_tune.workloads import registered_workload

__all__ = ["RaySummary", "run_ray_study", "start_local_ray", "STUDY_RECORD", "CHECKPOINTS_TO_KEEP"]

STUDY_RECORD = "fuse-study.json"
# Every checkpoint is kept while the experiment runs: with Tune's num_to_keep, a driver killed between Tune deleting
# an old checkpoint and its next experiment snapshot leaves a snapshot that names the deleted checkpoint, and that
# trial cannot be restored. A finished experiment keeps only each trial's last checkpoint (_prune_checkpoints).
CHECKPOINTS_TO_KEEP: int | None = None


# ------------------------------------------------------------------ search and scheduler


class _SearchSpace:
    """OptunaSearch's define-by-run space: the study's own :func:`suggest`; returns None as OptunaSearch wants."""

    def __init__(self, spec: StudySpec) -> None:
        self.params = spec.search

    def __call__(self, trial: Any) -> None:
        suggest(trial, self.params)
        return None


def _make_searcher(spec: StudySpec) -> Any:
    from ray.tune.search.optuna import OptunaSearch

    from fuse_tune.optuna_backend import make_sampler

    class FuseOptunaSearch(OptunaSearch):
        """OptunaSearch that (1) adds the Optuna trial number to each configuration, (2) tells Optuna that a trial
        stopped by ASHA before its last seed was pruned, not complete, and (3) saves with cloudpickle (the study's
        trial-seeded sampler classes are made at run time)."""

        def suggest(self, trial_id: str) -> dict | None:
            params = super().suggest(trial_id)
            if isinstance(params, dict):
                # Ray 2.60 private: OptunaSearch keeps the Optuna trial of each Tune trial in _ot_trials, and has no
                # public way to read its number
                params[TRIAL_KEY] = self._ot_trials[trial_id].number
            return params

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result is not None and not error and not result.get("fuse_final"):
                result = None  # OptunaSearch tells Optuna PRUNED when there is no final value and no error
            super().on_trial_complete(trial_id, result=result, error=error)

        def save(self, checkpoint_path: str) -> None:
            from ray import cloudpickle

            with open(checkpoint_path, "wb") as handle:
                cloudpickle.dump(self.__dict__.copy(), handle)

        def restore(self, checkpoint_path: str) -> None:
            import pickle

            with open(checkpoint_path, "rb") as handle:
                self.__dict__.update(pickle.load(handle))

    directions = spec.objective.directions
    modes = ["max" if d == MAXIMIZE else "min" for d in directions]
    if spec.objective.cost is not None:
        return FuseOptunaSearch(space=_SearchSpace(spec), metric=["objective", "cost"], mode=modes,
                                sampler=make_sampler(spec))
    return FuseOptunaSearch(space=_SearchSpace(spec), metric="objective", mode=modes[0], sampler=make_sampler(spec))


def _make_scheduler(spec: StudySpec) -> Any:
    """ASHA on the per-epoch value at step ``seed_index * epochs + epoch``; ``None`` (FIFO) when not pruning."""
    from ray.tune.schedulers import ASHAScheduler

    max_t = spec.epochs * len(spec.seeds)
    if spec.pruner["name"] == "none" or spec.objective.cost is not None or max_t < 2:
        return None
    options = spec.pruner
    grace = options.get("min_resource") if options["name"] == "hyperband" else options.get("n_warmup_steps")
    grace = min(max(1, int(grace or 1)), max_t - 1)
    reduction = max(2, int(options.get("reduction_factor") or 3))
    return ASHAScheduler(time_attr="step", metric="epoch_value",
                         mode="max" if spec.objective.direction == MAXIMIZE else "min",
                         max_t=max_t, grace_period=grace, reduction_factor=reduction)


def _trial_name(trial: Any) -> str:
    return f"trial-{trial.config.get(TRIAL_KEY, '?')}"


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.config.get(TRIAL_KEY, 'x')}-{trial.trial_id}"


# ------------------------------------------------------------------ how Tune ended a trial, in MLflow


def _trial_end_recorder(tracking_uri: str | None) -> Any:
    """A ``tune.Callback`` that writes to ``tracking_uri``: a trial that Tune stopped (ASHA) is ``pruned``, one
    whose worker died is ``failed``. The class is made here because ``tune`` is imported only with Ray."""
    _, tune = import_ray()

    class TrialEndRecorder(tune.Callback):
        def __init__(self, tracking_uri: str | None) -> None:
            self.tracking_uri = tracking_uri

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its callbacks into the experiment folder: the URI stays out of it (it may carry a
            # password), and a restore is given this driver's recorder (_use_callbacks).
            return {"tracking_uri": None}

        def _finish(self, trial: Any, state: str, status: str, error: str | None = None) -> None:
            run_id = (trial.last_result or {}).get("fuse_run_id")
            if not self.tracking_uri or not run_id:
                return
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=self.tracking_uri)
                run = client.get_run(run_id)
                if run.info.status in ("FINISHED", "FAILED") and run.data.tags.get(Tags.STATE):
                    return  # the trial recorded its own end
                end_trial_run(_MlflowRun(client, run_id), state, status, error)
            except Exception as exc:  # tracking must not end the experiment
                print(f"fuse-tune: could not record the end of trial {trial.trial_id} in MLflow: {exc}",
                      file=sys.stderr)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not (trial.last_result or {}).get("fuse_final"):
                self._finish(trial, STATE_PRUNED, "FINISHED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finish(trial, STATE_FAILED, "FAILED", "the trial's Ray worker failed (see the Ray results folder)")

    return TrialEndRecorder(tracking_uri)


def _callbacks(tracking_uri: str | None) -> list[Any]:
    """The driver's Tune callbacks. MLflow is the record: Tune keeps its JSON results (restores, ResultGrid) but no
    CSV/TensorBoard copies (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``), which cost the driver time on every report."""
    from ray.tune.logger import JsonLoggerCallback

    return [_trial_end_recorder(tracking_uri), JsonLoggerCallback()]


def _use_callbacks(tuner: Any, callbacks: list[Any]) -> None:
    """A restored Tuner runs with the callbacks pickled in its experiment folder; give it this driver's.

    Ray 2.60 private: ``Tuner._local_tuner`` (``Tuner.restore`` takes no run config). Under Ray Client there is no
    local tuner, and the restored callbacks, which carry no tracking URI, record nothing."""
    local = getattr(tuner, "_local_tuner", None)
    if local is not None:
        local.get_run_config().callbacks = callbacks


# ------------------------------------------------------------------ the summary


@dataclass
class RaySummary(StudySummaryBase):
    """What a Ray study ended with (:class:`fuse_tune.summary.StudySummaryBase`); ``results`` is Tune's
    ``ResultGrid``, ``nodes`` the alive nodes at the end."""

    spec: StudySpec
    results: Any
    storage_url: str
    tracking_uri: str | None
    parent_run_id: str | None
    nodes: int = 1

    @property
    def maximize(self) -> bool:
        return self.spec.objective.direction == MAXIMIZE

    def trial_rows(self) -> list[TrialRow]:
        rows = []
        for result in self.results:
            metrics = result.metrics or {}
            state = "FAIL" if result.error is not None else "COMPLETE" if metrics.get("fuse_final") else "PRUNED"
            if state != "COMPLETE":
                rows.append(TrialRow(result.config.get(TRIAL_KEY), state))
                continue
            rows.append(TrialRow(
                result.config.get(TRIAL_KEY), state, metrics["objective"], metrics.get("objective_std"),
                metrics.get("cost") if self.spec.objective.cost else None,
                decode_switch_epochs(str(metrics.get("fuse_switch_epochs", ""))),
                {k: v for k, v in result.config.items() if k != TRIAL_KEY}))
        return rows

    def locations(self) -> list[str]:
        return [f"ray results: {self.storage_url} ({self.nodes} node(s))", *self.mlflow_lines()]


# ------------------------------------------------------------------ the cluster


def _connect(ray: Any, address: str | None, log_to_driver: bool = True) -> tuple[bool, str]:
    """Start a local Ray or join ``address``; returns (started here, a description for messages)."""
    if ray.is_initialized():
        return False, "the running Ray instance"
    if address:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=log_to_driver)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token and its token "
                    "(RAY_AUTH_TOKEN or ~/.ray/auth_token)" if not os.environ.get("RAY_AUTH_MODE") else "")
            raise UserError(f"--address {address}: cannot join the Ray cluster ({first}){hint}") from None
        return True, f"the Ray cluster at {address}"
    start_local_ray(log_to_driver=log_to_driver)
    return True, "this machine"


def start_local_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """``ray.init`` of a local Ray with ``num_cpus`` (default: this machine's cores) and trial workers at normal
    priority: Ray runs workers at nice 15, which starves trials next to any other busy process (an Optuna
    worker runs at nice 0). ``RAY_worker_niceness`` in the environment still wins."""
    ray, _ = import_ray()
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus or local_cores(), include_dashboard=False, logging_level="WARNING",
             log_to_driver=log_to_driver)


# ------------------------------------------------------------------ the experiment


@dataclass(frozen=True)
class _Experiment:
    """Where the study's Ray experiment lives and what it was started with."""

    storage_path: str  # the Ray results folder (absolute) or a URI
    url: str  # the experiment: <storage_path>/<study name>
    path: Path | None  # the same as a local folder (None for a URI)
    record: dict[str, Any] | None  # the study record written when it started (STUDY_RECORD)
    restorable: bool  # Tune can restore it
    n_trials: int
    experiment_id: str

    def write_record(self, spec: StudySpec) -> None:
        """The study record of a new local experiment (read again on resume)."""
        if self.path is None or self.record is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / STUDY_RECORD).write_text(json.dumps(
            {"study": spec.name, "fingerprint": spec.fingerprint(), "trials": self.n_trials,
             "experiment_id": self.experiment_id, "study_file": spec.path}, indent=2))


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / STUDY_RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _find_experiment(spec: StudySpec, storage: str | None, n_trials: int | None, must_exist: bool) -> _Experiment:
    """The study's experiment, new or to restore; refuses one made from another study or with another budget."""
    _, tune = import_ray()
    storage_path = resolve_storage_path(storage)
    path = Path(storage_path) / spec.name if "://" not in storage_path else None
    url = str(path) if path else f"{storage_path.rstrip('/')}/{spec.name}"
    record = _read_record(path) if path else None
    restorable = tune.Tuner.can_restore(url)
    if must_exist and not restorable:
        raise UserError(f"no Ray experiment for study {spec.name!r} in {url}; start it with "
                        f"`fuse-tune run {spec.path or 'STUDY.yaml'} --backend ray`")
    if record is not None and record.get("fingerprint") != spec.fingerprint():
        raise SpecError(f"the Ray experiment {url} was made from a different search space or settings "
                        f"(fingerprint {record.get('fingerprint')} != {spec.fingerprint()}); give the study a new "
                        f"name or use another --storage folder")
    if restorable and record is not None and n_trials is not None and n_trials != record.get("trials"):
        raise UserError(f"--n-trials {n_trials}: the Ray experiment {url} was started with "
                        f"{record.get('trials')} trials, and a restored Ray experiment keeps its budget")
    budget = record.get("trials") if restorable and record else (n_trials or spec.trials)
    experiment_id = (record or {}).get("experiment_id") or uuid.uuid4().hex[:12]
    return _Experiment(storage_path, url, path, record, restorable, budget, experiment_id)


def _make_tuner(spec: StudySpec, experiment: _Experiment, trainable: Any, concurrency: int,
                tracking_uri: str | None, progress: bool) -> Any:
    """``Tuner.restore`` of the experiment (with this driver's callbacks), or a new Tuner."""
    _, tune = import_ray()
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if experiment.restorable:
        tuner = tune.Tuner.restore(experiment.url, trainable=trainable, resume_unfinished=True, resume_errored=True)
        _use_callbacks(tuner, _callbacks(tracking_uri))
        return tuner
    from ray.tune.search import ConcurrencyLimiter

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(_make_searcher(spec), max_concurrent=concurrency),
            scheduler=_make_scheduler(spec), num_samples=experiment.n_trials, time_budget_s=spec.timeout,
            reuse_actors=True, trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=experiment.storage_path, verbose=1 if progress else 0,
            callbacks=_callbacks(tracking_uri),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            failure_config=tune.FailureConfig(max_failures=1)),
    )


def _trainable(ctx: RayContext, request: dict[str, float]) -> Any:
    """:func:`fuse_trainable` with the context shipped to every trial and the per-trial resource request."""
    _, tune = import_ray()
    return tune.with_resources(tune.with_parameters(fuse_trainable, ctx=ctx),
                               {"cpu": request.get("cpu", 1.0), "gpu": request.get("gpu", 0.0)})


def _fit(tuner: Any, spec: StudySpec, n_trials: int, tracking_uri: str | None, parent_run_id: str | None
         ) -> tuple[Any, bool]:
    """Run the Tuner: (its results, whether every trial ended); the parent run ends FINISHED or KILLED."""
    status = "KILLED"
    try:
        results = tuner.fit()
        unfinished = len(results) - results.num_terminated - results.num_errors
        if unfinished == 0 and (len(results) >= n_trials or spec.timeout is not None):
            status = "FINISHED"
    finally:
        if parent_run_id:
            MlflowTracker(tracking_uri, experiment=spec.name).finish_study(parent_run_id, status)
    return results, status == "FINISHED"


def _print_failures(results: Any) -> None:
    """One line per failed trial, as the Optuna backend prints a failed trial."""
    for result in results:
        if result.error is not None:
            lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
            print(f"fuse-tune: trial {result.config.get(TRIAL_KEY)} failed: "
                  f"{redact(lines[-1].strip()) if lines else type(result.error).__name__}", file=sys.stderr)


def _check_counts(n_jobs: int | None, n_trials: int | None, threads: int | None) -> None:
    for flag, value in (("--n-jobs", n_jobs), ("--n-trials", n_trials), ("--threads", threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")


def run_ray_study(spec: StudySpec, *, n_trials: int | None = None, n_jobs: int | None = None,
                  address: str | None = None, storage: str | None = None, tracking_uri: str | None = "default",
                  must_exist: bool = False, threads: int | None = None, device: str | None = None,
                  progress: bool = True) -> RaySummary:
    """Run (or resume, when its Ray experiment exists) a study on a Ray cluster; see :mod:`fuse_tune.ray_backend`."""
    _check_counts(n_jobs, n_trials, threads)
    spec = absolute_spec(resolved(spec))
    if tracking_uri == "default":
        from fuse_tune.tracking import default_tracking_uri

        tracking_uri = default_tracking_uri()
    tracking_uri = resolve_tracking_uri(tracking_uri)
    flag = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_cluster_address(address, flag)  # seconds, not Ray's 90 s of connection warnings
    if address:
        check_ray_cluster(address, flag)  # and what answers there is Ray's GCS (fuse_tune.run_study checked both)
    request = spec.resources
    if not address:  # refuse before starting anything: the local Ray would get these resources
        check_local_resources(request)
    experiment = _find_experiment(spec, storage, n_trials, must_exist)
    if not progress:  # Tune's newer console output prints its configuration table even when silent
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray, _ = import_ray()
    started, where = _connect(ray, address, log_to_driver=progress)
    try:
        nodes = alive_nodes(ray)
        check_resources(request, nodes, where)
        concurrency = n_jobs or min(experiment.n_trials, capacity(request, nodes) or experiment.n_trials)
        scheduler = "asha" if _make_scheduler(spec) is not None else "fifo"
        parent_run_id = start_study_run(spec, tracking_uri, experiment.n_trials, "ray", experiment.url,
                                        {Tags.RAY_SCHEDULER: scheduler})
        experiment.write_record(spec)
        ctx = RayContext(spec=spec, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                         experiment_id=experiment.experiment_id,
                         threads=threads or max(1, int(request.get("cpu", 1.0))),
                         device=device or ("cpu" if request.get("gpu", 0.0) == 0 else None),
                         workload=registered_workload(spec.workload))
        tuner = _make_tuner(spec, experiment, _trainable(ctx, request), concurrency, tracking_uri, progress)
        results, finished = _fit(tuner, spec, experiment.n_trials, tracking_uri, parent_run_id)
        if not finished:
            _mark_interrupted(results, tracking_uri)
            print(f"fuse-tune: the Ray experiment was interrupted; continue it with `fuse-tune resume "
                  f"{spec.path or 'STUDY.yaml'} --backend ray" + (f" --storage {storage}" if storage else "") + "`",
                  file=sys.stderr)
            raise KeyboardInterrupt
        _print_failures(results)
        _prune_checkpoints(results)
        return RaySummary(spec, results, experiment.url, tracking_uri, parent_run_id, nodes=len(alive_nodes(ray)))
    finally:
        if started:
            ray.shutdown()


def _prune_checkpoints(results: Any) -> None:
    """A finished experiment: keep each trial's last checkpoint (what its final experiment snapshot names) only."""
    import shutil

    for result in results:
        latest = result.checkpoint
        if latest is None or "://" in str(result.path) or not Path(result.path).is_dir():
            continue
        keep = Path(latest.path).name
        for directory in Path(result.path).glob("checkpoint_*"):
            if directory.is_dir() and directory.name != keep:
                shutil.rmtree(directory, ignore_errors=True)


def _mark_interrupted(results: Any, tracking_uri: str | None) -> None:
    """Child runs of trials the interruption left running: KILLED until a resume attaches to them again."""
    if not tracking_uri:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for result in results:
        run_id = (result.metrics or {}).get("fuse_run_id")
        if not run_id or (result.metrics or {}).get("fuse_final"):
            continue
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")
        except Exception:  # pragma: no cover - best effort
            continue
