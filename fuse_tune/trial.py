"""One trial, shared by every backend: sampled settings -> paired-seed training runs -> objective.

* :func:`suggest` samples a study's search space through an Optuna-style ``trial`` (define by run,
  conditional parameters skipped when their ``when`` does not hold). Under Ray Tune the same
  function runs inside ``OptunaSearch``'s define-by-run space.
* :func:`run_trial` trains the sampled configuration on every seed of the study, reports the
  mean over seeds of the objective after each epoch (``report(epoch, value)``; the seeds advance
  together, so pruners compare like with like), logs to the tracker, and aggregates mean and std.
* :func:`check_spec` dry-runs a study's settings (every range end, every choice) through the real
  optimizer and trainer validation, so a bad file fails before any trial starts, naming the field.
  Parsing (:mod:`fuse_tune.spec`, no torch) is the step before it; :func:`load_spec` does both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fuse_optim.switch import make_criterion
from fuse_tune.errors import first_line
from fuse_tune.optimizers import OPTIMIZERS, accepted_arguments, build_optimizer
from fuse_tune.records import (
    EPOCH_MEAN_METRICS,
    FIRST_PHASE,
    MINIMIZE,
    NEVER_SWITCHED,
    PER_SEED_METRICS,
    STATE_COMPLETE,
    VALIDATION_PREFIX,
    Metrics,
    StudyParams,
    Tags,
    cost_key,
    encode_switch_epochs,
    objective_key,
    objective_std_key,
    redact,
    seed_std,
)
from fuse_tune.spec import OBJECTIVES, Param, SpecError, StudySpec, _flatten, nest, read_spec
from fuse_tune.tracking import MlflowTracker, versions
from fuse_tune.train import TRAINER_KEYS, EpochMetrics, TrainConfig, Trainer, TrainResult, optimizer_arguments
from fuse_tune.workloads import (
    ACCURACY,
    DatasetNotFound,
    Metric,
    Workload,
    build_function,
    build_supervised,
    get_workload,
)
from fuse_tune.workloads.interface import WorkloadError, split_size

__all__ = ["split_settings", "check_spec", "load_spec", "suggest", "run_trial", "SeedRuns", "TrialOutcome",
           "train_config", "seed_config", "summarize", "cost_of", "study_run_info", "start_study_run", "trial_tags",
           "log_outcome"]


def workload_option_names(workload: StudySpec | Workload | str) -> set[str]:
    """The options a workload (a study's, a Workload, a registered name) declares."""
    if isinstance(workload, StudySpec):
        workload = get_workload(workload.workload, workload.workload_path)
    elif isinstance(workload, str):
        workload = get_workload(workload)
    return set(workload.defaults)


def split_settings(spec_or_name: StudySpec | Workload | str, settings: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Route settings by their first dotted part: trainer, workload option, else optimizer argument."""
    workload_keys = workload_option_names(spec_or_name)
    trainer, workload_options, optimizer = {}, {}, {}
    for key, value in settings.items():
        if key in TRAINER_KEYS:
            trainer[key] = value
        elif key in workload_keys:
            workload_options[key] = value
        else:
            optimizer[key] = value
    return trainer, workload_options, optimizer


def train_config(spec: StudySpec, settings: Mapping[str, Any], seed: int) -> TrainConfig:
    trainer, workload_options, optimizer_args = split_settings(spec, settings)
    trainer = {"data_dir": spec.data_dir, **trainer}
    return TrainConfig(workload=spec.workload, optimizer=spec.optimizer, optimizer_args=optimizer_args,
                       workload_options=workload_options, epochs=spec.epochs, seed=seed,
                       workload_path=spec.workload_path, **trainer)


# ------------------------------------------------------------------ sampling


def suggest(trial: Any, params: tuple[Param, ...]) -> dict[str, Any]:
    """Sample ``params`` in file order through ``trial.suggest_*``; inactive conditionals are skipped."""
    values: dict[str, Any] = {}
    for param in params:
        if not param.active(values):
            continue
        if param.type == "categorical":
            values[param.name] = trial.suggest_categorical(param.name, list(param.choices))
        elif param.type == "int":
            values[param.name] = trial.suggest_int(param.name, int(param.low), int(param.high),
                                                   step=int(param.step or 1), log=param.log)
        else:
            values[param.name] = trial.suggest_float(param.name, float(param.low), float(param.high),
                                                     step=param.step, log=param.log)
    return values


# ------------------------------------------------------------------ validation


@dataclass(frozen=True)
class Probe:
    """What one build of a supervised workload showed: its training-set size and metric (``None``: none)."""

    n_train: int
    metric: Metric | None


def probe_workload(spec: StudySpec, options: Mapping[str, Any]) -> Probe | None:
    """Build the study's workload once with ``options`` (seed ``seeds[0]``; :func:`build_supervised` evaluates the
    objective and the metric on a two-sample batch), so that a builder that returns the wrong thing, a loss that is
    not a scalar or a metric that fails is one line before any trial starts. ``None`` for a test function
    or when a built-in data set's files are absent (a trial then fails with the line naming them)."""
    workload = get_workload(spec.workload, spec.workload_path)
    if workload.kind == "function":
        return None
    try:
        instance = build_supervised(workload, data_dir=spec.data_dir, seed=spec.seeds[0], **options)
    except DatasetNotFound:
        return None
    return Probe(split_size(instance.problem.train), instance.problem.metric)


def resolve_objective(spec: StudySpec, metric: Metric | None) -> StudySpec:
    """``spec`` with its objective's metric and direction filled in from the workload's metric (see
    :class:`fuse_tune.spec.Objective`); a one-line SpecError for a metric the workload does not report."""
    function = get_workload(spec.workload, spec.workload_path).kind == "function"
    chosen = spec.objective.metric
    if chosen is None:
        chosen = (Metrics.TRAIN_LOSS if function else
                  f"{VALIDATION_PREFIX}{metric.name}" if metric is not None else Metrics.VAL_LOSS)
    if function and chosen not in (Metrics.TRAIN_LOSS, Metrics.TIME_TO_TARGET):
        raise SpecError(f"objective.metric: {chosen} needs a data set; use train_loss or time_to_target for "
                        f"test-function workloads")
    if chosen in OBJECTIVES:
        direction = OBJECTIVES[chosen]
    elif metric is not None and chosen == f"{VALIDATION_PREFIX}{metric.name}":
        direction = metric.direction
    else:
        accepted = sorted(OBJECTIVES) + ([f"{VALIDATION_PREFIX}{metric.name}"] if metric is not None else [])
        raise SpecError(f"objective.metric: workload {spec.workload!r} reports "
                        f"{'the metric ' + repr(metric.name) if metric is not None else 'no metric'}, not "
                        f"{chosen!r}; accepted: {accepted}")
    return replace(spec, objective=replace(spec.objective, metric=chosen, direction=direction))


def _check_workload_options(spec: StudySpec, options: Mapping[str, Any]) -> None:
    """The option values against their declared types; a built-in workload also builds the model they describe,
    a test function the function."""
    workload = get_workload(spec.workload, spec.workload_path)
    if workload.kind == "function":
        build_function(workload, seed=0, **options)
        return
    merged = workload.check_options(options)
    check = getattr(workload.build, "check", None)
    if check is not None:
        check(merged, spec.data_dir)


def _validate_settings(spec: StudySpec, settings: Mapping[str, Any], where: str, n_train: int | None) -> None:
    try:
        config = train_config(spec, nest(dict(_flatten(settings))), spec.seeds[0])
        config.validate()
        for key in ("batch_size", "batch_size_after_switch"):
            size = getattr(config, key)
            if n_train is not None and size is not None and size > n_train:
                raise ValueError(f"{key}={size} is larger than the training set of {spec.workload} ({n_train} samples)")
        probe = [torch.zeros(3, requires_grad=True)]
        build_optimizer(spec.optimizer, probe, optimizer_arguments(config))
        _check_workload_options(spec, config.workload_options)
    except SpecError:
        raise
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def check_spec(spec: StudySpec) -> StudySpec:
    """Names, routing and a dry run of the fixed settings and of every range end / choice, and one build of the
    workload (:func:`probe_workload`). Returns the spec with its objective resolved (:func:`resolve_objective`)."""
    try:
        workload = get_workload(spec.workload, spec.workload_path)
    except (ValueError, WorkloadError) as exc:
        raise _workload_error(exc) from None
    if spec.optimizer not in OPTIMIZERS:
        raise SpecError(f"optimizer: expected one of {sorted(OPTIMIZERS)}, got {spec.optimizer!r}")
    if workload.kind == "function" and spec.objective.metric not in (None, Metrics.TRAIN_LOSS,
                                                                     Metrics.TIME_TO_TARGET):
        raise SpecError(f"objective.metric: {spec.objective.metric} needs a data set; use train_loss for "
                        f"test-function workloads")
    accepted_optimizer = set(accepted_arguments(spec.optimizer))
    routable = set(TRAINER_KEYS) | workload_option_names(spec) | accepted_optimizer
    for name in [n for n, _ in _flatten(spec.fixed)] + [p.name for p in spec.search]:
        root = name.split(".")[0]
        if root in ("epochs", "seed"):
            raise SpecError(f"{'search' if name in {p.name for p in spec.search} else 'fixed'}.{name}: set "
                            f"'{root}{'s' if root == 'seed' else ''}' at the top level of the study file")
        if root not in routable:
            field_name = f"search.{name}" if any(p.name == name for p in spec.search) else f"fixed.{name}"
            options = sorted(workload_option_names(spec)) or "none"
            trainer = sorted(set(TRAINER_KEYS) - {"epochs", "seed"})
            raise SpecError(f"{field_name}: not a setting of optimizer {spec.optimizer!r}, of the trainer or of "
                            f"workload {spec.workload!r}; the workload's options: {options}; the optimizer's: "
                            f"{sorted(accepted_optimizer)}; the trainer's: {trainer}")
    fixed = dict(_flatten(spec.fixed))
    _validate_fixed(spec, fixed, None)  # the option values, before the build below uses them
    try:
        _, fixed_options, _ = split_settings(spec, nest(fixed))
        probe = probe_workload(spec, fixed_options)
    except WorkloadError as exc:  # a UserError, hence a ValueError too: first
        raise _workload_error(exc) from None
    except (ValueError, TypeError) as exc:
        raise SpecError(f"fixed: {first_line(exc)}") from None
    n_train = probe.n_train if probe is not None else None
    if n_train is not None:
        _validate_fixed(spec, fixed, n_train)  # batch sizes against the training split
    deferred: SpecError | None = None
    for param in spec.search:
        # The parameter's conditions held by their first allowed value, every other active parameter at
        # its first extreme: one complete, consistent assignment per range end / choice.
        overrides = {other: allowed[0] for other, allowed in param.when}
        labels = (["low", "high"] if param.type != "categorical"
                  else [f"choices[{i}]" for i in range(len(param.choices))])
        for label, value in zip(labels, param.extremes(), strict=True):
            chosen = {**overrides, param.name: value}
            try:
                _validate_settings(spec, {**fixed, **_complete_assignment(spec.search, chosen)},
                                   f"search.{param.name}.{label}", n_train)
            except SpecError as error:
                # Another parameter's first extreme may be the culprit (a zero zeta.low fails the choice
                # grad_norm of switch.criterion too): that parameter's own check names it; report this
                # one only when no such check fails.
                if not _valid_with_another_extreme(spec, fixed, param, chosen, n_train):
                    raise
                deferred = deferred or error
    if deferred is not None:
        raise deferred
    return resolve_objective(spec, probe.metric if probe is not None else _builtin_metric(workload))


def resolved(spec: StudySpec) -> StudySpec:
    """``spec`` itself when its objective is resolved (:func:`load_spec`, :func:`check_spec`), else
    :func:`check_spec` of it: a spec straight from :func:`fuse_tune.spec.parse_spec` works everywhere too."""
    return spec if spec.objective.direction is not None and spec.objective.metric is not None else check_spec(spec)


def _validate_fixed(spec: StudySpec, fixed: Mapping[str, Any], n_train: int | None) -> None:
    try:
        _validate_settings(spec, fixed, "fixed", n_train)
    except SpecError:
        # Searched settings may complete fixed ones (fixed switch.criterion: epoch, searched switch.epoch):
        # the fixed settings are wrong only if they fail together with a complete assignment too, and what that
        # assignment fails on is the fault (not the incompleteness the search fills in).
        _validate_settings(spec, {**fixed, **_complete_assignment(spec.search, {})}, "fixed", n_train)


def _workload_error(exc: Exception) -> SpecError:
    """A workload's one line, naming the field (``workload``) once."""
    text = str(exc)
    return SpecError(text if text.startswith("workload ") else f"workload: {text}")


def _builtin_metric(workload: Workload) -> Metric | None:
    """Accuracy for a built-in data set whose files are absent (the probe could not build it)."""
    return ACCURACY if workload.dataset is not None else None


def load_spec(path: str | Path) -> StudySpec:
    """Read and parse a study file (:func:`fuse_tune.spec.read_spec`), then dry-run it (:func:`check_spec`);
    errors are one-line SpecErrors naming the file and the field."""
    spec = read_spec(path)
    try:
        spec = check_spec(spec)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    return spec


def _valid_with_another_extreme(spec: StudySpec, fixed: Mapping[str, Any], param: Param, chosen: Mapping[str, Any],
                                 n_train: int | None) -> bool:
    """Whether moving one other parameter off its first extreme makes ``chosen`` a valid assignment."""
    assignment = _complete_assignment(spec.search, chosen)
    for other in spec.search:
        if other.name in chosen or other.name not in assignment:
            continue
        for value in other.extremes()[1:]:
            try:
                _validate_settings(spec, {**fixed, **_complete_assignment(spec.search, {**chosen, other.name: value})},
                                   "", n_train)
            except SpecError:
                continue
            return True
    return False


def _complete_assignment(params: tuple[Param, ...], overrides: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for param in params:
        if param.name in overrides:
            values[param.name] = overrides[param.name]
        elif param.active(values):
            values[param.name] = param.extremes()[0]
    return values


# ------------------------------------------------------------------ running


@dataclass
class TrialOutcome:
    """Aggregated result of one configuration over the study's seeds."""

    value: float
    std: float
    cost: float | None
    per_seed: list[float]
    switch_epochs: list[int | None]
    switch_reasons: list[str | None]
    epochs_run: int
    histories: list[list[EpochMetrics]] = field(default_factory=list)

    def values(self, with_cost: bool) -> float | tuple[float, float]:
        return (self.value, float(self.cost)) if with_cost else self.value


def _objective_of(spec: StudySpec, history: list[EpochMetrics], time_to_target: float | None) -> float:
    metric = spec.objective.metric
    if metric == Metrics.TIME_TO_TARGET:
        return float(time_to_target) if time_to_target is not None else math.inf
    return _measured(history[-1], metric)


def _intermediate(spec: StudySpec, metrics: EpochMetrics) -> float:
    """The value pruners and schedulers see after an epoch: the objective (the training loss for time_to_target)."""
    metric = spec.objective.metric
    return _measured(metrics, Metrics.TRAIN_LOSS if metric == Metrics.TIME_TO_TARGET else metric)


def _measured(metrics: EpochMetrics, key: str) -> float:
    value = metrics.value(key)
    if value is None:  # resolve_objective admits only what the trainer measures: a bug if this happens
        raise RuntimeError(f"objective {key!r} was not measured (measured: {sorted(metrics.scores)})")
    return float(value)


class SeedRuns:
    """One configuration's training runs, one per seed of the study, advanced together an epoch at a time.

    :meth:`run_epoch` trains every seed that is not done for one epoch and returns the mean over those
    seeds of the epoch's objective metric (the value a pruner or scheduler sees at that epoch): every
    trial is then compared at the same epoch on the same seeds, and a trial's best-so-far value is not
    inflated by an earlier seed's last epoch. A seed whose loss diverged stops (its epoch is still
    logged and averaged, as NaN). Both backends train through this class; :meth:`state_dict` is the
    exact resume point that the Ray backend checkpoints.
    """

    def __init__(self, spec: StudySpec, settings: Mapping[str, Any], *, threads: int | None = None,
                 device: str | None = None, evaluate_test: bool = False) -> None:
        spec = self.spec = resolved(spec)
        self.seeds = list(spec.seeds)
        self.trainers = [Trainer(seed_config(spec, settings, seed, threads=threads, device=device,
                                             evaluate_test=evaluate_test))
                         for seed in self.seeds]
        self.epoch = 0  # epochs the group has run (the next report's epoch index)
        self.epochs_run = 0  # seed-epochs trained, summed over seeds (the pruning statistics' unit)

    @property
    def done(self) -> bool:
        return all(trainer.done for trainer in self.trainers)

    def run_epoch(self, log: Callable[[int, Mapping[str, float | None], int], None] | None = None
                  ) -> tuple[float, list[EpochMetrics]]:
        """Train each unfinished seed one epoch; ``log(seed, metrics, epoch)`` each. Returns (mean value, metrics)."""
        values, epoch_metrics = [], []
        for seed, trainer in zip(self.seeds, self.trainers, strict=True):
            if trainer.done:
                continue
            metrics = trainer.run_epoch()
            self.epochs_run += 1
            if log is not None:
                log(seed, _loggable(metrics), metrics.epoch)
            values.append(_intermediate(self.spec, metrics))
            epoch_metrics.append(metrics)
        self.epoch += 1
        return (statistics.fmean(values) if values else math.nan), epoch_metrics

    def outcome(self) -> TrialOutcome:
        return summarize(self.spec, [trainer.result for trainer in self.trainers], self.epochs_run)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epochs_run": self.epochs_run,
                "trainers": [trainer.state_dict() for trainer in self.trainers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["trainers"]) != len(self.trainers):
            raise ValueError(f"the state holds {len(state['trainers'])} seeds' runs, "
                             f"the study has {len(self.trainers)}")
        for trainer, trainer_state in zip(self.trainers, state["trainers"], strict=True):
            trainer.load_state_dict(trainer_state)
        self.epoch, self.epochs_run = int(state["epoch"]), int(state["epochs_run"])


def run_trial(spec: StudySpec, sampled: Mapping[str, Any], *, report: Callable[[int, float], None] | None = None,
              run: Any = None, threads: int | None = None, device: str | None = None,
              evaluate_test: bool = False) -> TrialOutcome:
    """Train ``spec`` fixed + ``sampled`` settings on every seed (:class:`SeedRuns`); ``report(epoch, mean over
    seeds)`` after each epoch may raise to prune. The test split is evaluated only with ``evaluate_test`` (a
    comparison's reruns), never for a tuning trial."""
    runs = SeedRuns(spec, spec.configuration(sampled), threads=threads, device=device, evaluate_test=evaluate_test)
    while not runs.done:
        epoch = runs.epoch
        value, _ = runs.run_epoch(run.log_epoch if run is not None else None)
        if report is not None:
            report(epoch, value)
    return runs.outcome()


def seed_config(spec: StudySpec, settings: Mapping[str, Any], seed: int, *, threads: int | None = None,
                device: str | None = None, evaluate_test: bool = False) -> TrainConfig:
    """The TrainConfig of one seed of a trial (shared by the Optuna and Ray backends)."""
    config = train_config(spec, settings, seed)
    if threads is not None:
        config.threads = threads
    if device is not None:
        config.device = device
    if spec.objective.target_loss is not None:
        config.target_loss = spec.objective.target_loss
    config.evaluate_test = evaluate_test  # trials select on validation; the test split is the reruns' and reports'
    return config


def summarize(spec: StudySpec, results: Sequence[TrainResult], epochs_run: int) -> TrialOutcome:
    """Per-seed objectives and costs -> mean and std over seeds (shared by the Optuna and Ray backends).

    The std is :func:`fuse_tune.records.seed_std` (sample std, ddof 1; NaN for one seed or a diverged seed)."""
    per_seed, costs, switch_epochs, reasons, histories = [], [], [], [], []
    for result in results:
        histories.append(result.history)
        value = _objective_of(spec, result.history, result.time_to_target)
        if result.stopped_early and spec.objective.metric == Metrics.TRAIN_LOSS:
            value = math.inf
        per_seed.append(value)
        final = result.final
        costs.append(cost_of(final, spec.objective.cost))
        switch_epochs.append(final.switch_epoch)
        reasons.append(final.switch_reason)
    finite = [v for v in per_seed if math.isfinite(v)]
    mean = statistics.fmean(per_seed) if len(finite) == len(per_seed) else (
        math.inf if spec.objective.direction == MINIMIZE else -math.inf)
    std = seed_std(per_seed)
    return TrialOutcome(mean, std, statistics.fmean(costs) if spec.objective.cost else None, per_seed,
                        switch_epochs, reasons, epochs_run, histories)


def cost_of(metrics: EpochMetrics, cost: str | None) -> float:
    """The study's cost (``objective.cost``) at the end of an epoch: gradient evaluations, else training wall time
    (seconds), both cumulative from the start of training."""
    return float(metrics.grad_evals) if cost == Metrics.GRAD_EVALS else float(metrics.wall_time)


# ------------------------------------------------------------------ MLflow records shared by the backends


def study_run_info(spec: StudySpec, n_trials: int, backend: str, storage: str | None) -> tuple[dict, dict]:
    """Tags and params of a study's parent run; ``storage`` must already be redacted."""
    tags = {Tags.WORKLOAD: spec.workload, Tags.OPTIMIZER: spec.optimizer, Tags.STORAGE: storage,
            Tags.FINGERPRINT: spec.fingerprint(), Tags.BACKEND: backend, **versions()}
    params = {StudyParams.WORKLOAD: spec.workload, StudyParams.OPTIMIZER: spec.optimizer,
              StudyParams.EPOCHS: spec.epochs, StudyParams.SEEDS: ",".join(map(str, spec.seeds)),
              StudyParams.OBJECTIVE: spec.objective.metric,
              StudyParams.OBJECTIVE_DIRECTION: spec.objective.direction, StudyParams.SAMPLER: spec.sampler["name"],
              StudyParams.PRUNER: spec.pruner["name"], StudyParams.TRIALS: n_trials, StudyParams.FIXED: spec.fixed}
    return tags, params


def start_study_run(spec: StudySpec, tracking_uri: str | None, n_trials: int, backend: str, storage: str,
                    extra_tags: Mapping[str, Any] | None = None) -> str | None:
    """The study's MLflow parent run, found again on resume (:meth:`MlflowTracker.start_study`); ``None`` without
    tracking. ``storage`` is redacted here; ``extra_tags`` are a backend's own."""
    if not tracking_uri:
        return None
    tags, params = study_run_info(spec, n_trials, backend, redact(storage))
    return MlflowTracker(tracking_uri, experiment=spec.name).start_study(
        spec.name, tags={**tags, **(extra_tags or {})}, params=params, artifact=spec.path)


def trial_tags(spec: StudySpec, settings: Mapping[str, Any], number: int, backend: str) -> dict[str, Any]:
    """Tags of a trial's child run (the same keys from every backend, so dashboards cannot tell them apart)."""
    switch = settings.get("switch") or ""
    return {Tags.STUDY: spec.name, Tags.TRIAL: number, Tags.WORKLOAD: spec.workload,
            Tags.OPTIMIZER: spec.optimizer, Tags.SEEDS: ",".join(map(str, spec.seeds)),
            Tags.CRITERION: make_criterion(switch).name if isinstance(switch, dict) else switch,
            Tags.BACKEND: backend, **versions()}


def log_outcome(run: Any, outcome: TrialOutcome, spec: StudySpec) -> None:
    """A finished trial's tags, summary metrics and per-epoch means over seeds on its child run."""
    switch_epochs = [e for e in outcome.switch_epochs if e is not None]
    run.set_tags({
        Tags.STATE: STATE_COMPLETE,
        Tags.SWITCH_EPOCH: encode_switch_epochs(outcome.switch_epochs),
        Tags.SWITCH_REASON: next((r for r in outcome.switch_reasons if r), NEVER_SWITCHED),
    })
    metric = spec.objective.metric
    summary = {objective_key(metric): outcome.value, objective_std_key(metric): outcome.std,
               Metrics.EPOCHS_RUN: float(outcome.epochs_run)}
    if switch_epochs:
        summary[Metrics.SWITCH_EPOCH_MEAN] = sum(switch_epochs) / len(switch_epochs)
    if outcome.cost is not None:
        summary[cost_key(spec.objective.cost)] = outcome.cost
    run.log_metrics({k: v for k, v in summary.items() if math.isfinite(v)})
    # Per-epoch means over seeds under the plain metric names (step = epoch).
    if hasattr(run, "log_series") and outcome.histories:
        length = min(len(h) for h in outcome.histories)
        series: dict[str, list[float]] = {}
        for key in (*EPOCH_MEAN_METRICS, *outcome.histories[0][0].scores):
            columns = [[h[i].value(key) for h in outcome.histories] for i in range(length)]
            if all(v is not None for column in columns for v in column):
                series[key] = [sum(column) / len(column) for column in columns]
        run.log_series({k: v for k, v in series.items() if all(math.isfinite(x) for x in v)})


#: the per-seed metrics that are EpochMetrics fields of the same name (the others are derived in _loggable)
_LOGGED = tuple(m for m in PER_SEED_METRICS if m not in (Metrics.PHASE_SECOND, Metrics.SWITCH_EPOCH))


def _loggable(metrics: EpochMetrics) -> dict[str, float | None]:
    """One seed's epoch as the per-seed metrics (:data:`fuse_tune.records.PER_SEED_METRICS`); None: not logged."""
    values: dict[str, float | None] = {key: getattr(metrics, key) for key in _LOGGED}
    values.update(metrics.scores)
    values[Metrics.PHASE_SECOND] = 0.0 if metrics.phase == FIRST_PHASE else 1.0
    values[Metrics.SWITCH_EPOCH] = metrics.switch_epoch
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in values.items()}
