"""Optuna backend: a study file -> an Optuna study in durable storage, workers, MLflow runs.

Storage (``--storage`` or the study file's ``storage``; :mod:`fuse_tune.storage` resolves and opens it):

* default: Optuna's journal file ``./fuse-studies.log`` (``JournalFileBackend``), safe for several
  worker processes on one machine; ``journal:PATH`` names another file;
* ``sqlite:///...``: one process only (SQLite locks under parallel writers);
* any other SQLAlchemy URL (``postgresql://...``): many machines. Workers send heartbeats; a trial
  whose worker died is failed by the next worker and retried once with the same parameters.

Optuna's private API (per-trial reseeding of the samplers, trial attributes set through the storage) is
used through :mod:`fuse_tune.optuna_adapter` only.

Exactly ``trials`` trials finish (complete or pruned) however many workers share the study: a
worker starts a trial only while fewer than ``trials`` are finished or running, and a trial that
loses a race (its number comes after ``trials`` live ones) is marked failed without running.
Re-running the same command resumes the study; a study whose search space changed is refused.
A worker killed with SIGKILL leaves a RUNNING trial behind: on one machine the next run sees that
the worker's process is gone, marks the trial failed and retries its parameters.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fuse_tune.errors import UserError
from fuse_tune.optuna_adapter import (
    _unpickle_trial_seeded,  # noqa: F401 - named by samplers pickled before it moved
    fail_trial,
    set_trial_system_attr,
    trial_seeded,
)
from fuse_tune.records import STATE_FAILED, STATE_PRUNED, OptunaAttrs, redact
from fuse_tune.spec import SpecError, StudySpec
from fuse_tune.storage import DEFAULT_JOURNAL, open_storage, resolve_storage_url
from fuse_tune.storage import import_optuna as _optuna
from fuse_tune.summary import StudySummaryBase, TrialRow
from fuse_tune.tracking import MlflowTracker, NullTracker, default_tracking_uri, end_trial_run, fail_trial_run, versions
from fuse_tune.trial import TrialOutcome, log_outcome, resolved, run_trial, start_study_run, suggest, trial_tags

__all__ = ["StudyMismatch", "open_storage", "resolve_storage_url", "prepare_study", "run_study", "StudySummary",
           "DEFAULT_JOURNAL"]

#: a worker stops (exit status 2) after this many failed trials in a row: a setting that always fails
#: (a model that cannot be built, a data set that cannot be read) must not spin forever
MAX_FAILURES_IN_A_ROW = 5


class StudyMismatch(SpecError):
    """The stored study was created from a different search space."""


def make_sampler(spec: StudySpec, worker_index: int = 0) -> Any:
    """The study's sampler; with a seed, each trial's draws depend on (seed, trial number) only, not on the
    worker (``worker_index`` is kept for callers), so workers and resumed runs never replay each other."""
    optuna = _optuna()
    options = spec.sampler
    seed = options.get("seed")
    name = options["name"]
    if name == "tpe":
        return trial_seeded(optuna.samplers.TPESampler)(seed=seed,
                                                         n_startup_trials=options.get("n_startup_trials", 10))
    if name == "random":
        return trial_seeded(optuna.samplers.RandomSampler)(seed=seed)
    if name == "qmc":
        return trial_seeded(optuna.samplers.QMCSampler)(seed=seed, warn_independent_sampling=False)
    if name == "cmaes":
        return trial_seeded(optuna.samplers.CmaEsSampler)(seed=seed, warn_independent_sampling=False)
    grid = {p.name: list(p.choices) for p in spec.search}
    return trial_seeded(optuna.samplers.GridSampler)(grid, seed=seed)


def make_pruner(spec: StudySpec) -> Any:
    optuna = _optuna()
    options = spec.pruner
    if options["name"] == "none" or spec.objective.cost is not None:
        return optuna.pruners.NopPruner()
    if options["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=options.get("n_startup_trials", 4),
                                           n_warmup_steps=options.get("n_warmup_steps", 1))
    if options["name"] == "percentile":
        return optuna.pruners.PercentilePruner(options.get("percentile", 25.0),
                                               n_startup_trials=options.get("n_startup_trials", 4),
                                               n_warmup_steps=options.get("n_warmup_steps", 1))
    return optuna.pruners.HyperbandPruner(min_resource=options.get("min_resource", 1),
                                          max_resource=spec.epochs,
                                          reduction_factor=options.get("reduction_factor", 3))


def prepare_study(spec: StudySpec, storage_url: str, *, must_exist: bool = False) -> Any:
    """Create the study, or load it after checking it was made from the same search space."""
    spec = resolved(spec)
    optuna = _optuna()
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec),
                                  pruner=make_pruner(spec))
    except KeyError:
        if must_exist:
            raise UserError(f"no study named {spec.name!r} in {redact(storage_url)}; start it with "
                             f"`fuse-tune run {spec.path or 'STUDY.yaml'}`") from None
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=spec.objective.directions,
                                    sampler=make_sampler(spec), pruner=make_pruner(spec), load_if_exists=True)
        if OptunaAttrs.FINGERPRINT not in study.user_attrs:
            _tag_study(study, spec)
        return study
    stored = study.user_attrs.get(OptunaAttrs.FINGERPRINT)
    for _ in range(50):  # a worker started at the same moment may have created it and not tagged it yet
        if stored is not None:
            break
        time.sleep(0.1)
        stored = study.user_attrs.get(OptunaAttrs.FINGERPRINT)
    if stored is None and not study.get_trials(deepcopy=False):  # its creator died before tagging it
        _tag_study(study, spec)
        return study
    if stored != spec.fingerprint():
        raise StudyMismatch(
            f"study {spec.name!r} in {redact(storage_url)} was created from a different search space or settings "
            f"(fingerprint {stored} != {spec.fingerprint()}); give the study a new name, or delete it with "
            f"`optuna delete-study --study-name {spec.name} --storage ...`")
    return study


def _tag_study(study: Any, spec: StudySpec) -> None:
    study.set_user_attr(OptunaAttrs.FINGERPRINT, spec.fingerprint())
    study.set_user_attr(OptunaAttrs.VERSIONS, versions())
    study.set_user_attr(OptunaAttrs.OBJECTIVE, spec.objective.metric)


# ------------------------------------------------------------------ workers


def _states():
    from optuna.trial import TrialState

    return TrialState


def _fail_dead_local_trials(study: Any, tracker: Any = None, *, interrupted: bool = False) -> int:
    """RUNNING trials whose worker process on this host is gone: mark failed and retry their parameters, and end
    their MLflow child runs (``tracker``; none without tracking) KILLED with the ``failed`` state.

    ``interrupted=True`` (after Ctrl-C, every worker of this run gone or stopping): this process's own trials
    count as dead too, and nothing is queued again (an interrupted trial was stopped, not lost)."""
    TrialState = _states()
    host = socket.gethostname()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.system_attrs
        pid = attrs.get(OptunaAttrs.PID)
        if attrs.get(OptunaAttrs.HOST) != host or pid is None:
            continue
        if not (interrupted and int(pid) == os.getpid()) and _alive(int(pid)):
            continue
        reason = "interrupted" if interrupted else f"worker pid {pid} died"
        try:
            fail_trial(study, trial, OptunaAttrs.FAIL_REASON, reason)
        except Exception:  # another worker got there first
            continue
        if not interrupted and OptunaAttrs.RETRY_OF not in trial.user_attrs:  # enqueue_trial: a user attribute
            study.enqueue_trial(trial.params, user_attrs={OptunaAttrs.RETRY_OF: trial.number})
        _end_killed_run(tracker, attrs.get(OptunaAttrs.MLFLOW_RUN_ID), reason)
        failed += 1
    _end_runs_of_failed_trials(study, tracker)
    return failed


#: (study, trial number) of failed trials whose MLflow run this process has already seen ended
_RUNS_SEEN_ENDED: set[tuple[str, int]] = set()


def _end_runs_of_failed_trials(study: Any, tracker: Any) -> None:
    """End the still-RUNNING MLflow run of every FAIL trial (``failed``, ``KILLED``): trials another host's worker
    held when it died, which Optuna's heartbeat failed (PostgreSQL storage). A live worker ends its trial's run
    before it tells Optuna the trial failed, so a FAIL trial's run that still runs has no one left to end it."""
    if tracker is None or not hasattr(tracker, "trial_run"):
        return
    for trial in study.get_trials(deepcopy=False, states=(_states().FAIL,)):
        key = (study.study_name, trial.number)
        run_id = trial.system_attrs.get(OptunaAttrs.MLFLOW_RUN_ID)
        if run_id is None or key in _RUNS_SEEN_ENDED:
            continue
        _end_killed_run(tracker, run_id, trial.system_attrs.get(OptunaAttrs.FAIL_REASON) or
                        "failed (its worker stopped sending heartbeats)")
        _RUNS_SEEN_ENDED.add(key)


def _end_killed_run(tracker: Any, run_id: str | None, reason: str) -> None:
    """End a dead or interrupted trial's MLflow child run if it is still RUNNING: ``failed``, ``KILLED``."""
    if tracker is None or run_id is None or not hasattr(tracker, "trial_run"):
        return
    try:
        if tracker.client.get_run(run_id).info.status != "RUNNING":
            return  # the worker ended it itself before it stopped
        end_trial_run(tracker.trial_run(run_id), STATE_FAILED, "KILLED", reason)
    except Exception as exc:  # a run in another tracking store (a resume with another --mlflow-uri), ...
        print(f"fuse-tune: could not end MLflow run {run_id} of a {reason.split()[0]} trial: "
              f"{type(exc).__name__}: {redact(str(exc).splitlines()[0] if str(exc) else '')}", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed child not yet reaped) is dead for our purposes
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _count(study: Any) -> tuple[int, int]:
    TrialState = _states()
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return finished, running


class _Surplus(Exception):
    """This trial lost the race for the last slot of the budget."""


_SURPLUS_TRIALS: set[int] = set()


class _QuietSurplus(logging.Filter):
    """Optuna logs every failed trial as two warnings, the first with a traceback: for a trial that only lost the
    race for the last slot (:class:`_Surplus`) that is noise, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for number in list(_SURPLUS_TRIALS):
            if message.startswith(f"Trial {number} failed "):
                if message.startswith(f"Trial {number} failed with value"):  # the last of the two
                    _SURPLUS_TRIALS.discard(number)
                return False
        return True


def _quiet_surplus_logs() -> None:
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _QuietSurplus) for f in logger.filters):
        logger.addFilter(_QuietSurplus())


@dataclass
class WorkerConfig:
    spec: StudySpec
    storage_url: str
    tracking_uri: str | None
    parent_run_id: str | None
    n_trials: int
    timeout: float | None
    worker_index: int
    threads: int | None
    device: str | None


def _objective_factory(spec: StudySpec, config: WorkerConfig, tracker: Any, study: Any) -> Callable[[Any], Any]:
    optuna = _optuna()
    TrialState = _states()
    multi = spec.objective.cost is not None

    def objective(trial: Any) -> Any:
        # Race guard: only the first n_trials live trials (not failed) run.
        earlier = [t for t in study.get_trials(deepcopy=False)
                   if t.number < trial.number and t.state != TrialState.FAIL]
        if len(earlier) >= config.n_trials:
            trial.set_user_attr(OptunaAttrs.SURPLUS, True)
            _SURPLUS_TRIALS.add(trial.number)
            raise _Surplus()
        set_trial_system_attr(study, trial, OptunaAttrs.PID, os.getpid())
        set_trial_system_attr(study, trial, OptunaAttrs.HOST, socket.gethostname())
        sampled = suggest(trial, spec.search)
        settings = spec.configuration(sampled)
        run = tracker.start_trial(config.parent_run_id, f"{spec.name}-trial-{trial.number}", settings,
                                  trial_tags(spec, settings, trial.number, "optuna"))
        if run.run_id is not None:
            set_trial_system_attr(study, trial, OptunaAttrs.MLFLOW_RUN_ID, run.run_id)

        def report(step: int, value: float) -> None:
            if multi or not math.isfinite(value):
                return
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

        try:
            outcome = run_trial(spec, sampled, report=report, run=run, threads=config.threads, device=config.device)
        except optuna.TrialPruned:
            end_trial_run(run, STATE_PRUNED, "FINISHED")
            raise
        except BaseException as exc:
            fail_trial_run(run, exc)
            raise
        _record_outcome(trial, run, outcome, spec)
        run.finish("FINISHED")
        return outcome.values(multi)

    return objective


def _record_outcome(trial: Any, run: Any, outcome: TrialOutcome, spec: StudySpec) -> None:
    trial.set_user_attr(OptunaAttrs.VALUE_STD, outcome.std)
    trial.set_user_attr(OptunaAttrs.PER_SEED, outcome.per_seed)
    trial.set_user_attr(OptunaAttrs.SWITCH_EPOCHS, outcome.switch_epochs)
    trial.set_user_attr(OptunaAttrs.EPOCHS_RUN, outcome.epochs_run)
    if outcome.cost is not None:
        trial.set_user_attr(OptunaAttrs.COST, outcome.cost)
    log_outcome(run, outcome, spec)  # shared with the Ray backend: identical tags and metrics


def work(config: WorkerConfig, on_trial: Callable[[], None] | None = None) -> int:
    """One worker: run trials until the study has ``n_trials`` finished ones (or the timeout)."""
    optuna = _optuna()
    _quiet_surplus_logs()
    spec = config.spec  # checked, its objective resolved, by the driver before any worker started
    storage = open_storage(config.storage_url)
    study = optuna.load_study(study_name=spec.name, storage=storage,
                              sampler=make_sampler(spec, config.worker_index), pruner=make_pruner(spec))
    tracker = MlflowTracker(config.tracking_uri, experiment=spec.name) if config.tracking_uri else NullTracker()
    objective = _objective_factory(spec, config, tracker, study)
    started = time.monotonic()
    ran = 0
    failures_in_a_row = 0
    while True:
        _fail_dead_local_trials(study, tracker)
        finished, running = _count(study)
        if finished + running >= config.n_trials:
            break
        if config.timeout is not None and time.monotonic() - started >= config.timeout:
            break
        try:
            study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)
        except _Surplus:
            break
        except (SpecError, FileNotFoundError):
            raise
        except Exception as exc:  # one bad configuration must not end the study: the trial is FAILED
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            print(f"fuse-tune: trial failed: {type(exc).__name__}: {redact(first_line)}",
                  file=sys.stderr)
            failures_in_a_row += 1
            if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise UserError(f"{MAX_FAILURES_IN_A_ROW} trials in a row failed; the last with "
                                 f"{type(exc).__name__}: {redact(first_line)}") from None
        else:
            failures_in_a_row = 0
        ran += 1
        if on_trial is not None:
            on_trial()
    return ran


def _worker_main(config: WorkerConfig) -> None:
    """Entry point of a spawned worker process."""
    try:
        if config.threads is not None:
            import torch

            torch.set_num_threads(config.threads)
        work(config)
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as exc:  # one line, exit 2, as fuse-tune does; anything else is a bug: its traceback, exit 1
        print(f"fuse-tune: error: {redact(str(exc).splitlines()[0])}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------ driver


@dataclass
class StudySummary(StudySummaryBase):
    """What an Optuna study ended with (:class:`fuse_tune.summary.StudySummaryBase`); ``study`` is the Optuna
    study."""

    study: Any
    storage_url: str
    tracking_uri: str | None
    parent_run_id: str | None

    @property
    def maximize(self) -> bool:
        return self.study.directions[0].name == "MAXIMIZE"

    def trial_rows(self) -> list[TrialRow]:
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            complete = t.state.name == "COMPLETE"
            rows.append(TrialRow(t.number, t.state.name, t.values[0] if complete else None,
                                 t.user_attrs.get(OptunaAttrs.VALUE_STD), t.user_attrs.get(OptunaAttrs.COST),
                                 t.user_attrs.get(OptunaAttrs.SWITCH_EPOCHS), t.params))
        return rows

    def locations(self) -> list[str]:
        url = self.storage_url
        dashboard = url[len("journal:"):] if url.startswith("journal:") else redact(url)
        return [f"storage: {redact(url)}", *self.mlflow_lines(), f"browse the study: optuna-dashboard {dashboard}"]


def run_study(spec: StudySpec, *, n_trials: int | None = None, n_jobs: int = 1, storage: str | None = None,
              tracking_uri: str | None = "default", must_exist: bool = False, threads: int | None = None,
              device: str | None = None, progress: bool = True) -> StudySummary:
    """Run (or resume) a study to ``n_trials`` finished trials with ``n_jobs`` worker processes."""
    spec = resolved(spec)
    if n_jobs < 1:
        raise UserError(f"--n-jobs must be >= 1, got {n_jobs}")
    n_trials = n_trials if n_trials is not None else spec.trials
    if n_trials < 1:
        raise UserError(f"--n-trials must be >= 1, got {n_trials}")
    storage_url = resolve_storage_url(storage or spec.storage)
    if storage_url.startswith("sqlite:") and n_jobs > 1:
        raise UserError("storage: SQLite locks under parallel writers; with --n-jobs > 1 use the default journal "
                         "file or a PostgreSQL URL")
    study = prepare_study(spec, storage_url, must_exist=must_exist)
    if tracking_uri == "default":
        tracking_uri = default_tracking_uri()
    tracker = MlflowTracker(tracking_uri, experiment=spec.name) if tracking_uri else None
    _fail_dead_local_trials(study, tracker)
    parent_run_id = start_study_run(spec, tracking_uri, n_trials, "optuna", storage_url)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
    base = WorkerConfig(spec=spec, storage_url=storage_url, tracking_uri=tracking_uri,
                        parent_run_id=parent_run_id, n_trials=n_trials, timeout=spec.timeout, worker_index=0,
                        threads=threads, device=device)
    from tqdm import tqdm

    bar = tqdm(total=n_trials, initial=min(_count(study)[0], n_trials), desc=spec.name, unit="trial",
               file=sys.stderr, disable=not progress or None)
    status = "FINISHED"
    try:
        if n_jobs == 1:
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                work(base, on_trial=lambda: bar.update(min(_count(study)[0], n_trials) - bar.n))
            finally:
                torch.set_num_threads(previous)
        else:
            _run_processes(base, n_jobs, study, bar, n_trials)
    except BaseException as exc:
        status = "KILLED"
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C: no trial of this run may stay RUNNING
            _fail_dead_local_trials(study, tracker, interrupted=True)
        raise
    finally:
        bar.update(max(0, min(_count(study)[0], n_trials) - bar.n))
        bar.close()
        if tracker is not None and parent_run_id:
            tracker.finish_study(parent_run_id, status)
    return StudySummary(study, storage_url, tracking_uri, parent_run_id)


#: seconds interrupted workers get to record their own trials (failed in Optuna, KILLED in MLflow) before SIGTERM
INTERRUPT_GRACE = 10.0


def _stop_workers(processes: list[Any]) -> None:
    """After Ctrl-C. In a terminal the SIGINT reached every worker too (one process group): each fails its trial
    in Optuna and ends its MLflow run as it unwinds, so wait for that (:data:`INTERRUPT_GRACE` seconds, or until a
    second Ctrl-C), then SIGTERM whatever still runs (a worker the signal did not reach: ``kill -INT`` of this
    process alone). The caller fails what a SIGTERM cut short (:func:`_fail_dead_local_trials`)."""
    deadline = time.monotonic() + INTERRUPT_GRACE
    try:
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)


def _run_processes(base: WorkerConfig, n_jobs: int, study: Any, bar: Any, n_trials: int) -> None:
    context = multiprocessing.get_context("spawn")
    processes = []
    for index in range(n_jobs):
        config = WorkerConfig(**{**base.__dict__, "worker_index": index})
        process = context.Process(target=_worker_main, args=(config,), name=f"fuse-worker-{index}")
        process.start()
        processes.append(process)
    try:
        while any(p.is_alive() for p in processes):
            time.sleep(1.0)
            bar.update(max(0, min(_count(study)[0], n_trials) - bar.n))
    except KeyboardInterrupt:
        _stop_workers(processes)
        raise
    for process in processes:
        process.join()
    codes = [p.exitcode for p in processes]
    if any(code == 2 for code in codes):
        raise UserError("a worker stopped on an error (see the line above)")
    if any(code not in (0, None) for code in codes):
        raise RuntimeError(f"worker processes exited with codes {codes}")
