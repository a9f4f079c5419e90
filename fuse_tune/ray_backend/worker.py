"""The Ray backend's trial loop, the part that runs inside a Ray worker: the trainable and what it needs.

:func:`fuse_trainable` is the Tune function trainable; :class:`TrialLoop` is its body apart from Tune (one
configuration on every seed through :class:`fuse_tune.trial.SeedRuns`, a checkpoint after every epoch, the
trial's MLflow child run), so it is tested without Ray.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuse_tune.ray_backend.resources import import_ray
from fuse_tune.records import (
    STATE_FAILED,
    STATE_PRUNED,
    Metrics,
    Tags,
    encode_switch_epochs,
    flatten_params,
    per_seed_key,
    redact,
    tag_equals,
)
from fuse_tune.spec import SpecError, StudySpec
from fuse_tune.tracking import MlflowTracker, _MlflowRun, end_trial_run, fail_trial_run
from fuse_tune.train import EpochMetrics
from fuse_tune.trial import SeedRuns, _loggable, cost_of, log_outcome, trial_tags

__all__ = ["RayContext", "TrialLoop", "fuse_trainable", "load_checkpoint", "CHECKPOINT_FILE", "CHECKPOINT_FORMAT",
           "TRIAL_KEY"]

CHECKPOINT_FILE = "fuse_trial.pt"
TRIAL_KEY = "fuse_trial"  # the Optuna trial number, added to each configuration by the searcher
CHECKPOINT_FORMAT = 3  # 2: every seed's state in one payload (the seeds advance together); 3: validation split


@dataclass(frozen=True)
class RayContext:
    """What every trial needs from the driver (absolute paths only); shipped with ``tune.with_parameters``."""

    spec: StudySpec
    tracking_uri: str | None
    parent_run_id: str | None
    experiment_id: str
    threads: int = 1
    device: str | None = None
    workload: Any = None  # a builder registered in the driver's process only (a notebook's): shipped by value


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
            end_trial_run(_MlflowRun(self.client, run.info.run_id), STATE_FAILED, "KILLED",
                          "superseded: the driver stopped before Ray recorded this trial, and its number was drawn "
                          "again")
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
        fail_trial_run(self.run, exc)


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
            result["cost"] = float(statistics.fmean(cost_of(m, spec.objective.cost) for m in metrics))
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
    ray, tune = import_ray()
    if ctx.workload is not None:
        from fuse_tune.workloads import register_workload

        register_workload(ctx.workload.name, ctx.workload.build)
    loop = TrialLoop(ctx, config, trial_id=tune.get_context().get_trial_id(),
                     node_id=ray.get_runtime_context().get_node_id(), restored=load_checkpoint(tune.get_checkpoint()))
    loop.run(lambda metrics, directory: tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory)))
