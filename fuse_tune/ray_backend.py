"""Ray Tune backend: a study file -> a ``ray.tune.Tuner`` over the same trial logic as the Optuna backend.

    fuse-tune run STUDY.yaml --backend ray [--address HOST:PORT] [--n-trials N] [--n-jobs J] [--mlflow-uri URI]
    fuse-tune resume STUDY.yaml --backend ray

* Search: Optuna's sampler of the study file (:func:`fuse_tune.optuna_backend.make_sampler`) inside Tune's
  ``OptunaSearch``, with :func:`fuse_tune.trial.suggest` as its define-by-run space, so both backends draw from
  the same space with the same sampler; at most ``--n-jobs`` trials run at once (default: as many as the
  cluster's CPUs/GPUs fit). Each configuration runs on every seed of the study, the seeds advancing together
  (:class:`fuse_tune.trial.SeedRuns`, as under the Optuna backend).
* Early stopping: Optuna pruners do not apply under Ray; a study with ``pruner: median | hyperband`` gets Tune's
  ASHA scheduler instead (``pruner: none`` or a cost objective: none). Each epoch reports once, the mean over
  seeds of the objective at ``step = epoch``, as the Optuna backend reports to its pruner; ASHA compares trials
  at equal steps.
* Resources: ``resources: {cpu, gpu}`` of the study file are each trial's request (fractions allowed); torch
  uses ``max(1, floor(cpu))`` threads per trial. A request no node of the cluster can meet (``gpu: 1`` with no
  GPU, more CPUs than the largest node has) is refused before anything runs, in one line (exit status 2),
  instead of leaving trials pending forever.
* Cluster: ``--address`` (or ``RAY_ADDRESS``) joins a running cluster (``ray start --head``); otherwise a local
  Ray starts with this machine's cores. Every path is made absolute on the driver (study file, ``data_dir``,
  the MLflow store, the Ray results folder ``./ray_results/<study>``) because trials run in their own working
  directories, possibly on other machines (there the paths must be shared).
* Checkpoints: after every epoch a trial reports a checkpoint with the whole
  :meth:`fuse_tune.train.Trainer.state_dict` (model, optimizer with its phase, Adam moments, L-BFGS memory and
  criterion state, generators, counters, history) of every seed, and the MLflow
  child run id, so a restored trial (or one cloned by PBT) continues exactly where it stopped.
  ``fuse-tune resume STUDY.yaml --backend ray`` (or the same ``run`` command again) restores an interrupted
  experiment with ``Tuner.restore``: finished trials stay finished, unfinished and errored ones continue from
  their last checkpoint, and the searcher continues from its saved state.
* MLflow: the study's parent run (found again by its tags) and one child run per trial with the same params,
  per-epoch metrics, summary metrics and tags as the Optuna backend (:func:`fuse_tune.trial.trial_tags`,
  :func:`fuse_tune.trial.log_outcome`), with the :class:`fuse_tune.records.Tags` ``BACKEND`` = ``ray``, plus
  ``NODE_ID``, ``HOST`` and ``RAY_TRIAL_ID``. A restored trial logs into its run again and never logs an epoch
  twice.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fuse_tune.records import (
    MAXIMIZE,
    STATE_FAILED,
    STATE_PRUNED,
    Metrics,
    Tags,
    decode_switch_epochs,
    encode_switch_epochs,
    flatten_params,
    per_seed_key,
    redact,
    tag_equals,
)
from fuse_tune.spec import SpecError, StudySpec
from fuse_tune.tracking import MlflowTracker
from fuse_tune.train import EpochMetrics
from fuse_tune.trial import SeedRuns, _loggable, log_outcome, study_run_info, suggest, trial_tags

__all__ = ["RayContext", "ResourceError", "RaySummary", "TrialLoop", "check_resources", "fuse_trainable",
           "load_checkpoint", "run_ray_study", "start_local_ray", "DEFAULT_RAY_STORAGE", "CHECKPOINT_FILE",
           "TRIAL_KEY"]

DEFAULT_RAY_STORAGE = "ray_results"
CHECKPOINT_FILE = "fuse_trial.pt"
STUDY_RECORD = "fuse-study.json"
TRIAL_KEY = "fuse_trial"  # the Optuna trial number, added to each configuration by the searcher
CHECKPOINT_FORMAT = 2  # 2: every seed's state in one payload (the seeds advance together)
# Every checkpoint is kept while the experiment runs: with Tune's num_to_keep, a driver killed between Tune deleting
# an old checkpoint and its next experiment snapshot leaves a snapshot that names the deleted checkpoint, and that
# trial cannot be restored. A finished experiment keeps only each trial's last checkpoint (_prune_checkpoints).
CHECKPOINTS_TO_KEEP: int | None = None


class ResourceError(ValueError):
    """The cluster cannot run a trial with the study's resources; one line."""


def _ray():
    try:
        import ray
        from ray import tune
    except ImportError:  # pragma: no cover - depends on the install
        raise ValueError("--backend ray needs the 'ray' extra: pip install 'fuse[ray]'") from None
    return ray, tune


# ------------------------------------------------------------------ paths


def resolve_tracking_uri(uri: str | None, workdir: str | os.PathLike[str] | None = None) -> str | None:
    """An MLflow URI that means the same from any working directory (relative sqlite/file paths made absolute)."""
    if uri is None:
        return None
    workdir = Path(workdir or os.getcwd())
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(workdir / uri[len('sqlite:///'):]).resolve()}"
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return (workdir / uri[len("file:"):]).resolve().as_uri()
    if "://" not in uri and not uri.startswith("file:"):
        return str((workdir / uri).resolve())
    return uri


def resolve_storage_path(path: str | None, workdir: str | os.PathLike[str] | None = None) -> str:
    """The Ray results folder, absolute (``./ray_results`` by default); URIs (``s3://``...) are kept."""
    if path and "://" in path:
        return path
    return str((Path(workdir or os.getcwd()) / (path or DEFAULT_RAY_STORAGE)).resolve())


def _absolute_spec(spec: StudySpec, workdir: str | os.PathLike[str] | None = None) -> StudySpec:
    workdir = Path(workdir or os.getcwd())
    data_dir = str((workdir / spec.data_dir).resolve()) if spec.data_dir else None
    path = str(Path(spec.path).resolve()) if spec.path else None
    return replace(spec, data_dir=data_dir, path=path)


# ------------------------------------------------------------------ resources


def _describe(nodes: Sequence[Mapping[str, float]]) -> str:
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    return f"{cpus:g} CPU(s) and {gpus:g} GPU(s) on {len(nodes)} node(s)"


def check_resources(request: Mapping[str, float], nodes: Sequence[Mapping[str, float]], where: str) -> None:
    """Refuse (:class:`ResourceError`, one line) a per-trial request that no single node can meet.

    ``nodes`` are the alive nodes' total resources (``{"CPU": 2.0, "GPU": 0.0}``); a trial is one bundle, so it
    must fit on one node. Ray would otherwise keep such trials pending forever.
    """
    cpu, gpu = float(request.get("cpu", 1.0)), float(request.get("gpu", 0.0))
    tolerance = 1e-9
    if not nodes:
        raise ResourceError(f"resources: {where} has no alive node")
    if any(n.get("CPU", 0.0) + tolerance >= cpu and n.get("GPU", 0.0) + tolerance >= gpu for n in nodes):
        return
    largest_gpu = max(n.get("GPU", 0.0) for n in nodes)
    largest_cpu = max(n.get("CPU", 0.0) for n in nodes)
    if gpu > largest_gpu + tolerance:
        has = "no GPU" if largest_gpu == 0 else f"at most {largest_gpu:g} GPU(s) per node"
        raise ResourceError(f"resources.gpu: each trial asks for {gpu:g} GPU(s), but {where} has {has} "
                            f"({_describe(nodes)}); set resources.gpu: 0 or use a cluster with GPUs (--address)")
    if cpu > largest_cpu + tolerance:
        raise ResourceError(f"resources.cpu: each trial asks for {cpu:g} CPU(s), but the largest node of {where} has "
                            f"{largest_cpu:g} ({_describe(nodes)}); lower resources.cpu")
    raise ResourceError(f"resources: no node of {where} has both {cpu:g} CPU(s) and {gpu:g} GPU(s) "
                        f"({_describe(nodes)})")


def _capacity(request: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int | None:
    """How many trials the cluster runs at once (``None``: unbounded, a request of nothing)."""
    cpu, gpu = float(request.get("cpu", 1.0)), float(request.get("gpu", 0.0))
    if cpu <= 0 and gpu <= 0:
        return None
    total = 0
    for node in nodes:
        fits = [math.floor(node.get("CPU", 0.0) / cpu + 1e-9) if cpu > 0 else math.inf,
                math.floor(node.get("GPU", 0.0) / gpu + 1e-9) if gpu > 0 else math.inf]
        total += int(min(fits))
    return max(1, total)


def _local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _alive_nodes(ray: Any) -> list[dict[str, float]]:
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


# ------------------------------------------------------------------ the trial


@dataclass(frozen=True)
class RayContext:
    """What every trial needs from the driver (absolute paths only); shipped with ``tune.with_parameters``."""

    spec: StudySpec
    tracking_uri: str | None
    parent_run_id: str | None
    experiment_id: str
    threads: int = 1
    device: str | None = None


def load_checkpoint(checkpoint: Any) -> dict[str, Any] | None:
    """The payload of a ``tune.Checkpoint`` (or of a checkpoint folder path) written by :class:`TrialLoop`."""
    if checkpoint is None:
        return None
    import torch

    if hasattr(checkpoint, "as_directory"):  # a tune.Checkpoint (it is os.PathLike only to refuse that use)
        with checkpoint.as_directory() as directory:
            return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    return torch.load(Path(checkpoint) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


@dataclass
class _Progress:
    """Where a trial stands; the checkpoint payload."""

    runs: dict[str, Any] | None = None  # SeedRuns.state_dict(): every seed's Trainer state, the group's epoch
    finished: bool = False  # every seed has trained its last epoch
    mlflow_run_id: str | None = None


class _NullChild:
    run_id = None
    complete = False

    def log_epoch(self, seed: int, metrics: Mapping[str, float | None], step: int) -> None:
        pass

    def finish_complete(self, outcome: Any, spec: StudySpec) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass


class _ChildRun:
    """The trial's MLflow child run: created with the Optuna backend's params and tags, or attached again (after
    a restore, a retry or a driver that died before Tune recorded the trial) without logging an epoch twice."""

    def __init__(self, ctx: RayContext, number: int, settings: Mapping[str, Any], trial_id: str, node_id: str,
                 run_id: str | None, cloned_from: str | None = None) -> None:
        from fuse_tune.tracking import _MlflowRun

        spec = ctx.spec
        tracker = MlflowTracker(ctx.tracking_uri, experiment=spec.name)
        self.client = tracker.client
        self.complete = False
        self.attached = False
        self._logged: dict[int, set[int]] = {}
        tags: dict[str, str] | None = None
        if run_id is not None:
            try:
                tags = self.client.get_run(run_id).data.tags
            except Exception:  # resumed against another MLflow store: this trial gets a run there
                run_id = None
        if run_id is None and cloned_from is None:
            run_id = self._find(tracker, ctx, number, flatten_params(settings))
            tags = self.client.get_run(run_id).data.tags if run_id is not None else None
        if run_id is not None and tags is not None:
            self.run = _MlflowRun(self.client, run_id)
            self.complete = tags.get(Tags.RAY_OUTCOME_LOGGED) == "1"
            if tags.get(Tags.STATE) in (STATE_FAILED, STATE_PRUNED):
                self.client.delete_tag(run_id, Tags.STATE)
            self.client.update_run(run_id, status="RUNNING")
            self.attached = True
        else:
            self.run = tracker.start_trial(ctx.parent_run_id, f"{spec.name}-trial-{number}", settings,
                                           trial_tags(spec, settings, number, "ray"))
        extra = {Tags.RAY_TRIAL_ID: trial_id, Tags.RAY_EXPERIMENT: ctx.experiment_id, Tags.NODE_ID: node_id,
                 Tags.HOST: socket.gethostname()}
        if cloned_from:
            extra[Tags.CLONED_FROM] = cloned_from
        self.run.set_tags(extra)
        self.run_id = self.run.run_id

    def _find(self, tracker: MlflowTracker, ctx: RayContext, number: int, params: Mapping[str, str]) -> str | None:
        """This experiment's earlier run of the same trial number with the same params (a lost attempt)."""
        if ctx.parent_run_id is None:
            return None
        runs = self.client.search_runs(
            [tracker.experiment_id],
            filter_string=" and ".join((tag_equals(Tags.MLFLOW_PARENT_RUN_ID, ctx.parent_run_id),
                                        tag_equals(Tags.TRIAL, number), tag_equals(Tags.BACKEND, "ray"),
                                        tag_equals(Tags.RAY_EXPERIMENT, ctx.experiment_id))))
        wanted = {k: redact(v) for k, v in params.items()}
        for run in runs:
            if run.data.params == wanted:
                return run.info.run_id
            self.client.set_tag(run.info.run_id, Tags.STATE, STATE_FAILED)
            self.client.set_tag(run.info.run_id, Tags.ERROR, "superseded: the driver stopped before Ray recorded "
                                                             "this trial, and its number was drawn again")
            self.client.set_terminated(run.info.run_id, status="KILLED")
        return None

    def log_epoch(self, seed: int, metrics: Mapping[str, float | None], step: int) -> None:
        if self.attached:
            if seed not in self._logged:
                history = self.client.get_metric_history(self.run_id, per_seed_key(Metrics.WALL_TIME, seed))
                self._logged[seed] = {m.step for m in history}
            if step in self._logged[seed]:
                return  # logged by an earlier attempt; the restored trial recomputes the same epoch
        self.run.log_epoch(seed, metrics, step)

    def finish_complete(self, outcome: Any, spec: StudySpec) -> None:
        if not self.complete:
            log_outcome(self.run, outcome, spec)
            self.run.set_tags({Tags.RAY_OUTCOME_LOGGED: "1"})  # a restored trial must not log it twice
        self.run.finish("FINISHED")

    def fail(self, exc: BaseException) -> None:
        self.run.set_tags({Tags.STATE: STATE_FAILED, Tags.ERROR: f"{type(exc).__name__}: {exc}"})
        self.run.finish("FAILED")


class TrialLoop:
    """The body of the Ray trainable, apart from Tune: one configuration on every seed, an epoch at a time.

    After each epoch it logs the epoch to MLflow and calls ``report(metrics, checkpoint_dir)`` with a folder
    holding the checkpoint payload (valid during the call). ``restored`` is a payload from
    :func:`load_checkpoint`: the loop continues exactly where that checkpoint was taken.
    """

    def __init__(self, ctx: RayContext, config: Mapping[str, Any], *, trial_id: str, node_id: str = "",
                 restored: Mapping[str, Any] | None = None) -> None:
        self.ctx = ctx
        spec = ctx.spec
        self.number = int(config.get(TRIAL_KEY, 0))
        self.sampled = {k: v for k, v in config.items() if k != TRIAL_KEY}
        self.settings = spec.configuration(self.sampled)
        self.trial_id = trial_id
        self.node_id = node_id
        self.progress = _Progress()
        self.cloned_from: str | None = None
        self.waited = 0.0  # seconds spent handing results and checkpoints to Tune (the driver's round trips)
        self.started_at = time.time()
        if restored is not None:
            if restored.get("fingerprint") != spec.fingerprint():
                raise SpecError(f"checkpoint of trial {trial_id} was taken from a different study "
                                f"(fingerprint {restored.get('fingerprint')} != {spec.fingerprint()})")
            if restored.get("format") != CHECKPOINT_FORMAT:
                raise SpecError(f"checkpoint of trial {trial_id} has format {restored.get('format')}, this version "
                                f"of fuse-tune reads format {CHECKPOINT_FORMAT}")
            self.progress = _Progress(runs=restored["runs"], finished=restored["finished"],
                                      mlflow_run_id=restored["mlflow_run_id"])
            if restored.get("ray_trial_id") not in (None, trial_id):  # cloned (PBT): a run of its own
                self.cloned_from = self.progress.mlflow_run_id
                self.progress.mlflow_run_id = None

    def payload(self) -> dict[str, Any]:
        p = self.progress
        return {"format": CHECKPOINT_FORMAT, "fingerprint": self.ctx.spec.fingerprint(), "ray_trial_id": self.trial_id,
                "trial": self.number, "sampled": self.sampled, "runs": p.runs, "finished": p.finished,
                "mlflow_run_id": p.mlflow_run_id}

    def _open_run(self) -> Any:
        if self.ctx.tracking_uri is None:
            return _NullChild()
        return _ChildRun(self.ctx, self.number, self.settings, self.trial_id, self.node_id,
                         self.progress.mlflow_run_id, cloned_from=self.cloned_from)

    def run(self, report: Callable[[dict[str, Any], str], None]) -> dict[str, Any]:
        """Train to the end (or until ``report`` stops it); returns the final metrics."""
        child = self._open_run()
        self.progress.mlflow_run_id = child.run_id
        try:
            return self._loop(child, report)
        except Exception as exc:
            child.fail(exc)
            raise
        # SystemExit (Tune stopping the trial: ASHA, a time budget, an interrupted driver) leaves the run to the
        # driver's callback, which marks it pruned, or to the restored trial, which continues it.

    def _loop(self, child: Any, report: Callable[[dict[str, Any], str], None]) -> dict[str, Any]:
        import torch

        progress = self.progress
        torch.set_num_threads(self.ctx.threads)
        runs = SeedRuns(self.ctx.spec, self.settings, threads=self.ctx.threads, device=self.ctx.device)
        if progress.runs is not None:
            runs.load_state_dict(progress.runs)
        if progress.finished:  # restored from the final checkpoint: Tune has the final result already
            outcome = runs.outcome()
            child.finish_complete(outcome, self.ctx.spec)
            return self._final_metrics(outcome)
        final: dict[str, Any] = {}
        while not runs.done:
            epoch = runs.epoch
            value, metrics = runs.run_epoch(child.log_epoch)
            progress.runs, progress.finished = runs.state_dict(), runs.done
            result = self._metrics(epoch, value, metrics)
            if runs.done:
                outcome = runs.outcome()
                result.update(self._final_metrics(outcome))
                child.finish_complete(outcome, self.ctx.spec)
                final = result
            self._report(report, result)
        return final

    def _metrics(self, epoch: int, value: float, metrics: Sequence[EpochMetrics]) -> dict[str, Any]:
        """The epoch's result for Tune: the mean over seeds of the objective (what ASHA compares) and of each metric."""
        spec = self.ctx.spec
        result: dict[str, Any] = {
            "objective": value, "epoch_value": value, "step": epoch, "epoch": epoch, "seeds": len(metrics),
            TRIAL_KEY: self.number, "fuse_run_id": self.progress.mlflow_run_id or "", "fuse_node_id": self.node_id,
            "fuse_final": False,
        }
        if spec.objective.cost is not None:
            costs = [m.grad_evals if spec.objective.cost == Metrics.GRAD_EVALS else m.wall_time for m in metrics]
            result["cost"] = float(statistics.fmean(costs))
        per_seed = [_loggable(m) for m in metrics]
        for key in per_seed[0]:
            numbers = [row[key] for row in per_seed if row[key] is not None]
            if numbers:
                result[f"epoch/{key}"] = float(statistics.fmean(numbers))
        return result

    def _final_metrics(self, outcome: Any) -> dict[str, Any]:
        final = {"objective": float(outcome.value), "objective_std": float(outcome.std), "fuse_final": True,
                 "epochs_run": outcome.epochs_run,
                 "fuse_switch_epochs": encode_switch_epochs(outcome.switch_epochs),
                 "fuse_per_seed": ",".join(repr(float(v)) for v in outcome.per_seed)}
        if outcome.cost is not None:
            final["cost"] = float(outcome.cost)
        return final

    def _report(self, report: Callable[[dict[str, Any], str], None], result: dict[str, Any]) -> None:
        import torch

        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fuse-ckpt-") as directory:
            torch.save(self.payload(), Path(directory) / CHECKPOINT_FILE)
            result.update(fuse_report_s=self.waited, fuse_started_at=self.started_at, fuse_reported_at=time.time())
            report(result, directory)
        self.waited += time.perf_counter() - start


def fuse_trainable(config: dict[str, Any], ctx: RayContext) -> None:
    """The Tune function trainable (``tune.with_parameters(fuse_trainable, ctx=...)``)."""
    ray, tune = _ray()
    loop = TrialLoop(ctx, config, trial_id=tune.get_context().get_trial_id(),
                     node_id=ray.get_runtime_context().get_node_id(), restored=load_checkpoint(tune.get_checkpoint()))
    loop.run(lambda metrics, directory: tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory)))


# ------------------------------------------------------------------ search, scheduler, callbacks


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


#: The MLflow URI of the driver that runs the experiment now (the callback is pickled with the experiment,
#: and a resumed experiment may log elsewhere).
_DRIVER: dict[str, Any] = {"tracking_uri": None}


def _callback_class() -> type:
    _, tune = _ray()

    class _MlflowStates(tune.Callback):
        """Driver side: a trial that Tune stopped (ASHA) is ``pruned``, one that died is ``failed``."""

        def _finish(self, trial: Any, state: str, status: str, error: str | None = None) -> None:
            from fuse_tune import ray_backend  # this module, not a copy pickled with the experiment

            uri = ray_backend._DRIVER.get("tracking_uri")
            run_id = (trial.last_result or {}).get("fuse_run_id")
            if not uri or not run_id:
                return
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=uri)
                run = client.get_run(run_id)
                if run.info.status in ("FINISHED", "FAILED") and run.data.tags.get(Tags.STATE):
                    return  # the trial recorded its own end
                client.set_tag(run_id, Tags.STATE, state)
                if error:
                    client.set_tag(run_id, Tags.ERROR, error[:5000])
                client.set_terminated(run_id, status=status)
            except Exception as exc:  # tracking must not end the experiment
                print(f"fuse-tune: could not record the end of trial {trial.trial_id} in MLflow: {exc}",
                      file=sys.stderr)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not (trial.last_result or {}).get("fuse_final"):
                self._finish(trial, STATE_PRUNED, "FINISHED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finish(trial, STATE_FAILED, "FAILED", "the trial's Ray worker failed (see the Ray results folder)")

    return _MlflowStates


# ------------------------------------------------------------------ driver


@dataclass
class RaySummary:
    """What a Ray study ended with, in the Optuna summary's shape (``counts()``, ``best_rows()``)."""

    spec: StudySpec
    results: Any
    storage_url: str
    tracking_uri: str | None
    parent_run_id: str | None
    nodes: int = 1

    def _state(self, result: Any) -> str:
        if result.error is not None:
            return "FAIL"
        return "COMPLETE" if (result.metrics or {}).get("fuse_final") else "PRUNED"

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.results:
            state = self._state(result)
            counts[state] = counts.get(state, 0) + 1
        return counts

    def best_rows(self, limit: int = 5) -> list[dict[str, Any]]:
        complete = [r for r in self.results if self._state(r) == "COMPLETE"]
        maximize = self.spec.objective.direction == MAXIMIZE
        complete.sort(key=lambda r: r.metrics["objective"], reverse=maximize)
        rows = []
        for result in complete[:limit]:
            m = result.metrics
            switch = decode_switch_epochs(str(m.get("fuse_switch_epochs", "")))
            rows.append({"trial": result.config.get(TRIAL_KEY), "value": m["objective"], "std": m.get("objective_std"),
                         "cost": m.get("cost") if self.spec.objective.cost else None, "switch_epochs": switch,
                         "params": {k: v for k, v in result.config.items() if k != TRIAL_KEY}})
        return rows


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / STUDY_RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
            raise ValueError(f"--address {address}: cannot join the Ray cluster ({first}){hint}") from None
        return True, f"the Ray cluster at {address}"
    start_local_ray(log_to_driver=log_to_driver)
    return True, "this machine"


def start_local_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """``ray.init`` of a local Ray with ``num_cpus`` (default: this machine's cores) and trial workers at normal
    priority: Ray runs workers at nice 15, which starves trials next to any other busy process (an Optuna
    worker runs at nice 0). ``RAY_worker_niceness`` in the environment still wins."""
    ray, _ = _ray()
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus or _local_cores(), include_dashboard=False, logging_level="WARNING",
             log_to_driver=log_to_driver)


def run_ray_study(spec: StudySpec, *, n_trials: int | None = None, n_jobs: int | None = None,
                  address: str | None = None, storage: str | None = None, tracking_uri: str | None = "default",
                  must_exist: bool = False, threads: int | None = None, device: str | None = None,
                  progress: bool = True) -> RaySummary:
    """Run (or resume, when its Ray experiment exists) a study on a Ray cluster; see the module docstring."""
    if n_jobs is not None and n_jobs < 1:
        raise ValueError(f"--n-jobs must be >= 1, got {n_jobs}")
    if n_trials is not None and n_trials < 1:
        raise ValueError(f"--n-trials must be >= 1, got {n_trials}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    spec = _absolute_spec(spec)
    storage_path = resolve_storage_path(storage)
    experiment_path = Path(storage_path) / spec.name if "://" not in storage_path else None
    experiment_url = str(experiment_path) if experiment_path else f"{storage_path.rstrip('/')}/{spec.name}"
    if tracking_uri == "default":
        from fuse_tune.tracking import default_tracking_uri

        tracking_uri = default_tracking_uri()
    tracking_uri = resolve_tracking_uri(tracking_uri)
    address = address or os.environ.get("RAY_ADDRESS") or None
    request = spec.resources
    if not address:  # refuse before starting anything: the local Ray would get these resources
        import torch

        check_resources(request, [{"CPU": float(_local_cores()), "GPU": float(torch.cuda.device_count())}],
                        "this machine")

    ray, tune = _ray()
    record = _read_record(experiment_path) if experiment_path else None
    restorable = tune.Tuner.can_restore(experiment_url)
    if must_exist and not restorable:
        raise ValueError(f"no Ray experiment for study {spec.name!r} in {experiment_url}; start it with "
                         f"`fuse-tune run {spec.path or 'STUDY.yaml'} --backend ray`")
    if record is not None and record.get("fingerprint") != spec.fingerprint():
        raise SpecError(f"the Ray experiment {experiment_url} was made from a different search space or settings "
                        f"(fingerprint {record.get('fingerprint')} != {spec.fingerprint()}); give the study a new "
                        f"name or use another --storage folder")
    if restorable and record is not None and n_trials is not None and n_trials != record.get("trials"):
        raise ValueError(f"--n-trials {n_trials}: the Ray experiment {experiment_url} was started with "
                         f"{record.get('trials')} trials, and a restored Ray experiment keeps its budget")
    n_trials = (record or {}).get("trials") if restorable and record else (n_trials or spec.trials)
    experiment_id = (record or {}).get("experiment_id") or uuid.uuid4().hex[:12]

    if not progress:  # Tune's newer console output prints its configuration table even when silent
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started, where = _connect(ray, address, log_to_driver=progress)
    try:
        nodes = _alive_nodes(ray)
        check_resources(request, nodes, where)
        capacity = _capacity(request, nodes)
        concurrency = n_jobs or min(n_trials, capacity or n_trials)
        parent_run_id = None
        if tracking_uri:
            tracker = MlflowTracker(tracking_uri, experiment=spec.name)
            tags, params = study_run_info(spec, n_trials, "ray", redact(experiment_url))
            scheduler_name = "asha" if _make_scheduler(spec) is not None else "fifo"
            parent_run_id = tracker.start_study(spec.name, tags={**tags, Tags.RAY_SCHEDULER: scheduler_name},
                                                params=params, artifact=spec.path)
        if experiment_path is not None and record is None:
            experiment_path.mkdir(parents=True, exist_ok=True)
            (experiment_path / STUDY_RECORD).write_text(json.dumps(
                {"study": spec.name, "fingerprint": spec.fingerprint(), "trials": n_trials,
                 "experiment_id": experiment_id, "study_file": spec.path}, indent=2))
        ctx = RayContext(spec=spec, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                         experiment_id=experiment_id, threads=threads or max(1, int(request.get("cpu", 1.0))),
                         device=device or ("cpu" if request.get("gpu", 0.0) == 0 else None))
        trainable = tune.with_resources(tune.with_parameters(fuse_trainable, ctx=ctx),
                                        {"cpu": request.get("cpu", 1.0), "gpu": request.get("gpu", 0.0)})
        _DRIVER["tracking_uri"] = tracking_uri
        # MLflow is the record: Tune keeps its JSON results (restores, ResultGrid) but no CSV/TensorBoard copies,
        # which cost the driver time on every per-epoch report.
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        if restorable:
            tuner = tune.Tuner.restore(experiment_url, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            from ray.tune.logger import JsonLoggerCallback
            from ray.tune.search import ConcurrencyLimiter

            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=ConcurrencyLimiter(_make_searcher(spec), max_concurrent=concurrency),
                    scheduler=_make_scheduler(spec), num_samples=n_trials, time_budget_s=spec.timeout,
                    reuse_actors=True, trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=spec.name, storage_path=storage_path, verbose=1 if progress else 0,
                    callbacks=[_callback_class()(), JsonLoggerCallback()],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
                    failure_config=tune.FailureConfig(max_failures=1)),
            )
        status = "KILLED"
        try:
            results = tuner.fit()
            unfinished = len(results) - results.num_terminated - results.num_errors
            if unfinished == 0 and (len(results) >= n_trials or spec.timeout is not None):
                status = "FINISHED"
        finally:
            if parent_run_id:
                MlflowTracker(tracking_uri, experiment=spec.name).finish_study(parent_run_id, status)
        if status != "FINISHED":
            _mark_interrupted(results, tracking_uri)
            print(f"fuse-tune: the Ray experiment was interrupted; continue it with `fuse-tune resume "
                  f"{spec.path or 'STUDY.yaml'} --backend ray" + (f" --storage {storage}" if storage else "") + "`",
                  file=sys.stderr)
            raise KeyboardInterrupt
        for result in results:
            if result.error is not None:  # one line each, as the Optuna backend prints a failed trial
                lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
                print(f"fuse-tune: trial {result.config.get(TRIAL_KEY)} failed: "
                      f"{redact(lines[-1].strip()) if lines else type(result.error).__name__}", file=sys.stderr)
        _prune_checkpoints(results)
        return RaySummary(spec, results, experiment_url, tracking_uri, parent_run_id, nodes=len(_alive_nodes(ray)))
    finally:
        _DRIVER["tracking_uri"] = None
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
