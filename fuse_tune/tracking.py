"""Experiment tracking: a small tracker protocol, an MLflow adapter and a no-op tracker.

One *parent* run per study and one *child* run per trial. Children are created with an explicit
``mlflow.parentRunId`` tag through ``MlflowClient`` (never through MLflow's thread-local active-run
stack), so nesting is right from parallel worker processes and threads alike. A whole epoch's
metrics go in one ``log_batch`` call (an HTTP round trip costs ~100 ms against a tracking server).

The default tracking store is ``sqlite:///<absolute path>/mlflow.db`` in the working directory
(MLflow 3 refuses the old ``./mlruns`` file store by default); any tracking-server URL works.
Credentials in URLs are redacted (:func:`fuse_tune.records.redact`) before anything is printed, tagged or
logged. What the runs record is named in :mod:`fuse_tune.records`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fuse_tune.errors import UserError
from fuse_tune.records import (
    EXPERIMENT_KIND_MODEL_TRAINING,
    ROLE_STUDY,
    ROLE_TRIAL,
    STATE_FAILED,
    Tags,
    flatten_params,
    per_seed_key,
    redact,
    tag_equals,
)
from fuse_tune.servers import SERVER_CHECK_TIMEOUT, check_tracking_server

# redact and flatten_params live in fuse_tune.records; they stay importable from here for existing callers.
__all__ = ["Tracker", "TrialRun", "MlflowTracker", "NullTracker", "redact", "default_tracking_uri", "flatten_params",
           "versions", "end_trial_run", "fail_trial_run", "check_tracking_server", "SERVER_CHECK_TIMEOUT"]

def default_tracking_uri(directory: str | os.PathLike[str] | None = None) -> str:
    """``sqlite:///<absolute directory>/mlflow.db`` (the working directory by default)."""
    return f"sqlite:///{Path(directory or os.getcwd()).resolve() / 'mlflow.db'}"


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Versions worth recording with every run (Optuna 5 changed TPE defaults, for one)."""
    import importlib.metadata as metadata

    found = {}
    # tag name -> distribution; this project's tag keeps the name "fuse" (its distribution is fuse-optim)
    for package, distribution in (("fuse", "fuse-optim"), ("torch", "torch"), ("optuna", "optuna"),
                                  ("mlflow", "mlflow"), ("ray", "ray")):
        try:
            found[f"{Tags.VERSION_PREFIX}{package}"] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    found[Tags.GIT_COMMIT] = _git_commit()
    return found


class TrialRun(Protocol):
    run_id: str | None

    def log_epoch(self, seed: int, metrics: Mapping[str, float | None], step: int) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def finish(self, status: str) -> None: ...


def end_trial_run(run: TrialRun, state: str, status: str, error: str | None = None) -> None:
    """End a trial's run that did not complete: ``Tags.STATE`` = ``state`` (``pruned``, ``failed``), the error
    text if any, then the MLflow run status (``FINISHED``, ``FAILED``, ``KILLED``). Every backend, the
    comparisons and the Ray driver's callback end runs through this."""
    tags = {Tags.STATE: state}
    if error is not None:
        tags[Tags.ERROR] = error
    run.set_tags(tags)
    run.finish(status)


def fail_trial_run(run: TrialRun, exc: BaseException) -> None:
    """A trial that raised: ``failed`` with ``Type: message``; the run ``FAILED``, or ``KILLED`` for an interrupt
    (``KeyboardInterrupt``, ``SystemExit``)."""
    end_trial_run(run, STATE_FAILED, "FAILED" if isinstance(exc, Exception) else "KILLED",
                  f"{type(exc).__name__}: {exc}")


class Tracker(Protocol):
    def start_study(self, name: str, tags: Mapping[str, Any], params: Mapping[str, Any],
                    artifact: str | None = None) -> str | None: ...

    def start_trial(self, parent_run_id: str | None, name: str, params: Mapping[str, Any],
                    tags: Mapping[str, Any]) -> TrialRun: ...


class _NullRun:
    run_id = None

    def log_epoch(self, seed: int, metrics: Mapping[str, float | None], step: int) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class NullTracker:
    """Tracks nothing (tests, dry runs)."""

    def start_study(self, name, tags, params, artifact=None):
        return None

    def start_trial(self, parent_run_id, name, params, tags):
        return _NullRun()


class _MlflowRun:
    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_epoch(self, seed: int, metrics: Mapping[str, float | None], step: int) -> None:
        """One seed's epoch: ``<metric>/seed_<seed>`` (:func:`per_seed_key`) at ``step`` (the epoch), one HTTP call."""
        self.log_metrics({per_seed_key(k, seed): v for k, v in metrics.items() if v is not None}, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if value is not None]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000], synchronous=True)

    def log_series(self, series: Mapping[str, list[float]]) -> None:
        """Whole per-epoch series (step = index) in as few calls as possible."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(v), now, step) for key, values in series.items() for step, v in enumerate(values)]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))[:5000]) for k, v in tags.items()],
                              synchronous=True)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class MlflowTracker:
    """MLflow adapter: explicit run ids through ``MlflowClient``; mlflow is imported lazily."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "fuse") -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:  # pragma: no cover - depends on the install
            raise UserError("MLflow tracking needs the 'tuning' extra: pip install 'fuse[tuning]'") from None
        self.tracking_uri = tracking_uri or default_tracking_uri()
        check_tracking_server(self.tracking_uri)  # MLflow's client would retry a dead server for minutes
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_name = experiment
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if missing; marked as model training (MLflow 3's UI then opens it on the
        runs table, not on the GenAI traces page) unless it already says what it holds."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if Tags.MLFLOW_EXPERIMENT_KIND not in (found.tags or {}):  # made by an older fuse, or by hand
                self.client.set_experiment_tag(found.experiment_id, Tags.MLFLOW_EXPERIMENT_KIND,
                                               EXPERIMENT_KIND_MODEL_TRAINING)
            return found.experiment_id
        artifact_location = None
        if self.tracking_uri.startswith("sqlite:///"):
            database = Path(self.tracking_uri[len("sqlite:///"):])
            artifact_location = (database.parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(
                name, artifact_location=artifact_location,
                tags={Tags.MLFLOW_EXPERIMENT_KIND: EXPERIMENT_KIND_MODEL_TRAINING})
        except Exception:  # another worker created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def trial_run(self, run_id: str) -> _MlflowRun:
        """An existing child run, to end it (its id: an Optuna trial's ``OptunaAttrs.MLFLOW_RUN_ID`` attribute)."""
        return _MlflowRun(self.client, run_id)

    def find_study_run(self, study: str) -> str | None:
        query = f"{tag_equals(Tags.STUDY, study)} and {tag_equals(Tags.ROLE, ROLE_STUDY)}"
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def start_study(self, name: str, tags: Mapping[str, Any], params: Mapping[str, Any],
                    artifact: str | None = None) -> str:
        """The study's parent run: found again on resume (by tag), created otherwise."""
        run_id = self.find_study_run(name)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={Tags.STUDY: name, Tags.ROLE: ROLE_STUDY})
            run_id = run.info.run_id
            from mlflow.entities import Param

            flat = flatten_params(params)
            self.client.log_batch(run_id, params=[Param(k, redact(v)) for k, v in flat.items()], synchronous=True)
            if artifact is not None:
                self.client.log_artifact(run_id, artifact)
        else:
            self.client.update_run(run_id, status="RUNNING")
        _MlflowRun(self.client, run_id).set_tags(tags)
        return run_id

    def start_trial(self, parent_run_id: str | None, name: str, params: Mapping[str, Any],
                    tags: Mapping[str, Any]) -> _MlflowRun:
        from mlflow.entities import Param

        all_tags = {Tags.ROLE: ROLE_TRIAL, **{k: redact(str(v)) for k, v in tags.items()}}
        if parent_run_id is not None:
            all_tags[Tags.MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        flat = flatten_params(params)
        self.client.log_batch(run.info.run_id, params=[Param(k, redact(v)) for k, v in flat.items()],
                              synchronous=True)
        return _MlflowRun(self.client, run.info.run_id)

    def finish_study(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
