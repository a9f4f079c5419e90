"""Study files: YAML -> validated, typed :class:`StudySpec`.

A study file says what to tune and how::

    name: quickstart                     # study name (storage key, MLflow parent run name)
    workload: digits-logreg              # fuse-tune list, or your own: package.module:builder
    workload_path: [.]                   # folders your builder's module is imported from (relative to this
                                         # file; default: this file's folder)
    optimizer: fuse_pv                   # sgd | adam | adam_sgd | adam_lbfgs | lbfgs | fuse_pv | fuse
    epochs: 8
    seeds: [0, 1]                        # every configuration runs on each of these (paired seeds)
    fixed:                               # settings that do not vary (dotted keys nest)
      batch_size: 64
      lr: 0.01
    search:                              # the search space; dotted names nest into dicts
      switch.criterion: {type: categorical, choices: [epoch, grad_norm, loss_change]}
      switch.epoch: {type: int, low: 1, high: 6, when: {switch.criterion: epoch}}
      switch.zeta: {type: float, low: 1.0e-4, high: 1.0, log: true, when: {switch.criterion: grad_norm}}
      history_size: {type: int, low: 3, high: 20}
    objective: {metric: val_accuracy}    # val_<metric> | val_loss | train_loss | time_to_target (+ target_loss);
                                         # default: val_<the workload's metric> (val_loss without one)
                                         # optional cost: grad_evals | wall_time (second objective)
    budget: {trials: 12, timeout: null}  # timeout in seconds
    sampler: {name: tpe, seed: 0}        # tpe | random | qmc | cmaes | grid
    pruner: {name: median}               # median | percentile (+ percentile: 25 keeps the top 25%) |
                                         # hyperband | none (reports once per epoch and seed)
    storage: null                        # null: journal file ./fuse-studies.log; sqlite:///..., postgresql://...
    data_dir: null                       # the data folder handed to the workload (--data-dir overrides); a
                                         # relative folder is read from where fuse-tune runs, whereas
                                         # workload_path is relative to this file

Every setting name (fixed or searched) is routed by its first dotted part: a trainer setting
(``batch_size``, ``batch_size_after_switch``, ...), a workload option (``l2``, ``hidden_sizes``,
...), or else an optimizer argument (``lr``, ``switch``, ``theta``, ``history_size``, ...).
A parameter with ``when: {other: value}`` is sampled only when ``other`` took ``value`` (or one of
a list of values), which is how the criterion's own switch epoch / zeta / sigma and the theta
schedule's own parameters are conditional.

Errors are :class:`SpecError` (a :class:`fuse_tune.errors.UserError`): one line naming the file and the
field, the value given and what is accepted.

This module parses: YAML -> StudySpec, every check that needs no torch (:func:`read_spec`,
:func:`parse_spec`). It imports neither torch nor :mod:`fuse_tune.trial`; checking a parsed study against the
real optimizers and workloads (the dry run) is the separate step :func:`fuse_tune.trial.check_spec`, and
:func:`fuse_tune.trial.load_spec` does both. The field readers here (:func:`mapping`, :func:`seed_list`)
are shared with comparison files (:mod:`fuse_tune.compare`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fuse_tune.errors import UserError
from fuse_tune.records import (
    COST_METRICS,
    DIRECTIONS,
    MINIMIZE,
    OBJECTIVE_METRICS,
    TEST_PREFIX,
    VALIDATION_PREFIX,
    Metrics,
)

__all__ = ["SpecError", "Param", "Objective", "StudySpec", "read_spec", "parse_spec", "read_yaml", "mapping",
           "seed_list", "nest", "OBJECTIVES"]

OBJECTIVES = {metric: DIRECTIONS[metric] for metric in OBJECTIVE_METRICS}  # fixed objective metric -> direction
COSTS = COST_METRICS
SAMPLERS = ("tpe", "random", "qmc", "cmaes", "grid")
PRUNERS = ("median", "percentile", "hyperband", "none")
TOP_LEVEL = ("name", "description", "workload", "optimizer", "epochs", "seeds", "fixed", "search", "objective",
             "budget", "sampler", "pruner", "storage", "resources", "data_dir", "workload_path")


class SpecError(UserError):
    """A study file is invalid; the message is one line naming the field."""


def _fail(where: str, message: str) -> SpecError:
    return SpecError(f"{where}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Param:
    """One searched parameter: ``float``/``int`` in [low, high] (``log``, ``step``) or ``categorical``."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether this parameter applies, given the values sampled so far."""
        return all(name in values and values[name] in allowed for name, allowed in self.when)

    def extremes(self) -> list[Any]:
        """Values a dry run should try: both ends of a range, every choice."""
        if self.type == "categorical":
            return list(self.choices)
        return [self.low, self.high]


@dataclass(frozen=True)
class Objective:
    """What a study optimizes. ``metric`` and ``direction`` are ``None`` until the workload is known: the default
    metric is ``val_<the workload's metric>`` (``val_loss`` without one; ``train_loss`` on a test function), and
    the direction of ``val_<metric>`` is the metric's (:func:`fuse_tune.trial.resolve_spec` fills both in)."""

    metric: str | None = None
    target_loss: float | None = None
    cost: str | None = None
    direction: str | None = None

    @property
    def directions(self) -> list[str]:
        return [self.direction] + ([MINIMIZE] if self.cost else [])


@dataclass(frozen=True)
class StudySpec:
    """A validated study file."""

    name: str
    workload: str
    optimizer: str
    epochs: int
    seeds: tuple[int, ...]
    fixed: dict[str, Any]
    search: tuple[Param, ...]
    objective: Objective
    trials: int
    timeout: float | None
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    storage: str | None
    description: str = ""
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    data_dir: str | None = None
    source: str = ""  # the YAML text, logged as an artifact
    path: str | None = None
    workload_path: tuple[str, ...] = ()  # absolute folders a workload's module is imported from

    def fingerprint(self) -> str:
        """Hash of what defines the search (not the budget): resuming a study requires it to match."""
        defining = {
            "workload": self.workload, "optimizer": self.optimizer, "epochs": self.epochs, "seeds": list(self.seeds),
            "fixed": self.fixed, "search": [asdict(p) for p in self.search], "objective": asdict(self.objective),
        }
        text = json.dumps(defining, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def configuration(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """Fixed settings overlaid with sampled ones, as one nested dict."""
        flat = dict(_flatten(self.fixed))
        flat.update(sampled)
        return nest(flat)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items.extend(_flatten(value, name + "."))
        else:
            items.append((name, value))
    return items


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"switch.criterion": "epoch", "switch.epoch": 3}`` -> ``{"switch": {"criterion": "epoch", "epoch": 3}}``."""
    result: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        target = result
        for part in parts[:-1]:
            existing = target.setdefault(part, {})
            if not isinstance(existing, dict):
                raise SpecError(f"{key}: {part!r} is both a value and a group of settings")
            target = existing
        if isinstance(target.get(parts[-1]), dict):
            raise SpecError(f"{key}: {parts[-1]!r} is both a value and a group of settings")
        target[parts[-1]] = value
    return result


def _number(raw: Any, where: str) -> float:
    """A YAML number; also accepts text like ``1e-3`` (YAML 1.1 reads it as a string)."""
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            raise _fail(where, f"expected a number, got {raw!r}") from None
    if not _is_number(raw):
        raise _fail(where, f"expected a finite number, got {raw!r}")
    return raw


def _numbers_in(value: Any) -> Any:
    """Turn YAML-1.1 strings like ``1e-3`` into floats, recursively."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") and value.strip()[0] in "0123456789+-." else value
        except ValueError:
            return value
    if isinstance(value, list):
        return [_numbers_in(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers_in(v) for k, v in value.items()}
    return value


def _parse_param(name: str, raw: Any) -> Param:
    where = f"search.{name}"
    if not isinstance(raw, Mapping):
        raise _fail(where, f"expected a mapping like {{type: float, low: 1e-4, high: 1e-1}}, got {raw!r}")
    accepted = {"type", "low", "high", "log", "step", "choices", "when"}
    unknown = sorted(set(raw) - accepted)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; accepted: {sorted(accepted)}")
    kind = raw.get("type")
    if kind not in ("float", "int", "categorical"):
        raise _fail(f"{where}.type", f"expected one of ['categorical', 'float', 'int'], got {kind!r}")
    when: list[tuple[str, tuple[Any, ...]]] = []
    if "when" in raw:
        if not isinstance(raw["when"], Mapping) or not raw["when"]:
            raise _fail(f"{where}.when", f"expected a mapping {{parameter: value}}, got {raw['when']!r}")
        for other, allowed in raw["when"].items():
            allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
            when.append((str(other), tuple(_numbers_in(list(allowed)))))
    if kind == "categorical":
        for key in ("low", "high", "log", "step"):
            if key in raw:
                raise _fail(f"{where}.{key}", "not used by a categorical parameter (give 'choices')")
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(f"{where}.choices", f"expected a non-empty list, got {choices!r}")
        for choice in choices:
            if not (choice is None or isinstance(choice, (str, int, float, bool))):
                raise _fail(f"{where}.choices", f"choices must be numbers, text, true/false or null, got {choice!r}")
        return Param(name, kind, choices=tuple(_numbers_in(choices)), when=tuple(when))
    if "choices" in raw:
        raise _fail(f"{where}.choices", f"not used by a {kind} parameter (give 'low' and 'high')")
    for key in ("low", "high"):
        if key not in raw:
            raise _fail(f"{where}.{key}", "missing")
    low, high = _number(raw["low"], f"{where}.low"), _number(raw["high"], f"{where}.high")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise _fail(where, f"an int parameter needs integer bounds, got low={low!r}, high={high!r}")
    if low > high:
        raise _fail(where, f"low must be <= high, got low={low!r}, high={high!r}")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise _fail(f"{where}.log", f"expected true or false, got {log!r}")
    if log and low <= 0:
        raise _fail(f"{where}.low", f"a log-scaled range needs low > 0, got {low!r}")
    step = raw.get("step")
    if step is not None:
        step = _number(step, f"{where}.step")
        if step <= 0 or log:
            raise _fail(f"{where}.step", f"expected a number > 0 and no log scale, got step={step!r}, log={log}")
    if kind == "int":
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    return Param(name, kind, low=low, high=high, log=log, step=step, when=tuple(when))


def mapping(raw: Any, where: str, accepted: Collection[str] | None = None, *, name_unknown: bool = False
            ) -> dict[str, Any]:
    """A YAML mapping field (``None`` reads as empty) whose keys are among ``accepted`` (``None``: any key).

    An unknown key fails as ``<where>: unknown key(s) [...]; accepted: [sorted]`` (study files), or with
    ``name_unknown=True`` as ``<where>.<key>: unknown field; accepted: [as given]``, naming the first unknown
    key in the field path (comparison files and the top level of a study file, where ``where`` is ``""``)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _fail(where, f"expected a mapping, got {raw!r}")
    if accepted is not None:
        unknown = sorted(set(raw) - set(accepted))
        if unknown and name_unknown:
            raise _fail(f"{where}.{unknown[0]}" if where else unknown[0], f"unknown field; accepted: {list(accepted)}")
        if unknown:
            raise _fail(where, f"unknown key(s) {unknown}; accepted: {sorted(accepted)}")
    return dict(raw)


def seed_list(raw: Any, where: str, *, one_message: bool = False) -> tuple[int, ...]:
    """Seeds: one integer or a non-empty list of distinct integers >= 0.

    A list that is not integers fails as ``expected a non-empty list of integers >= 0``, repeated seeds as
    ``seeds must be distinct`` (study files); ``one_message=True`` says both in one message, ``expected a
    non-empty list of distinct integers >= 0`` (comparison files)."""
    seeds = [raw] if _is_int(raw) else raw
    valid = isinstance(seeds, list) and bool(seeds) and all(_is_int(s) and s >= 0 for s in seeds)
    distinct = valid and len(set(seeds)) == len(seeds)
    if one_message and not distinct:
        raise _fail(where, f"expected a non-empty list of distinct integers >= 0, got {seeds!r}")
    if not valid:
        raise _fail(where, f"expected a non-empty list of integers >= 0, got {seeds!r}")
    if not distinct:
        raise _fail(where, f"seeds must be distinct, got {seeds!r}")
    return tuple(seeds)


def parse_spec(raw: Any, *, source: str = "", path: str | None = None, require_search: bool = True) -> StudySpec:
    """Validate a loaded YAML document into a StudySpec (no workload or optimizer checks yet).

    ``require_search=False`` accepts a missing or empty ``search`` (a fixed configuration, as a comparison
    reruns it); a study file always needs one."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"study file must be a YAML mapping of settings, got {type(raw).__name__}")
    mapping(raw, "", sorted(TOP_LEVEL), name_unknown=True)
    for key in ("name", "workload", "optimizer"):
        if key not in raw:
            raise _fail(key, "missing (required)")
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise _fail(key, f"expected a non-empty text, got {raw[key]!r}")
    name = raw["name"]
    if any(c in name for c in "/\\\n"):
        raise _fail("name", f"must not contain '/', '\\' or newlines, got {name!r}")
    epochs = raw.get("epochs", 10)
    if not _is_int(epochs) or epochs < 1:
        raise _fail("epochs", f"expected an integer >= 1, got {epochs!r}")
    seeds = seed_list(raw.get("seeds", [0]), "seeds")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, Mapping):
        raise _fail("fixed", f"expected a mapping of settings, got {fixed!r}")
    fixed = nest(dict(_flatten(_numbers_in(dict(fixed)))))
    search_raw = raw.get("search")
    if search_raw is None or (isinstance(search_raw, Mapping) and not search_raw):
        if require_search:
            raise _fail("search", "the search space is empty: give at least one parameter to search")
        search_raw = {}
    if not isinstance(search_raw, Mapping):
        raise _fail("search", f"expected a mapping of parameter -> distribution, got {search_raw!r}")
    search = tuple(_parse_param(str(k), v) for k, v in search_raw.items())
    names = {p.name for p in search}
    by_name = {p.name: p for p in search}
    earlier: set[str] = set()
    for param in search:
        for other, allowed in param.when:
            if other not in names:
                raise _fail(f"search.{param.name}.when", f"refers to {other!r}, which is not a searched parameter")
            if other not in earlier:
                raise _fail(f"search.{param.name}.when", f"refers to {other!r}, which must be listed before it")
            parent = by_name[other]
            for value in allowed:  # a value the parent never takes would leave this parameter never sampled
                if parent.type == "categorical" and value not in parent.choices:
                    raise _fail(f"search.{param.name}.when", f"{other!r} never takes the value {value!r}; "
                                                             f"its choices: {list(parent.choices)}")
                if parent.type != "categorical" and not (_is_number(value) and parent.low <= value <= parent.high):
                    raise _fail(f"search.{param.name}.when", f"{other!r} never takes the value {value!r}; "
                                                             f"its range: [{parent.low}, {parent.high}]")
        earlier.add(param.name)
    flat_fixed = dict(_flatten(fixed))
    clash = sorted(names & set(flat_fixed))
    if clash:
        raise _fail(f"search.{clash[0]}", "is also in 'fixed'; give it in one place")

    objective_raw = mapping(raw.get("objective"), "objective", {"metric", "target_loss", "cost"})
    metric = objective_raw.get("metric")
    _check_objective_metric(metric)
    target = objective_raw.get("target_loss")
    if target is not None:
        target = _number(target, "objective.target_loss")
    if metric == Metrics.TIME_TO_TARGET and target is None:
        raise _fail("objective.target_loss", "required when objective.metric is time_to_target")
    cost = objective_raw.get("cost")
    if cost is not None and cost not in COSTS:
        raise _fail("objective.cost", f"expected one of {list(COSTS)} or null, got {cost!r}")
    objective = Objective(metric, target, cost, OBJECTIVES.get(metric))

    budget = mapping(raw.get("budget"), "budget", {"trials", "timeout"})
    trials = budget.get("trials", 20)
    if not _is_int(trials) or trials < 1:
        raise _fail("budget.trials", f"expected an integer >= 1, got {trials!r}")
    timeout = budget.get("timeout")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        raise _fail("budget.timeout", f"expected a number of seconds > 0 or null, got {timeout!r}")

    sampler = mapping(raw.get("sampler"), "sampler", {"name", "seed", "n_startup_trials"})
    sampler.setdefault("name", "tpe")
    if sampler["name"] not in SAMPLERS:
        raise _fail("sampler.name", f"expected one of {list(SAMPLERS)}, got {sampler['name']!r}")
    if "seed" in sampler and not (_is_int(sampler["seed"]) and sampler["seed"] >= 0):
        raise _fail("sampler.seed", f"expected an integer >= 0, got {sampler['seed']!r}")
    if sampler["name"] == "grid":
        for param in search:
            if param.type != "categorical":
                raise _fail(f"search.{param.name}", "the grid sampler needs categorical parameters (give 'choices')")
    if sampler["name"] == "cmaes" and any(p.type == "categorical" or p.when for p in search):
        pass  # Optuna's CMA-ES falls back to random sampling for these; allowed.
    pruner = mapping(raw.get("pruner"), "pruner", {"name", "n_startup_trials", "n_warmup_steps", "min_resource",
                                                    "reduction_factor", "percentile"})
    pruner.setdefault("name", "median")
    if pruner["name"] not in PRUNERS:
        raise _fail("pruner.name", f"expected one of {list(PRUNERS)}, got {pruner['name']!r}")
    for key in ("n_startup_trials", "n_warmup_steps", "min_resource", "reduction_factor"):
        if key in pruner and not (_is_int(pruner[key]) and pruner[key] >= 0):
            raise _fail(f"pruner.{key}", f"expected an integer >= 0, got {pruner[key]!r}")
    if "percentile" in pruner:
        if pruner["name"] != "percentile":
            raise _fail("pruner.percentile", "only used by pruner: {name: percentile}")
        if not _is_number(pruner["percentile"]) or not 0 < pruner["percentile"] < 100:
            raise _fail("pruner.percentile", f"expected a number in (0, 100), got {pruner['percentile']!r}")
    if cost is not None and pruner["name"] != "none":
        raise _fail("pruner.name", "a study with a cost objective is multi-objective, which Optuna cannot prune: "
                                   "set pruner: {name: none}")

    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage.strip()):
        raise _fail("storage", f"expected a storage URL (sqlite:///..., postgresql://..., journal:PATH) or null, "
                               f"got {storage!r}")
    resources = mapping(raw.get("resources"), "resources", {"cpu", "gpu"})
    for key, value in resources.items():
        if not _is_number(value) or value < 0:
            raise _fail(f"resources.{key}", f"expected a number >= 0 (fractions allowed), got {value!r}")
    resources = {"cpu": float(resources.get("cpu", 1.0)), "gpu": float(resources.get("gpu", 0.0))}
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail("description", f"expected text, got {description!r}")
    data_dir = raw.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise _fail("data_dir", f"expected a folder path, got {data_dir!r}")
    return StudySpec(
        workload_path=_workload_path(raw.get("workload_path"), path),
        name=name, workload=raw["workload"], optimizer=raw["optimizer"], epochs=epochs, seeds=seeds,
        fixed=fixed, search=search, objective=objective, trials=trials, timeout=timeout, sampler=sampler,
        pruner=pruner, storage=storage, description=description, resources=resources, data_dir=data_dir,
        source=source, path=path,
    )


def _check_objective_metric(metric: Any) -> None:
    """``val_loss``, ``train_loss``, ``time_to_target`` or ``val_<metric>``; a test metric is refused: selecting on
    the test split makes the numbers it reports optimistic."""
    if metric is None or metric in OBJECTIVES:
        return
    if isinstance(metric, str) and metric.startswith(TEST_PREFIX):
        raise _fail("objective.metric", f"{metric!r} would select on the test split; use "
                                        f"{VALIDATION_PREFIX + metric.removeprefix(TEST_PREFIX)!r} (test metrics are "
                                        f"reported by fuse-tune compare's reruns and fuse-tune train)")
    if not (isinstance(metric, str) and metric.startswith(VALIDATION_PREFIX)
            and metric.removeprefix(VALIDATION_PREFIX).isidentifier()):
        raise _fail("objective.metric", f"expected one of {sorted(OBJECTIVES)} or val_<the workload's metric> "
                                        f"(val_accuracy, val_mse, ...), got {metric!r}")


def _workload_path(raw: Any, path: str | None) -> tuple[str, ...]:
    """The folders a ``package.module:builder`` workload is imported from: ``workload_path`` entries relative to
    the study file's folder, which comes first by default (the current folder for a study given as a dict)."""
    base = Path(path).resolve().parent if path else Path.cwd()
    if raw is None:
        return (str(base),)
    entries = [raw] if isinstance(raw, str) else raw
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise _fail("workload_path", f"expected a folder or a list of folders, got {raw!r}")
    return tuple(str((base / entry).resolve()) for entry in entries)


def read_yaml(path: Path, kind: str = "study") -> tuple[str, Any]:
    """The text and the parsed YAML document of a ``kind`` file (study, comparison); one-line SpecErrors."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such {kind} file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the {kind} file ({type(exc).__name__})") from None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None


def read_spec(path: str | Path) -> StudySpec:
    """Read and parse a study file, without the dry run (no torch); errors are one-line SpecErrors naming the
    file. :func:`fuse_tune.trial.load_spec` reads and checks."""
    path = Path(path)
    text, raw = read_yaml(path, "study")
    try:
        return parse_spec(raw, source=text, path=str(path.resolve()))
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
