"""One trial, shared by every backend: sampled settings -> paired-seed training runs -> objective.

* :func:`suggest` samples a study's search space through an Optuna-style ``trial`` (define by run,
  conditional parameters skipped when their ``when`` does not hold). Under Ray Tune the same
  function runs inside ``OptunaSearch``'s define-by-run space.
* :func:`run_trial` trains the sampled configuration on every seed of the study, reports the
  objective after each epoch (``report(step, value)``, ``step = seed_index * epochs + epoch``, so
  pruners compare like with like), logs to the tracker, and aggregates mean and std over seeds.
* :func:`check_spec` dry-runs a study's settings (every range end, every choice) through the real
  optimizer and trainer validation, so a bad file fails before any trial starts, naming the field.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fuse_tune.optimizers import OPTIMIZERS, accepted_arguments, build_optimizer
from fuse_tune.spec import Param, SpecError, StudySpec, _flatten, nest
from fuse_tune.train import TRAINER_KEYS, EpochMetrics, TrainConfig, optimizer_arguments, train
from fuse_tune.workloads import DatasetNotFound, get_workload, load_dataset
from fuse_tune.workloads.models import model_options

__all__ = ["split_settings", "check_spec", "suggest", "run_trial", "TrialOutcome", "train_config"]


def workload_option_names(workload_name: str) -> set[str]:
    workload = get_workload(workload_name)
    names = set(workload.options)
    if workload.kind == "function":
        names |= {"dim", "noise", "start"}
    elif workload.model:
        names |= set(model_options(workload.model))
    return names


def split_settings(workload_name: str, settings: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Route settings by their first dotted part: trainer, workload option, else optimizer argument."""
    workload_keys = workload_option_names(workload_name)
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
    trainer, workload_options, optimizer_args = split_settings(spec.workload, settings)
    trainer = {"data_dir": spec.data_dir, **trainer}
    return TrainConfig(workload=spec.workload, optimizer=spec.optimizer, optimizer_args=optimizer_args,
                       workload_options=workload_options, epochs=spec.epochs, seed=seed, **trainer)


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


def _dataset_size(workload_name: str, data_dir: str | None) -> int | None:
    workload = get_workload(workload_name)
    if workload.kind != "supervised":
        return None
    try:
        return int(load_dataset(workload.dataset, data_dir).train_x.shape[0])
    except DatasetNotFound:
        return None  # checked when a trial runs; a study over absent data fails then with a clear line


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
    except SpecError:
        raise
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def check_spec(spec: StudySpec) -> None:
    """Names, routing and a dry run of the fixed settings and of every range end / choice."""
    try:
        workload = get_workload(spec.workload)
    except ValueError as exc:
        raise SpecError(f"workload: {exc}") from None
    if spec.optimizer not in OPTIMIZERS:
        raise SpecError(f"optimizer: expected one of {sorted(OPTIMIZERS)}, got {spec.optimizer!r}")
    if spec.objective.metric == "test_accuracy" and workload.kind == "function":
        raise SpecError("objective.metric: test_accuracy needs a data set; use train_loss for test-function workloads")
    accepted_optimizer = set(accepted_arguments(spec.optimizer))
    routable = set(TRAINER_KEYS) | workload_option_names(spec.workload) | accepted_optimizer
    for name in [n for n, _ in _flatten(spec.fixed)] + [p.name for p in spec.search]:
        root = name.split(".")[0]
        if root in ("epochs", "seed"):
            raise SpecError(f"{'search' if name in {p.name for p in spec.search} else 'fixed'}.{name}: set "
                            f"'{root}{'s' if root == 'seed' else ''}' at the top level of the study file")
        if root not in routable:
            field_name = f"search.{name}" if any(p.name == name for p in spec.search) else f"fixed.{name}"
            raise SpecError(f"{field_name}: not a setting of optimizer {spec.optimizer!r}, of the trainer or of "
                            f"workload {spec.workload!r}; accepted: {sorted(routable)}")
    n_train = _dataset_size(spec.workload, spec.data_dir)
    fixed = dict(_flatten(spec.fixed))
    _validate_settings(spec, fixed, "fixed", n_train)
    for param in spec.search:
        # The parameter's conditions held by their first allowed value, every other active parameter at
        # its first extreme: one complete, consistent assignment per range end / choice.
        overrides = {other: allowed[0] for other, allowed in param.when}
        labels = (["low", "high"] if param.type != "categorical"
                  else [f"choices[{i}]" for i in range(len(param.choices))])
        for label, value in zip(labels, param.extremes(), strict=True):
            assignment = _complete_assignment(spec.search, {**overrides, param.name: value})
            _validate_settings(spec, {**fixed, **assignment}, f"search.{param.name}.{label}", n_train)


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
    if metric == "test_accuracy":
        return float(history[-1].test_accuracy)
    if metric == "train_loss":
        return float(history[-1].train_loss)
    return float(time_to_target) if time_to_target is not None else math.inf


def _intermediate(spec: StudySpec, metrics: EpochMetrics) -> float:
    if spec.objective.metric == "test_accuracy":
        return float(metrics.test_accuracy)
    return float(metrics.train_loss)


def run_trial(spec: StudySpec, sampled: Mapping[str, Any], *, report: Callable[[int, float], None] | None = None,
              run: Any = None, threads: int | None = None, device: str | None = None) -> TrialOutcome:
    """Train ``spec`` fixed + ``sampled`` settings on every seed; ``report`` may raise to prune."""
    settings = spec.configuration(sampled)
    per_seed, costs, switch_epochs, reasons, histories = [], [], [], [], []
    epochs_run = 0
    for seed_index, seed in enumerate(spec.seeds):
        config = train_config(spec, settings, seed)
        if threads is not None:
            config.threads = threads
        if device is not None:
            config.device = device
        if spec.objective.target_loss is not None:
            config.target_loss = spec.objective.target_loss

        def on_epoch(metrics: EpochMetrics, seed: int = seed, seed_index: int = seed_index) -> None:
            nonlocal epochs_run
            epochs_run += 1
            if run is not None:
                run.log_epoch(seed, _loggable(metrics), metrics.epoch)
            if report is not None:
                report(seed_index * spec.epochs + metrics.epoch, _intermediate(spec, metrics))

        result = train(config, on_epoch)
        histories.append(result.history)
        value = _objective_of(spec, result.history, result.time_to_target)
        if result.stopped_early and spec.objective.metric == "train_loss":
            value = math.inf
        per_seed.append(value)
        final = result.final
        costs.append(final.grad_evals if spec.objective.cost == "grad_evals" else final.wall_time)
        switch_epochs.append(final.switch_epoch)
        reasons.append(final.switch_reason)
    finite = [v for v in per_seed if math.isfinite(v)]
    mean = statistics.fmean(per_seed) if len(finite) == len(per_seed) else (
        math.inf if spec.objective.direction == "minimize" else -math.inf)
    std = statistics.pstdev(per_seed) if len(finite) == len(per_seed) and len(per_seed) > 1 else 0.0
    return TrialOutcome(mean, std, statistics.fmean(costs) if spec.objective.cost else None, per_seed,
                        switch_epochs, reasons, epochs_run, histories)


_LOGGED = ("train_loss", "batch_loss", "test_loss", "test_accuracy", "grad_sq_norm", "wall_time", "grad_evals",
           "samples", "batch_size", "gap")


def _loggable(metrics: EpochMetrics) -> dict[str, float | None]:
    values: dict[str, float | None] = {key: getattr(metrics, key) for key in _LOGGED}
    values["phase_second"] = 0.0 if metrics.phase == "adam" else 1.0
    values["switch_epoch"] = metrics.switch_epoch
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in values.items()}
