"""MLflow runs of a study -> one tidy, long pandas table (one row per trial x seed x epoch x metric).

What ``fuse-tune run`` logs is named in :mod:`fuse_tune.records` (the trackers write through it, this module
reads through it): the MLflow experiment is named after the study; its *parent* run is tagged
``Tags.ROLE = study`` and holds the study's settings as params (``StudyParams.OBJECTIVE``, ``SEEDS``, ...);
each trial is a *child* run tagged ``Tags.ROLE = trial`` and ``mlflow.parentRunId``, with the tags
``Tags.TRIAL``, ``CRITERION``, ``STATE`` (complete | pruned | failed), ``SWITCH_EPOCH`` (``2,none``: one entry
per seed of ``Tags.SEEDS``, :func:`fuse_tune.records.decode_switch_epochs`), ``WORKLOAD``, ``OPTIMIZER``; its
params are the flattened trial settings (``lr``, ``switch.criterion``, ...) and its per-epoch metrics
``<metric>/seed_<s>`` (:func:`fuse_tune.records.per_seed_key`) with ``step`` = the epoch.

Reading is split from shaping, as Optuna's plots split data from drawing: :func:`read_experiment` does the
I/O through ``MlflowClient`` (``search_runs`` and ``get_metric_history``) and returns plain data
(:class:`StudyRuns`); :func:`tidy` and :func:`trial_table` are pure functions of it.

The tidy table (:data:`COLUMNS`, then one ``param.<name>`` column per trial parameter):

========================  ====================================================================================
``study``                 the study (= MLflow experiment) name
``trial``                 the Optuna trial number (int)
``run_id``                the trial's MLflow run id
``variant``               a readable name, ``fuse_pv[switch.criterion=grad_norm,switch.zeta=0.01]``: the
                          optimizer and the parameters that differ between the study's trials (3 significant
                          digits; more when 3 would make two different configurations look alike)
``workload``              the ``Tags.WORKLOAD`` tag
``optimizer``             the ``Tags.OPTIMIZER`` tag
``objective``             the study's objective metric (the parent run's ``objective`` param)
``seed``                  the training seed (int)
``epoch``                 the MLflow step: the 0-based epoch whose end the value measures (int)
``metric``                ``train_loss``, ``test_accuracy``, ... (the part of the key before ``/seed_``)
``value``                 the logged value (float), exactly as MLflow holds it
``phase``                 the optimizer phase the epoch ended in: ``adam``, else the second phase's name
                          (``lbfgs`` for fuse_pv, ``sgd`` for adam_sgd, ``second`` otherwise); from the
                          ``phase_second`` metric, None where that was not logged
``switch_epoch``          epochs completed when this (trial, seed) switched (float; NaN: never switched)
``criterion``             the ``Tags.CRITERION`` tag (the switch criterion; "" for optimizers without one)
``state``                 ``complete``, ``pruned``, ``failed``, or ``running`` / ``unknown`` without a tag
``param.<name>``          each trial parameter; numbers as floats, anything else as text
========================  ====================================================================================

Only per-seed, per-epoch metrics become rows: the per-epoch means over seeds that are also logged under the
plain metric names are derivable from them, and the per-trial summaries (``objective.<metric>``,
``epochs_run``, ...) are in :func:`trial_table`. A pruned trial has rows up to the epoch it was pruned at
(often for its first seed only).

mlflow and pandas are imported here, never torch (:mod:`fuse_tune.records` is standard library only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from fuse_tune.errors import UserError
from fuse_tune.records import (
    FIRST_PHASE,
    PER_SEED_METRICS,
    ROLE_STUDY,
    ROLE_TRIAL,
    STATE_FAILED,
    SWITCH_PARAM_PREFIX,
    THETA_PARAM_PREFIX,
    Metrics,
    StudyParams,
    Tags,
    decode_switch_epochs,
    objective_key,
    objective_std_key,
    parse_per_seed_key,
    per_seed_key,
    redact,
    second_phase_name,
    tag_equals,
)
from fuse_tune.records import direction as objective_direction

__all__ = ["COLUMNS", "PER_SEED_METRICS", "NoRuns", "TrialRun", "StudyRuns", "read_experiment", "read_experiments",
           "tidy", "trial_table", "variant_name", "objective_direction", "second_phase_name"]

#: the tidy table's fixed columns, in order (``param.<name>`` columns follow)
COLUMNS = ("study", "trial", "run_id", "variant", "workload", "optimizer", "objective", "seed", "epoch", "metric",
           "value", "phase", "switch_epoch", "criterion", "state")

# PER_SEED_METRICS (the per-epoch metrics logged per seed), objective_direction (maximize | minimize of a metric)
# and second_phase_name (what phase_second = 1 means) come from fuse_tune.records and are exported from here too.

_NO_STATE = {"RUNNING": "running", "SCHEDULED": "running", "FAILED": STATE_FAILED, "KILLED": STATE_FAILED}


class NoRuns(UserError):
    """The experiment does not exist, or holds no trial runs."""


@dataclass
class TrialRun:
    """One trial's MLflow child run as plain data.

    ``history`` maps each per-seed key (``train_loss/seed_0``) to its ``(step, value)`` entries in the order
    MLflow returned them; ``summary`` holds the latest value of every other metric (``objective.*``, ...).
    """

    run_id: str
    trial: int
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    summary: dict[str, float]
    history: dict[str, list[tuple[int, float]]]

    @property
    def state(self) -> str:
        if Tags.STATE in self.tags:
            return self.tags[Tags.STATE]
        return _NO_STATE.get(self.status, "unknown")

    @property
    def seeds(self) -> list[int]:
        """Seeds from the ``Tags.SEEDS`` tag, else those with logged metrics."""
        text = self.tags.get(Tags.SEEDS, "")
        if text.strip():
            return [int(s) for s in text.split(",") if s.strip()]
        return sorted({parsed[1] for key in self.history if (parsed := parse_per_seed_key(key))})

    def switch_epochs(self) -> dict[int, float]:
        """Seed -> epochs completed at the switch (NaN: none). From the ``Tags.SWITCH_EPOCH`` tag of a finished
        trial, else from the last logged ``switch_epoch/seed_<s>`` value (pruned and failed trials)."""
        seeds = self.seeds
        found: dict[int, float] = {seed: math.nan for seed in seeds}
        epochs = decode_switch_epochs(self.tags.get(Tags.SWITCH_EPOCH))
        if epochs and len(epochs) == len(seeds):
            for seed, epoch in zip(seeds, epochs, strict=True):
                found[seed] = math.nan if epoch is None else float(epoch)
            return found
        for seed in seeds:
            entries = self.history.get(per_seed_key(Metrics.SWITCH_EPOCH, seed))
            if entries:
                found[seed] = float(max(entries, key=lambda e: e[0])[1])
        return found


@dataclass
class StudyRuns:
    """An experiment's parent run (params and tags) and its trial runs, as read from MLflow."""

    experiment: str
    experiment_id: str
    tracking_uri: str
    parent_run_id: str | None
    parent_tags: dict[str, str] = field(default_factory=dict)
    parent_params: dict[str, str] = field(default_factory=dict)
    trials: list[TrialRun] = field(default_factory=list)

    @property
    def study(self) -> str:
        return self.parent_tags.get(Tags.STUDY) or self.experiment

    @property
    def objective(self) -> str | None:
        """The study's objective metric (the parent's ``StudyParams.OBJECTIVE`` param)."""
        return self.parent_params.get(StudyParams.OBJECTIVE)

    @property
    def direction(self) -> str:
        """The objective's direction as the study recorded it (older studies: guessed from its name)."""
        return self.parent_params.get(StudyParams.OBJECTIVE_DIRECTION) or objective_direction(self.objective)

    @property
    def storage(self) -> str | None:
        """The Optuna storage URL the study was run with (``Tags.STORAGE`` tag; passwords redacted)."""
        return self.parent_tags.get(Tags.STORAGE)


# ------------------------------------------------------------------ reading (I/O)


def _client(tracking_uri: str | None, client: Any | None) -> Any:
    if client is not None:
        return client
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:  # pragma: no cover - depends on the install
        raise UserError("dashboards read MLflow runs: pip install 'fuse[tuning]'") from None
    return MlflowClient(tracking_uri=tracking_uri)


def _search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def read_experiment(experiment: str, tracking_uri: str | None = None, *, client: Any | None = None) -> StudyRuns:
    """Read the study runs of MLflow experiment ``experiment`` (the study name).

    One ``search_runs`` for the parent, one (paged) for the trials, and one ``get_metric_history`` per
    per-seed metric key of every trial (in 4 threads against an HTTP tracking server). Raises
    :class:`NoRuns` (one line) when the experiment does not exist or has no trial runs.
    """
    client = _client(tracking_uri, client)
    uri = str(getattr(client, "tracking_uri", None) or tracking_uri or "")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise NoRuns(f"no MLflow experiment named {experiment!r} in {redact(uri)}")
    parents = _search_all(client, found.experiment_id, tag_equals(Tags.ROLE, ROLE_STUDY))
    trials = _search_all(client, found.experiment_id, tag_equals(Tags.ROLE, ROLE_TRIAL))
    if not trials:
        raise NoRuns(f"experiment {experiment!r} has no trial runs in {redact(uri)}")
    parent = parents[0] if parents else None
    keys = [(run.info.run_id, key) for run in trials for key in run.data.metrics if parse_per_seed_key(key)]

    def history(item: tuple[str, str]) -> list[tuple[int, float]]:
        return [(int(m.step), float(m.value)) for m in client.get_metric_history(item[0], item[1])]

    threads = 4 if uri.startswith(("http://", "https://")) else 1
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            histories = list(pool.map(history, keys))
    else:
        histories = [history(item) for item in keys]
    by_run: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for (run_id, key), entries in zip(keys, histories, strict=True):
        by_run.setdefault(run_id, {})[key] = entries
    trial_runs = []
    for run in trials:
        tags = dict(run.data.tags)
        trial_runs.append(TrialRun(
            run_id=run.info.run_id, trial=int(tags.get(Tags.TRIAL, -1)), status=run.info.status, tags=tags,
            params=dict(run.data.params),
            summary={k: float(v) for k, v in run.data.metrics.items() if not parse_per_seed_key(k)},
            history=by_run.get(run.info.run_id, {})))
    trial_runs.sort(key=lambda t: (t.trial, t.run_id))
    return StudyRuns(experiment=experiment, experiment_id=found.experiment_id, tracking_uri=uri,
                     parent_run_id=parent.info.run_id if parent else None,
                     parent_tags=dict(parent.data.tags) if parent else {},
                     parent_params=dict(parent.data.params) if parent else {}, trials=trial_runs)


def read_experiments(experiments: Sequence[str], tracking_uri: str | None = None, *,
                     client: Any | None = None) -> list[StudyRuns]:
    """:func:`read_experiment` for each name (one client)."""
    client = _client(tracking_uri, client)
    return [read_experiment(name, tracking_uri, client=client) for name in experiments]


# ------------------------------------------------------------------ shaping (pure)


def _format(value: str, digits: int | None) -> str:
    if digits is None:
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if math.isfinite(number) and number == int(number) and abs(number) < 1e15:
        return str(int(number))
    return f"{number:.{digits}g}"


_FIRST_PREFIXES = (SWITCH_PARAM_PREFIX, THETA_PARAM_PREFIX)  # the settings a variant's name shows first


def _key_order(name: str) -> tuple[int, str]:
    return (0 if name.startswith(_FIRST_PREFIXES) else 1, name)


def variant_name(optimizer: str, params: Mapping[str, str], keys: Iterable[str] | None = None,
                 digits: int | None = 3) -> str:
    """``fuse_pv[switch.criterion=grad_norm,switch.zeta=0.01]``: the optimizer and ``keys`` of ``params``
    (all by default; switch and theta settings first, then by name), numbers to ``digits`` significant
    digits (``None``: as logged). No keys: the optimizer alone."""
    names = sorted((k for k in (params if keys is None else keys) if k in params), key=_key_order)
    if not names:
        return optimizer
    return f"{optimizer}[{','.join(f'{k}={_format(params[k], digits)}' for k in names)}]"


def _variants(trials: Sequence[TrialRun]) -> dict[str, str]:
    """run id -> variant name, naming the parameters that differ between the trials."""
    all_keys = sorted({k for t in trials for k in t.params})
    varying = [k for k in all_keys if len({t.params.get(k) for t in trials}) > 1]
    if not varying:  # one trial, or identical ones: name the switch / theta settings if any
        varying = [k for k in all_keys if k.startswith(_FIRST_PREFIXES)]
    configurations = {tuple(t.params.get(k) for k in varying) for t in trials}
    for digits in (3, 6, None):
        names = {t.run_id: variant_name(t.tags.get(Tags.OPTIMIZER, "?"), t.params, varying, digits)
                 for t in trials}
        if len(set(names.values())) >= len(configurations):
            return names
    return names


def _numeric_params(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """``param.*`` columns whose every value reads as a number become floats; others stay text."""
    for column in columns:
        values = frame[column]
        present = values.dropna()
        try:
            numbers = present.astype(float)
        except (TypeError, ValueError):
            continue
        if len(numbers):
            frame[column] = values.astype(float)
    return frame


def tidy(studies: StudyRuns | Sequence[StudyRuns]) -> pd.DataFrame:
    """One row per (trial, seed, epoch, metric) of the per-seed metrics; see the module docstring."""
    if isinstance(studies, StudyRuns):
        studies = [studies]
    records: list[tuple] = []
    param_rows: list[dict[str, str]] = []
    for study in studies:
        variants = _variants(study.trials)
        for trial in study.trials:
            optimizer = trial.tags.get(Tags.OPTIMIZER, "")
            second = second_phase_name(optimizer)
            switch = trial.switch_epochs()
            phases: dict[tuple[int, int], str] = {}
            for key, entries in trial.history.items():
                parsed = parse_per_seed_key(key)
                if parsed and parsed[0] == Metrics.PHASE_SECOND:
                    for step, value in entries:
                        phases[(parsed[1], step)] = FIRST_PHASE if value == 0 else second
            params = {f"param.{k}": v for k, v in trial.params.items()}
            for key in sorted(trial.history):
                parsed = parse_per_seed_key(key)
                if not parsed:
                    continue
                metric, seed = parsed
                for step, value in trial.history[key]:
                    records.append((study.study, trial.trial, trial.run_id, variants[trial.run_id],
                                    trial.tags.get(Tags.WORKLOAD, ""), optimizer, study.objective, seed, step,
                                    metric, value, phases.get((seed, step)), switch.get(seed, math.nan),
                                    trial.tags.get(Tags.CRITERION, ""), trial.state))
                    param_rows.append(params)
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    params = pd.DataFrame.from_records(param_rows, index=frame.index) if param_rows else pd.DataFrame(index=frame.index)
    param_columns = sorted(params.columns)
    frame = pd.concat([frame, params[param_columns]], axis=1)
    frame = frame.astype({"trial": "int64", "seed": "int64", "epoch": "int64", "value": "float64",
                          "switch_epoch": "float64"})
    return _numeric_params(frame, param_columns)


def trial_table(studies: StudyRuns | Sequence[StudyRuns]) -> pd.DataFrame:
    """One row per trial: study, trial, run_id, variant, workload, optimizer, criterion, state, seeds,
    switch_epochs (the tag text), switch_reason, objective, direction, value (``objective.<metric>``, NaN
    when not logged), std, epochs_run, then the ``param.<name>`` columns."""
    if isinstance(studies, StudyRuns):
        studies = [studies]
    rows = []
    for study in studies:
        variants = _variants(study.trials)
        metric = study.objective
        for trial in study.trials:
            row = {"study": study.study, "trial": trial.trial, "run_id": trial.run_id,
                   "variant": variants[trial.run_id], "workload": trial.tags.get(Tags.WORKLOAD, ""),
                   "optimizer": trial.tags.get(Tags.OPTIMIZER, ""), "criterion": trial.tags.get(Tags.CRITERION, ""),
                   "state": trial.state, "seeds": trial.tags.get(Tags.SEEDS, ""),
                   "switch_epochs": trial.tags.get(Tags.SWITCH_EPOCH, ""),
                   "switch_reason": trial.tags.get(Tags.SWITCH_REASON, ""), "objective": metric,
                   "direction": study.direction,
                   "value": trial.summary.get(objective_key(metric), math.nan),
                   "std": trial.summary.get(objective_std_key(metric), math.nan),
                   "epochs_run": trial.summary.get(Metrics.EPOCHS_RUN, math.nan)}
            row.update({f"param.{k}": v for k, v in trial.params.items()})
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    fixed = [c for c in frame.columns if not c.startswith("param.")]
    params = sorted(c for c in frame.columns if c.startswith("param."))
    frame = frame[fixed + params].astype({"trial": "int64", "value": "float64", "std": "float64"})
    return _numeric_params(frame, params)
