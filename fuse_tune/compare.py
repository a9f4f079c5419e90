"""Fair method comparisons: every method tuned alike, then its best configuration rerun on fresh paired seeds.

    fuse-tune compare studies/compare/digits_logreg.yaml [--n-jobs 2] [--out results/digits_logreg]

A comparison file names one workload and epoch budget, the settings every method shares, one tuning
recipe (sampler, number of trials, tuning seeds, pruner) and, per method, its own fixed settings and
search space::

    name: compare_digits_logreg
    workload: digits-logreg
    epochs: 10
    fixed: {batch_size: 64}                      # shared by every method
    objective: {metric: val_accuracy}           # default: val_<the workload's metric>; selection never sees test
    tuning: {trials: 12, seeds: [0, 1], sampler: {name: tpe, seed: 0, n_startup_trials: 6}, pruner: {name: none}}
    rerun: {seeds: [100, 101, ..., 109]}         # disjoint from the tuning seeds
    methods:
      adam: {search: {lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}}}
      fuse_pv: {fixed: {line_search: armijo}, search: {lr: ..., switch.epoch: ...}}
      sgd: {fixed: {lr: 0.01}}                   # no search: the fixed setting is rerun as is

What :func:`run_comparison` does:

1. Each method becomes an ordinary study file, ``<out>/studies/<name>-<method>.yaml`` (written, then
   loaded and dry-run-checked like any study, so a bad setting fails before anything trains, naming
   ``methods.<method>.<field>``). A method with a search space is tuned by the Optuna backend
   (:func:`fuse_tune.optuna_backend.run_study`): same sampler and seed, same number of finished trials,
   same epochs, same tuning seeds for every method. Its MLflow experiment is ``<name>-<method>``. An
   interrupted comparison resumes: finished trials are kept, the budget is completed.
2. The best tuning trial's configuration (or the fixed settings of a method without a search) is
   trained on every rerun seed (the seeds advance together, :class:`fuse_tune.trial.SeedRuns`) and
   logged as one child run of the MLflow experiment ``<name>``, under a parent run for the comparison.
   A method whose rerun of that same configuration is already complete there is not trained again.
3. The results table (:func:`dashboards.tables.comparison_table`, read back from MLflow): per method,
   mean and std over the rerun seeds of the final test metric and training loss, gradient
   evaluations, training wall time and the switch epoch, with the tuned settings; the median and the best
   seed of the test metric; with ``fixed.metric_targets`` (``{test_l2re: [0.1, 0.01]}``) the evaluations
   and time each method took to reach each target (:func:`dashboards.tables.target_table`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fuse_tune.errors import UserError
from fuse_tune.optimizers import OPTIMIZERS
from fuse_tune.records import (
    STATE_COMPLETE,
    StudyParams,
    Tags,
    flatten_params,
    redact,
    tag_equals,
)
from fuse_tune.spec import (
    SpecError,
    StudySpec,
    _fail,
    _flatten,
    _is_int,
    _workload_path,
    mapping,
    nest,
    parse_spec,
    read_spec,
    read_yaml,
    seed_list,
)
from fuse_tune.tracking import MlflowTracker, fail_trial_run

__all__ = ["Comparison", "MethodPlan", "load_comparison", "method_study", "run_comparison", "ROLE_TAG"]

TOP_LEVEL = ("name", "description", "workload", "workload_path", "epochs", "data_dir", "fixed", "objective", "tuning",
             "rerun",
             "methods")
TUNING_KEYS = ("trials", "seeds", "sampler", "pruner")
METHOD_KEYS = ("fixed", "search")
ROLE_TAG = Tags.COMPARISON  # tag on the rerun runs: the comparison's name


@dataclass(frozen=True)
class Comparison:
    """A validated comparison file."""

    name: str
    workload: str
    epochs: int
    fixed: dict[str, Any]
    objective: dict[str, Any]
    tuning: dict[str, Any]
    rerun_seeds: tuple[int, ...]
    methods: dict[str, dict[str, Any]]
    description: str = ""
    data_dir: str | None = None
    path: str | None = None
    workload_path: tuple[str, ...] = ()

    @property
    def metric_targets(self) -> dict[str, list[float]]:
        """The shared ``fixed.metric_targets`` (``{"test_l2re": [0.1, 0.01]}``): the results' time-to-target table,
        read as the trainer reads it (:func:`fuse_tune.train.target_values`)."""
        from fuse_tune.train import target_values  # torch: only once a comparison has run

        return target_values(nest(dict(_flatten(self.fixed))).get("metric_targets", {}))


@dataclass
class MethodPlan:
    """One method of a comparison: its study file, and after tuning the configuration that is rerun."""

    method: str
    study_path: Path
    spec: StudySpec
    settings: dict[str, Any] = field(default_factory=dict)
    best_trial: int | None = None
    tuning_value: float | None = None

    @property
    def tuned(self) -> bool:
        return bool(self.spec.search)


def _seeds(raw: Any, where: str) -> tuple[int, ...]:
    return seed_list(raw, where, one_message=True)


def _mapping(raw: Any, where: str, accepted: Sequence[str] | None = None) -> dict[str, Any]:
    return mapping(raw, where, accepted, name_unknown=True)


def parse_comparison(raw: Any, *, path: str | None = None) -> Comparison:
    """Validate a loaded comparison document (the per-method studies are checked by :func:`load_comparison`)."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"comparison file must be a YAML mapping of settings, got {type(raw).__name__}")
    raw = _mapping(raw, "", TOP_LEVEL)
    for key in ("name", "workload"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise _fail(key, f"missing or empty (required text), got {raw.get(key)!r}")
    if any(c in raw["name"] for c in "/\\\n"):
        raise _fail("name", f"must not contain '/', '\\' or newlines, got {raw['name']!r}")
    epochs = raw.get("epochs", 10)
    if not _is_int(epochs) or epochs < 1:
        raise _fail("epochs", f"expected an integer >= 1, got {epochs!r}")
    tuning = _mapping(raw.get("tuning"), "tuning", TUNING_KEYS)
    trials = tuning.get("trials", 12)
    if not _is_int(trials) or trials < 1:
        raise _fail("tuning.trials", f"expected an integer >= 1, got {trials!r}")
    tuning_seeds = _seeds(tuning.get("seeds", [0, 1]), "tuning.seeds")
    rerun = _mapping(raw.get("rerun"), "rerun", ("seeds",))
    rerun_seeds = _seeds(rerun.get("seeds", list(range(100, 110))), "rerun.seeds")
    overlap = sorted(set(tuning_seeds) & set(rerun_seeds))
    if overlap:
        raise _fail("rerun.seeds", f"must be disjoint from tuning.seeds (a rerun on a tuning seed favours the method "
                                   f"tuned on it); both have {overlap}")
    methods_raw = raw.get("methods")
    if not isinstance(methods_raw, Mapping) or not methods_raw:
        raise _fail("methods", f"expected a mapping of optimizer name -> {{fixed, search}}, got {methods_raw!r}")
    methods: dict[str, dict[str, Any]] = {}
    for method, entry in methods_raw.items():
        if method not in OPTIMIZERS:
            raise _fail(f"methods.{method}", f"unknown optimizer; accepted: {sorted(OPTIMIZERS)}")
        entry = _mapping(entry, f"methods.{method}", METHOD_KEYS)
        methods[method] = {"fixed": _mapping(entry.get("fixed"), f"methods.{method}.fixed"),
                           "search": _mapping(entry.get("search"), f"methods.{method}.search")}
    fixed = _mapping(raw.get("fixed"), "fixed")
    data_dir = raw.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise _fail("data_dir", f"expected a folder path, got {data_dir!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail("description", f"expected text, got {description!r}")
    sampler = _mapping(tuning.get("sampler"), "tuning.sampler") or {"name": "tpe", "seed": 0}
    return Comparison(name=raw["name"], workload=raw["workload"], epochs=epochs, fixed=fixed,
                      objective=_mapping(raw.get("objective"), "objective"),
                      tuning={"trials": trials, "seeds": list(tuning_seeds),
                              "sampler": sampler,
                              "pruner": _mapping(tuning.get("pruner"), "tuning.pruner") or {"name": "none"}},
                      rerun_seeds=rerun_seeds, methods=methods, description=description, data_dir=data_dir,
                      path=path, workload_path=_workload_path(raw.get("workload_path"), path))


def method_study(comparison: Comparison, method: str) -> dict[str, Any]:
    """The study file (as a dict) that tunes ``method``: the comparison's shared settings, the method's own."""
    entry = comparison.methods[method]
    fixed = nest({**dict(_flatten(comparison.fixed)), **dict(_flatten(entry["fixed"]))})
    study: dict[str, Any] = {
        "name": f"{comparison.name}-{method}",
        "description": f"{method} on {comparison.workload}: tuning for the comparison {comparison.name}",
        "workload": comparison.workload, "optimizer": method, "epochs": comparison.epochs,
        "seeds": list(comparison.tuning["seeds"]), "fixed": fixed, "objective": dict(comparison.objective),
        "budget": {"trials": comparison.tuning["trials"]}, "sampler": dict(comparison.tuning["sampler"]),
        "pruner": dict(comparison.tuning["pruner"]),
    }
    if ":" in comparison.workload:  # a user's builder: found from the comparison file's folders, not the study's
        study["workload_path"] = list(comparison.workload_path)
    if comparison.data_dir is not None:
        study["data_dir"] = comparison.data_dir  # a relative folder is read from where fuse-tune runs
    if entry["search"]:
        study["search"] = entry["search"]
    return study


def _write_study(comparison: Comparison, method: str, directory: Path) -> Path:
    path = directory / f"{comparison.name}-{method}.yaml"
    study = method_study(comparison, method)
    header = (f"# Written by `fuse-tune compare {comparison.path or comparison.name}`: the study that tunes {method}\n"
              f"# for that comparison. Edit the comparison file, not this one (it is written again each run).\n")
    if not comparison.methods[method]["search"]:
        header += "# No search space: the comparison reruns these fixed settings as they are (no tuning).\n"
    text = header + yaml.safe_dump(study, sort_keys=False, default_flow_style=None, width=110)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def load_comparison(path: str | Path, out_dir: str | Path, *, data_dir: str | None = None
                    ) -> tuple[Comparison, list[MethodPlan]]:
    """Read and validate a comparison file, write each method's study file under ``<out_dir>/studies`` and
    dry-run-check it; errors are one-line :class:`SpecError` naming ``methods.<method>.<field>``. ``data_dir``
    (made absolute) replaces the file's ``data_dir``."""
    path = Path(path)
    _, raw = read_yaml(path, "comparison")
    try:
        comparison = parse_comparison(raw, path=str(path.resolve()))
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    if data_dir is not None:
        comparison = dataclasses.replace(comparison, data_dir=str(Path(data_dir).resolve()))
    studies = Path(out_dir) / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    plans = []
    for method in comparison.methods:
        study_path = _write_study(comparison, method, studies)
        try:
            if comparison.methods[method]["search"]:
                spec = read_spec(study_path)
            else:
                spec = parse_spec(method_study(comparison, method), path=str(study_path), require_search=False)
            from fuse_tune.trial import check_spec  # the dry run, after parsing (torch is imported here)

            spec = check_spec(spec)  # with its objective resolved against the workload
        except SpecError as exc:
            message = str(exc).removeprefix(f"{study_path}: ")
            where = message.split(":", 1)[0]
            if where.startswith(("fixed", "search")):  # a method's own field, else one the methods share
                message = f"methods.{method}.{message}"
            raise SpecError(f"{path}: {message} (method {method})") from None
        plans.append(MethodPlan(method, study_path, spec))
    return comparison, plans


# ------------------------------------------------------------------ running


def _tune(plan: MethodPlan, *, n_jobs: int, storage: str | None, tracking_uri: str, threads: int | None,
          device: str | None, progress: bool) -> None:
    """Tune one method to the comparison's trial budget; keep its best trial's configuration."""
    from fuse_tune.optuna_backend import run_study

    spec = plan.spec
    summary = run_study(spec, n_jobs=n_jobs, storage=storage, tracking_uri=tracking_uri, threads=threads,
                        device=device, progress=progress)
    best = summary.best_rows(limit=1)
    if not best:
        raise RuntimeError(f"methods.{plan.method}: no tuning trial finished (all pruned or failed); "
                           f"see the MLflow experiment {spec.name}")
    plan.best_trial, plan.tuning_value = best[0]["trial"], float(best[0]["value"])
    plan.settings = spec.configuration(best[0]["params"])


def rerun_spec(comparison: Comparison, plan: MethodPlan) -> StudySpec:
    """The tuned study with the chosen configuration fixed, on the rerun seeds."""
    spec = plan.spec
    settings = plan.settings if plan.tuned else spec.configuration({})
    return dataclasses.replace(spec, name=comparison.name, seeds=comparison.rerun_seeds, fixed=settings, search=())


def _find_rerun(tracker: MlflowTracker, comparison: Comparison, method: str, params: Mapping[str, str]) -> str | None:
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=" and ".join((tag_equals(ROLE_TAG, comparison.name), tag_equals(Tags.OPTIMIZER, method),
                                    tag_equals(Tags.STATE, STATE_COMPLETE))))
    wanted = {k: redact(v) for k, v in params.items()}
    seeds = ",".join(map(str, comparison.rerun_seeds))
    for run in runs:
        if run.data.params == wanted and run.data.tags.get(Tags.SEEDS) == seeds:
            return run.info.run_id
    return None


def _rerun(comparison: Comparison, plan: MethodPlan, index: int, parent_run_id: str, tracking_uri: str,
           threads: int | None, device: str | None) -> str:
    """Train one method's configuration on every rerun seed, logged as a child run; returns its run id."""
    import torch

    from fuse_tune.trial import log_outcome, run_trial, trial_tags

    if threads is not None:
        torch.set_num_threads(threads)
    spec = rerun_spec(comparison, plan)
    tracker = MlflowTracker(tracking_uri, experiment=comparison.name)
    found = _find_rerun(tracker, comparison, plan.method, flatten_params(spec.fixed))
    if found is not None:
        return found
    tags = {**trial_tags(spec, spec.fixed, index, "compare"), ROLE_TAG: comparison.name,
            Tags.TUNING_STUDY: f"{comparison.name}-{plan.method}" if plan.tuned else "none (fixed settings)"}
    if plan.best_trial is not None:
        tags.update({Tags.TUNING_BEST_TRIAL: plan.best_trial, Tags.TUNING_VALUE: plan.tuning_value})
    run = tracker.start_trial(parent_run_id, f"{comparison.name}-{plan.method}", spec.fixed, tags)
    try:
        outcome = run_trial(spec, {}, run=run, threads=threads, device=device, evaluate_test=True)
    except BaseException as exc:
        fail_trial_run(run, exc)
        raise
    log_outcome(run, outcome, spec)
    run.finish("FINISHED")
    return run.run_id


def run_comparison(path: str | Path, *, out_dir: str | Path, n_jobs: int = 1, storage: str | None = None,
                   tracking_uri: str, threads: int | None = None, device: str | None = None,
                   data_dir: str | None = None, progress: bool = True) -> tuple[Comparison, list[MethodPlan], str]:
    """Tune every method, rerun each best configuration on the rerun seeds; returns the plans and the parent run."""
    if n_jobs < 1:
        raise UserError(f"--n-jobs must be >= 1, got {n_jobs}")
    if not tracking_uri:
        raise UserError("--mlflow-uri: a comparison logs its reruns to MLflow and reads its table from there; "
                         "give a tracking URI (default sqlite:///$PWD/mlflow.db)")
    comparison, plans = load_comparison(path, out_dir, data_dir=data_dir)
    for plan in plans:
        if plan.tuned:
            _tune(plan, n_jobs=n_jobs, storage=storage, tracking_uri=tracking_uri, threads=threads, device=device,
                  progress=progress)
    tracker = MlflowTracker(tracking_uri, experiment=comparison.name)
    params = {StudyParams.WORKLOAD: comparison.workload, StudyParams.EPOCHS: comparison.epochs,
              StudyParams.SEEDS: ",".join(map(str, comparison.rerun_seeds)),
              StudyParams.OBJECTIVE: plans[0].spec.objective.metric,
              StudyParams.OBJECTIVE_DIRECTION: plans[0].spec.objective.direction,
              StudyParams.METHODS: ",".join(comparison.methods), StudyParams.TRIALS: comparison.tuning["trials"],
              StudyParams.TUNING_SEEDS: ",".join(map(str, comparison.tuning["seeds"])),
              StudyParams.SAMPLER: comparison.tuning["sampler"].get("name", "tpe"), StudyParams.FIXED: comparison.fixed}
    tags = {Tags.WORKLOAD: comparison.workload, Tags.BACKEND: "compare", ROLE_TAG: comparison.name}
    parent = tracker.start_study(comparison.name, tags=tags, params=params, artifact=comparison.path)
    status = "KILLED"
    try:
        rerun_threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // n_jobs)
        jobs = [(comparison, plan, index, parent, tracking_uri, rerun_threads, device)
                for index, plan in enumerate(plans)]
        if n_jobs == 1:
            for job in jobs:
                _rerun(*job)
        else:  # one method per worker process, like the Optuna backend's workers
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs)),
                                                        mp_context=context) as pool:
                for future in [pool.submit(_rerun, *job) for job in jobs]:
                    future.result()
        status = "FINISHED"
    finally:
        tracker.finish_study(parent, status)
    return comparison, plans, parent


