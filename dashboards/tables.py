"""Pure functions: the tidy table (:func:`dashboards.data.tidy`) -> the small table one plot draws.

Each function here computes exactly what one renderer in :mod:`dashboards.plots` draws, and nothing is drawn
here (Optuna's visualization habit: data first, then a thin backend). When a table has nothing to draw it is
returned empty with a one-line reason in ``table.attrs["reason"]``; a table drawn from part of what was asked
for carries a one-line ``table.attrs["note"]``.

Conventions shared by all of them:

* ``metric=None`` means the study's objective metric (the ``objective`` column), or ``train_loss`` where the
  objective is not a per-epoch metric (``time_to_target``);
* a trial's *final* value of a metric is its value at the last epoch logged for that seed; only
  ``state == "complete"`` trials are compared (a pruned trial's last epoch is not the study's last epoch);
* a std over seeds is :func:`fuse_tune.records.seed_std` (the sample std, ddof 1; NaN for one seed), the
  definition the trials record too;
* ``epochs_completed = epoch + 1``: the logged value at MLflow step ``e`` measures the end of epoch ``e``, and a
  trial whose ``switch_epoch`` is ``k`` ran its first ``k`` epochs in the Adam phase, so the switch sits at
  ``epochs_completed = k`` on the same axis.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fuse_tune.records import MAXIMIZE, STATE_COMPLETE, TEST_PREFIX, VALIDATION_PREFIX, Metrics, seed_std, short_value
from fuse_tune.records import direction as objective_direction

__all__ = ["THRESHOLDS", "empty", "objective_of", "final_values", "sensitivity_table", "seed_variance_table",
           "learning_curve_table", "evaluation_curve_table", "theta_schedule_table", "history_batch_table",
           "switch_ecdf_table",
           "performance_profile_table", "importance_table", "best_configurations", "comparison_table",
           "comparison_markdown", "COMPARISON_METRICS", "comparison_metrics",
           "test_counterpart", "reported_of", "paired_differences", "paired_markdown", "target_table",
           "target_markdown"]

#: switch criterion -> the parameter that sets its threshold, and whether its axis is logarithmic
THRESHOLDS: dict[str, tuple[str, bool]] = {"epoch": ("switch.epoch", False), "step": ("switch.step", False),
                                           "grad_norm": ("switch.zeta", True), "loss_change": ("switch.sigma", True),
                                           "plateau": ("switch.ratio", True), "probe": ("switch.ratio", True)}

_IDENTITY = ["study", "workload", "optimizer", "trial", "run_id", "variant", "criterion", "state", "seed",
             "switch_epoch"]


def empty(reason: str, columns: Sequence[str] = ()) -> pd.DataFrame:
    """An empty table that says why it is empty."""
    table = pd.DataFrame(columns=list(columns))
    table.attrs["reason"] = reason
    return table


def _studies(table: pd.DataFrame) -> str:
    names = sorted(table["study"].unique()) if "study" in table and len(table) else []
    return ", ".join(names) if names else "the runs"


def reported_of(table: pd.DataFrame) -> str:
    """What a report shows as the final result: the test split's counterpart of the objective where the runs
    logged it (a comparison's reruns: ``val_accuracy`` selected, ``test_accuracy`` reported), else the objective
    (a study's trials never evaluate the test split)."""
    objective = objective_of(table)
    test = test_counterpart(objective)
    return test if test is not None and "metric" in table and test in set(table["metric"]) else objective


def objective_of(table: pd.DataFrame) -> str:
    """The study's objective metric (the first one, if the table's studies differ), as a per-epoch metric:
    ``time_to_target`` is not one, so those studies are drawn with ``train_loss``. An objective no run logged
    is still returned, so that the plots needing it say so instead of drawing something else."""
    for name in table["objective"].dropna().unique() if "objective" in table else []:
        if name != Metrics.TIME_TO_TARGET:
            return str(name)
    return Metrics.TRAIN_LOSS


def _metric_rows(table: pd.DataFrame, metric: str, states: Sequence[str] | None = (STATE_COMPLETE,)
                 ) -> tuple[pd.DataFrame, str | None]:
    """Rows of ``metric`` (of trials in ``states``), or an empty frame and the reason."""
    if table.empty:
        return table, f"no per-epoch metrics in {_studies(table)}"
    rows = table[table["metric"] == metric]
    if rows.empty:
        logged = ", ".join(sorted(table["metric"].unique()))
        return rows, f"{metric} is not logged by any run of {_studies(table)} (logged: {logged})"
    if states is not None:
        kept = rows[rows["state"].isin(states)]
        if kept.empty:
            counts = rows.drop_duplicates("run_id")["state"].value_counts().to_dict()
            return kept, (f"no {'/'.join(states)} trial has {metric} in {_studies(table)} (trials by state: "
                          f"{counts})")
        rows = kept
    return rows, None


def final_values(table: pd.DataFrame, metric: str | None = None,
                 states: Sequence[str] | None = (STATE_COMPLETE,)) -> pd.DataFrame:
    """One row per (trial, seed): the value of ``metric`` at the last logged epoch (``final_epoch``), with the
    identity columns (study ... switch_epoch) and the ``param.*`` columns."""
    metric = metric or objective_of(table)
    rows, reason = _metric_rows(table, metric, states)
    if reason:
        return empty(reason)
    last = rows.loc[rows.groupby(["run_id", "seed"], sort=False)["epoch"].idxmax()]
    params = [c for c in table.columns if c.startswith("param.")]
    out = last[_IDENTITY + ["epoch", "value"] + params].rename(columns={"epoch": "final_epoch"})
    out.insert(len(_IDENTITY), "metric", metric)
    return out.sort_values(["study", "trial", "seed"]).reset_index(drop=True)


def _direction(table: pd.DataFrame, metric: str) -> str:
    return objective_direction(metric)


def _rank_variants(finals: pd.DataFrame, metric: str, by: Sequence[str] = ("study",)) -> pd.DataFrame:
    """Per (``by``, variant): mean and std over seeds, rank 1 = best mean for the metric's direction."""
    maximize = _direction(finals, metric) == MAXIMIZE
    stats = finals.groupby([*by, "variant"], sort=False).agg(mean=("value", "mean"), trial=("trial", "min"))
    stats = stats.reset_index()
    stats["key"] = -stats["mean"] if maximize else stats["mean"]
    stats = stats.sort_values([*by, "key", "trial"])
    stats["rank"] = stats.groupby(list(by)).cumcount() + 1
    return stats.drop(columns="key")


# ------------------------------------------------------------------ one table per plot


def sensitivity_table(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Final ``metric`` per (complete trial, seed) against its criterion's threshold parameter.

    Columns: study, criterion, threshold_name (``switch.zeta``, ...), threshold (float), log_x (bool), trial,
    variant, seed, switch_epoch (observed), value, metric. Criteria without a threshold parameter in the runs
    (``never``, ``any``/``all``) are left out."""
    metric = metric or objective_of(table)
    finals = final_values(table, metric)
    if finals.empty:
        return empty(finals.attrs["reason"])
    parts = []
    for criterion, (name, log) in THRESHOLDS.items():
        column = f"param.{name}"
        if column not in finals:
            continue
        rows = finals[(finals["criterion"] == criterion) & finals[column].notna()]
        if rows.empty:
            continue
        part = rows[["study", "criterion", "trial", "variant", "seed", "switch_epoch", "value"]].copy()
        part.insert(2, "threshold_name", name)
        part.insert(3, "threshold", pd.to_numeric(rows[column], errors="coerce").astype(float))
        part.insert(4, "log_x", log)
        parts.append(part[part["threshold"].notna()])
    parts = [p for p in parts if not p.empty]
    if not parts:
        found = sorted(c for c in finals["criterion"].unique() if c) or ["none"]
        return empty(f"no complete trial of {_studies(table)} has a switch threshold to vary (criteria: "
                     f"{', '.join(found)}; thresholds: {', '.join(n for n, _ in THRESHOLDS.values())})")
    out = pd.concat(parts, ignore_index=True)
    out["metric"] = metric
    return out


def seed_variance_table(table: pd.DataFrame, metric: str | None = None, top: int = 12) -> pd.DataFrame:
    """Final ``metric`` per (complete trial, seed) for the ``top`` variants of each workload by mean over seeds
    (rank 1 = best). Columns: workload, study, optimizer, variant, trial, seed, value, rank, metric."""
    metric = metric or reported_of(table)
    finals = final_values(table, metric)
    if finals.empty:
        return empty(finals.attrs["reason"])
    ranks = _rank_variants(finals, metric, by=("workload",))
    keep = ranks[ranks["rank"] <= top][["workload", "variant", "rank"]]
    out = finals.merge(keep, on=["workload", "variant"])
    out = out[["workload", "study", "optimizer", "variant", "trial", "seed", "value", "rank"]].copy()
    out["metric"] = metric
    out = out.sort_values(["workload", "rank", "seed"]).reset_index(drop=True)
    shown = out["variant"].nunique()
    total = finals["variant"].nunique()
    if shown < total:
        out.attrs["note"] = f"seed variance: the best {top} of {total} configurations per workload are shown"
    return out


def learning_curve_table(table: pd.DataFrame, metrics: Sequence[str] | None = None,
                         top: int = 4, rank_metric: str | None = None) -> pd.DataFrame:
    """Per-epoch ``metrics`` (default: the training loss and the objective) of the ``top`` complete variants of
    each study (ranked by final ``rank_metric``, the objective by default). Columns: study, variant, trial, seed,
    metric, epochs_completed, value, switch_epoch, phase, rank. Metrics no run logged are left out
    (``attrs["note"]`` names them)."""
    if table.empty:
        return empty(f"no per-epoch metrics in {_studies(table)}")
    rank_metric = rank_metric or objective_of(table)
    if metrics is None:
        metrics = list(dict.fromkeys((Metrics.TRAIN_LOSS, objective_of(table), reported_of(table))))
    finals = final_values(table, rank_metric)
    if finals.empty:
        return empty(finals.attrs["reason"])
    logged = set(table["metric"].unique())
    present = [m for m in metrics if m in logged]
    missing = [m for m in metrics if m not in logged]
    if not present:
        return empty(f"{', '.join(metrics)}: not logged by any run of {_studies(table)}")
    ranks = _rank_variants(finals, rank_metric)
    keep = ranks[ranks["rank"] <= top][["study", "variant", "rank"]]
    complete = table[table["metric"].isin(present) & (table["state"] == STATE_COMPLETE)]
    rows = complete.merge(keep, on=["study", "variant"])
    out = rows[["study", "variant", "trial", "seed", "metric", "epoch", "value", "switch_epoch", "phase", "rank"]]
    out = out.rename(columns={"epoch": "epochs_completed"}).copy()
    out["epochs_completed"] = out["epochs_completed"] + 1
    out = out.sort_values(["study", "rank", "metric", "seed", "epochs_completed"]).reset_index(drop=True)
    if missing:
        out.attrs["note"] = f"learning curves: {', '.join(missing)} not logged by any run of {_studies(table)}"
    return out


def evaluation_curve_table(table: pd.DataFrame, metric: str | None = None, top: int = 8) -> pd.DataFrame:
    """The reported metric (default: the test counterpart of the objective where logged, else the objective)
    against gradient evaluations, per seed and epoch, for the ``top`` complete variants of each study (all the
    methods of a comparison): the x axis on which methods are compared at equal cost (a torch L-BFGS step is up to
    25 evaluations, an Adam step one). Columns: study, variant, trial, seed, metric, epochs_completed, grad_evals,
    value, switch_epoch, switched (this epoch's end is the switch: the last point of the Adam phase), rank."""
    metric = metric or reported_of(table)
    curves = learning_curve_table(table, [metric, Metrics.GRAD_EVALS], top=top)
    if curves.empty:
        return curves
    if not {metric, Metrics.GRAD_EVALS} <= set(curves["metric"]):
        missing = metric if metric not in set(curves["metric"]) else Metrics.GRAD_EVALS
        return empty(f"{missing} is not logged by any complete run of {_studies(table)}")
    keys = ["study", "variant", "trial", "seed", "epochs_completed"]
    wide = curves.pivot_table(index=keys, columns="metric", values="value").dropna().reset_index()
    extra = curves.drop_duplicates(keys)[[*keys, "switch_epoch", "rank"]]
    out = wide.merge(extra, on=keys).rename(columns={metric: "value", Metrics.GRAD_EVALS: "grad_evals"})
    out.insert(4, "metric", metric)
    out["switched"] = out["epochs_completed"] == out["switch_epoch"]
    out.columns.name = None
    return out.sort_values(["study", "rank", "seed", "epochs_completed"]).reset_index(drop=True)[
        ["study", "variant", "trial", "seed", "metric", "epochs_completed", "grad_evals", "value", "switch_epoch",
         "switched", "rank"]]


def theta_schedule_table(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Per-epoch ``metric`` of complete trials with a ``theta.schedule`` parameter (FUSE).

    Columns: study, schedule, variant, trial, seed, epochs_completed, value, final (bool: the seed's last
    epoch), best (bool: the trial with the best final mean of its schedule), metric."""
    metric = metric or objective_of(table)
    if "param.theta.schedule" not in table:
        return empty(f"no trial of {_studies(table)} has a theta.schedule parameter (FUSE studies do)")
    rows, reason = _metric_rows(table[table["param.theta.schedule"].notna()], metric)
    if reason:
        return empty(reason)
    out = rows[["study", "param.theta.schedule", "variant", "trial", "seed", "epoch", "value"]].rename(
        columns={"param.theta.schedule": "schedule", "epoch": "epochs_completed"}).copy()
    out["epochs_completed"] = out["epochs_completed"] + 1
    last = out.groupby(["trial", "study", "seed"])["epochs_completed"].transform("max")
    out["final"] = out["epochs_completed"] == last
    means = out[out["final"]].groupby(["study", "schedule", "trial"])["value"].mean().reset_index()
    maximize = _direction(out, metric) == MAXIMIZE
    means = means.sort_values(["study", "schedule", "value", "trial"], ascending=[True, True, not maximize, True])
    best = means.groupby(["study", "schedule"]).head(1)[["study", "trial"]]
    out["best"] = out.set_index(["study", "trial"]).index.isin(best.set_index(["study", "trial"]).index)
    out["metric"] = metric
    return out.sort_values(["study", "schedule", "trial", "seed", "epochs_completed"]).reset_index(drop=True)


def history_batch_table(table: pd.DataFrame, metric: str | None = None, row: str = "history_size",
                        column: str = "batch_size_after_switch") -> pd.DataFrame:
    """Mean final ``metric`` over seeds and trials per (``row``, ``column``) parameter cell, complete trials.
    Columns: the two parameter names, value (mean), std (:func:`seed_std` over seeds and trials; 0 for one
    value), n (values)."""
    metric = metric or objective_of(table)
    missing = [name for name in (row, column) if f"param.{name}" not in table]
    if missing:
        return empty(f"no trial of {_studies(table)} has the parameter(s) {', '.join(missing)}")
    finals = final_values(table, metric)
    if finals.empty:
        return empty(finals.attrs["reason"])
    cells = finals[[f"param.{row}", f"param.{column}", "value"]].dropna()
    cells = cells.rename(columns={f"param.{row}": row, f"param.{column}": column})
    if cells.empty:
        return empty(f"no complete trial of {_studies(table)} sets both {row} and {column}")
    out = cells.groupby([row, column]).agg(value=("value", "mean"), std=("value", seed_std), n=("value", "size"))
    out = out.reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["metric"] = metric
    return out


def switch_ecdf_table(table: pd.DataFrame) -> pd.DataFrame:
    """Empirical CDF of the observed switch epoch per criterion over complete (trial, seed) runs.

    ``fraction`` at ``switch_epoch = k`` is the share of *all* the criterion's runs that had switched after
    ``k`` epochs, so a curve tops out at the share that switched at all. Columns: criterion, switch_epoch,
    fraction, n_switched, n_runs."""
    if table.empty:
        return empty(f"no per-epoch metrics in {_studies(table)}")
    runs = table[(table["state"] == STATE_COMPLETE) & (table["criterion"] != "")].drop_duplicates(["run_id", "seed"])
    if runs.empty:
        return empty(f"no complete trial of {_studies(table)} has a switch criterion")
    parts = []
    for criterion, group in runs.groupby("criterion"):
        epochs = np.sort(group["switch_epoch"].dropna().to_numpy(dtype=float))
        n_runs = len(group)
        for index, epoch in enumerate(epochs):
            parts.append({"criterion": criterion, "switch_epoch": float(epoch), "fraction": (index + 1) / n_runs,
                          "n_switched": len(epochs), "n_runs": n_runs})
    if not parts:
        return empty(f"none of the {len(runs)} complete (trial, seed) runs of {_studies(table)} switched")
    return pd.DataFrame(parts)


def performance_profile_table(table: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Dolan-More performance profiles: problems are (workload, seed) pairs, solvers are optimizers (or switch
    criteria when the table has one optimizer), each solver at its best configuration per workload (the best
    mean final objective over seeds among its complete trials).

    The cost of a solver on a problem is its final reported metric (:func:`reported_of`: the test split's in a
    comparison's reruns), ``1 - value`` for a maximized one (accuracy -> error) and the value itself otherwise,
    floored at 1e-12; ``ratio = cost / min over solvers``; the profile
    ``rho_s(tau)`` is the share of problems with ``ratio <= tau``. Problems some solver did not run are left
    out. Columns: solver, tau, fraction, n_problems."""
    if table.empty:
        return empty(f"no per-epoch metrics in {_studies(table)}")
    if by is None:
        by = "optimizer" if table["optimizer"].nunique() > 1 else "criterion"
    parts, reasons = [], []
    for workload, rows in table.groupby("workload"):
        metric, shown = objective_of(rows), reported_of(rows)
        finals = final_values(rows, metric)
        if finals.empty:
            reasons.append(finals.attrs["reason"])
            continue
        finals = finals.assign(solver=finals[by].where(finals[by] != "", finals["optimizer"]))
        maximize = objective_direction(shown) == MAXIMIZE
        ranks = _rank_variants(finals, metric, by=("solver",))  # each solver's configuration chosen on the objective
        best = ranks[ranks["rank"] == 1][["solver", "variant"]]
        chosen = finals.merge(best, on=["solver", "variant"])
        if shown != metric:  # ... and costed on the test split the reruns report
            reported = final_values(rows, shown)
            chosen = chosen[["solver", "variant", "seed"]].merge(
                reported.assign(solver=reported[by].where(reported[by] != "", reported["optimizer"])),
                on=["solver", "variant", "seed"])
        cost = (1.0 - chosen["value"]) if maximize else chosen["value"]
        chosen = chosen.assign(cost=cost.clip(lower=1e-12), problem=[f"{workload}/seed {s}" for s in chosen["seed"]])
        parts.append(chosen.groupby(["problem", "solver"])["cost"].mean().reset_index())
    if not parts:
        return empty("; ".join(reasons))
    costs = pd.concat(parts).pivot(index="problem", columns="solver", values="cost").dropna()
    if costs.shape[1] < 2:
        return empty(f"performance profiles compare two or more solvers; {_studies(table)} has one "
                     f"({', '.join(costs.columns) or 'none'}) by {by}")
    if costs.empty:
        return empty("no (workload, seed) problem was run by every solver")
    ratios = costs.div(costs.min(axis=1), axis=0)
    taus = np.unique(np.concatenate([[1.0], ratios.to_numpy().ravel()]))
    rows = [{"solver": solver, "tau": float(tau), "fraction": float((ratios[solver] <= tau).mean()),
             "n_problems": len(ratios)} for solver in ratios.columns for tau in taus]
    return pd.DataFrame(rows)


def importance_table(study: Any, evaluator: str = "ped_anova") -> pd.DataFrame:
    """Hyperparameter importances of an Optuna study: ``ped_anova`` (PED-ANOVA, Optuna's fast default for
    small studies) or ``fanova`` (random-forest fANOVA). Columns: param, importance, evaluator."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return empty(f"parameter importance needs two or more complete trials; study {study.study_name!r} has "
                     f"{len(complete)}")
    if len(study.directions) > 1:
        return empty(f"study {study.study_name!r} has {len(study.directions)} objectives; importance is drawn for "
                     "single-objective studies")
    if evaluator == "fanova":
        chosen = optuna.importance.FanovaImportanceEvaluator(seed=0)
    elif evaluator == "ped_anova":
        chosen = optuna.importance.PedAnovaImportanceEvaluator()
    else:
        raise ValueError(f"evaluator must be 'ped_anova' or 'fanova', got {evaluator!r}")
    try:
        with warnings.catch_warnings():  # "some regimes have less than 2 trials": expected in small studies
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study, evaluator=chosen)
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        return empty(f"parameter importance ({evaluator}) failed: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    if not importances:
        return empty(f"study {study.study_name!r} has no parameter shared by all its complete trials")
    return pd.DataFrame({"param": list(importances), "importance": [float(v) for v in importances.values()],
                         "evaluator": evaluator})


def best_configurations(trials: pd.DataFrame, optuna_best: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The best complete trial of each study (by its logged ``objective.<metric>``; ties go to the lower trial
    number, as Optuna's ``best_trial``), sorted by workload.

    ``optuna_best`` maps a study name to its Optuna ``best_trial`` (a ``FrozenTrial``) or to a one-line reason
    why it could not be read. The ``checked`` column says whether the row matches Optuna's best trial; where
    they disagree, Optuna's trial is the one shown. Columns: workload, study, optimizer, objective, trial,
    value, std, switch_epochs, variant, params (``name=value, ...``), checked."""
    columns = ["workload", "study", "optimizer", "objective", "trial", "value", "std", "switch_epochs", "variant",
               "params", "checked"]
    if trials.empty:
        return empty("no trials", columns)
    optuna_best = optuna_best or {}
    rows = []
    for study, group in trials.groupby("study", sort=True):
        complete = group[(group["state"] == STATE_COMPLETE) & group["value"].notna()]
        if complete.empty:
            continue
        maximize = complete["direction"].iloc[0] == MAXIMIZE
        ordered = complete.sort_values(["value", "trial"], ascending=[not maximize, True])
        best = ordered.iloc[0]
        reference = optuna_best.get(study)
        if reference is None:
            checked = "not checked: no Optuna storage given or recorded"
        elif isinstance(reference, str):
            checked = f"not checked: {reference}"
        elif int(reference.number) == int(best["trial"]) and float(reference.value) == float(best["value"]):
            checked = f"matches Optuna best_trial #{reference.number}"
        else:
            match = complete[complete["trial"] == int(reference.number)]
            checked = (f"MLflow's best is trial #{int(best['trial'])} ({best['value']:.6g}); Optuna's best_trial is "
                       f"#{reference.number} ({float(reference.value):.6g})")
            if not match.empty:
                best = match.iloc[0]
        params = {c[len("param."):]: best[c] for c in group.columns if c.startswith("param.") and pd.notna(best[c])}
        rows.append({"workload": best["workload"], "study": study, "optimizer": best["optimizer"],
                     "objective": best["objective"], "trial": int(best["trial"]), "value": float(best["value"]),
                     "std": float(best["std"]), "switch_epochs": best["switch_epochs"], "variant": best["variant"],
                     "params": ", ".join(f"{k}={short_value(v)}" for k, v in params.items()), "checked": checked})
    if not rows:
        return empty("no complete trial has an objective value", columns)
    return pd.DataFrame(rows, columns=columns).sort_values(["workload", "study"]).reset_index(drop=True)


def test_counterpart(metric: str) -> str | None:
    """``val_accuracy`` -> ``test_accuracy`` (the held-out split's measure of what was selected on); else ``None``."""
    return TEST_PREFIX + metric.removeprefix(VALIDATION_PREFIX) if metric.startswith(VALIDATION_PREFIX) else None


def _label(metric: str) -> str:
    for prefix, word in ((VALIDATION_PREFIX, "validation"), (TEST_PREFIX, "test")):
        if metric.startswith(prefix):
            return f"{word} {metric.removeprefix(prefix).replace('_', ' ')}"
    return metric.replace("_", " ")


def comparison_metrics(objective: str) -> tuple[tuple[str, str, int], ...]:
    """The comparison table's measured columns, (metric, column name, digits): the objective (a validation
    metric, what tuning selected on), its test counterpart (what the reruns report), the final training loss,
    gradient evaluations and training wall time."""
    measured = [objective, test_counterpart(objective), Metrics.TRAIN_LOSS]
    columns = [(metric, "final train loss" if metric == Metrics.TRAIN_LOSS else _label(metric), 4)
               for i, metric in enumerate(measured) if metric is not None and metric not in measured[:i]]
    return (*columns, (Metrics.GRAD_EVALS, "gradient evaluations", 0), (Metrics.WALL_TIME, "train wall time (s)", 1))


#: the comparison table's measured columns for the built-in workloads (objective ``val_accuracy``)
COMPARISON_METRICS = comparison_metrics(Metrics.VAL_ACCURACY)


def _best(values: np.ndarray, metric: str) -> float:
    """The best seed's value in the metric's direction (the paper reports its best run); NaN for none or NaN."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return np.nan
    return float(finite.max() if objective_direction(metric) == MAXIMIZE else finite.min())


def comparison_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method (optimizer) of a comparison's reruns: for each of :data:`COMPARISON_METRICS` the mean,
    the std over seeds (:func:`seed_std`, ddof 1), the median and the best seed's value (``.best``, in the metric's
    direction) at the last epoch, the number of seeds, the
    switch epoch over seeds (mean, min, max; NaN for methods that never switch or did not switch) and the
    diverged seeds (a non-finite final train loss). A method with several complete runs (a rerun of another
    configuration) contributes its latest-by-trial run only. Rows are ordered by mean of the objective, best
    first."""
    if table.empty:
        return empty(f"no per-epoch metrics in {_studies(table)}")
    complete = _latest_complete(table)
    if complete.empty:
        return empty(f"no complete rerun in {_studies(table)}")
    objective = objective_of(complete)
    measured = comparison_metrics(objective)
    rows = []
    for optimizer, part in complete.groupby("optimizer", sort=False):
        row: dict[str, Any] = {"method": optimizer, "variant": part["variant"].iloc[0]}
        for metric, _, _ in measured:
            finals = final_values(part, metric)
            values = finals["value"].to_numpy(dtype=float) if not finals.empty else np.array([])
            row[f"{metric}.mean"] = float(np.mean(values)) if values.size else np.nan
            row[f"{metric}.std"] = seed_std(values)
            row[f"{metric}.median"] = float(np.median(values)) if values.size else np.nan
            row[f"{metric}.best"] = _best(values, metric)
            if metric == Metrics.TRAIN_LOSS:
                row["seeds"] = int(values.size)
                row["diverged"] = int((~np.isfinite(values)).sum())
        switches = part.drop_duplicates("seed")["switch_epoch"].to_numpy(dtype=float)
        switched = switches[np.isfinite(switches)]
        row["switch_epoch.mean"] = float(switched.mean()) if switched.size else np.nan
        row["switch_epoch.min"] = float(switched.min()) if switched.size else np.nan
        row["switch_epoch.max"] = float(switched.max()) if switched.size else np.nan
        row["switched_seeds"] = int(switched.size)
        rows.append(row)
    out = pd.DataFrame(rows)
    ascending = _direction(complete, objective) != MAXIMIZE
    out = out.sort_values(f"{objective}.mean", ascending=ascending, na_position="last").reset_index(drop=True)
    out.attrs["objective"] = objective
    out.attrs["metrics"] = measured
    return out


def _number(value: float, digits: int, scale: float | None = None) -> str:
    """``digits`` decimals, or 3 significant digits when ``scale`` (default: the value) is below 0.01 in magnitude,
    where decimals would flatten it (an L2RE of 4.19e-3 is not 0.0042); a std takes its mean's scale."""
    scale = value if scale is None else scale
    if scale != 0 and np.isfinite(scale) and abs(scale) < 0.01 and digits > 0:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison table as Markdown: ``mean ± std`` cells, then the median and the best seed of the reported
    metric, the switch epoch as ``mean (min-max)``."""
    if table.empty:
        return f"_{table.attrs.get('reason', 'no data')}_\n"
    measured = table.attrs.get("metrics", COMPARISON_METRICS)
    reported = measured[1] if len(measured) > 1 and measured[1][0].startswith(TEST_PREFIX) else measured[0]
    names = [name for _, name, _ in measured]
    names.insert(names.index(reported[1]) + 1, f"{reported[1]} median (best)")
    header = ["method", "seeds", *names, "switch epoch", "settings"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        diverged = f" ({row['diverged']} diverged)" if row["diverged"] else ""
        cells = [f"`{row['method']}`", f"{row['seeds']}{diverged}"]
        for metric, _, digits in measured:
            mean, std = row[f"{metric}.mean"], row[f"{metric}.std"]
            cells.append("n/a" if not np.isfinite(mean) else
                         f"{_number(mean, digits)} ± {_number(std, digits, mean)}" if np.isfinite(std) else
                         _number(mean, digits))
            if metric == reported[0]:
                median, best = row[f"{metric}.median"], row[f"{metric}.best"]
                cells.append("n/a" if not np.isfinite(median) else
                             f"{_number(median, digits)} ({_number(best, digits)})")
        if row["switched_seeds"]:
            low, high = row["switch_epoch.min"], row["switch_epoch.max"]
            spread = f" ({low:g}-{high:g})" if low != high else ""
            cells.append(f"{row['switch_epoch.mean']:g}{spread}")
        else:
            cells.append("-")
        cells.append(str(row["variant"]).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _latest_complete(table: pd.DataFrame) -> pd.DataFrame:
    """A comparison's complete reruns, each method's latest-by-trial run only (a rerun of another configuration
    replaces the earlier one)."""
    complete = table[table["state"] == STATE_COMPLETE]
    latest = complete.groupby("optimizer")["trial"].transform("max")
    return complete[complete["trial"] == latest]


def target_table(table: pd.DataFrame, targets: Mapping[str, Sequence[float]],
                 order: Sequence[str] | None = None) -> pd.DataFrame:
    """Time to target (a comparison's reruns): per method and target (``{"test_l2re": [0.1, 0.01]}``), on how many
    seeds the measure reached it (at or below for a minimized measure, at or above for a maximized one) at the end
    of some epoch, and over those seeds the median gradient evaluations and training wall time at the first such
    epoch (the trainer's ``metric_targets``, read back from the per-epoch records). Columns: method, measure,
    target, seeds, reached, grad_evals.median, wall_time.median; methods in ``order`` (e.g. the comparison table's),
    else by name."""
    columns = ["method", "measure", "target", "seeds", "reached", "grad_evals.median", "wall_time.median"]
    if table.empty:
        return empty(f"no per-epoch metrics in {_studies(table)}", columns)
    runs = _latest_complete(table)
    rows = []
    for measure, values in targets.items():
        wide = runs[runs["metric"].isin([measure, Metrics.GRAD_EVALS, Metrics.WALL_TIME])].pivot_table(
            index=["optimizer", "seed", "epoch"], columns="metric", values="value")
        if measure not in wide:
            return empty(f"{measure} is not logged by any rerun of {_studies(table)}", columns)
        maximize = objective_direction(measure) == MAXIMIZE
        for target in values:
            hit = wide[measure] >= target if maximize else wide[measure] <= target
            for optimizer, part in wide.groupby(level="optimizer", sort=False):
                seeds = part.index.get_level_values("seed").nunique()
                first = part[hit.loc[part.index]].groupby(level="seed").head(1)
                rows.append({"method": optimizer, "measure": measure, "target": float(target), "seeds": seeds,
                             "reached": len(first),
                             "grad_evals.median": float(first[Metrics.GRAD_EVALS].median()) if len(first) else np.nan,
                             "wall_time.median": float(first[Metrics.WALL_TIME].median()) if len(first) else np.nan})
    out = pd.DataFrame(rows, columns=columns)
    if order is not None:
        rank = {method: i for i, method in enumerate(order)}
        out = out.sort_values("method", key=lambda m: m.map(lambda x: rank.get(x, len(rank))), kind="stable")
    return out.reset_index(drop=True)


def target_markdown(table: pd.DataFrame) -> str:
    """:func:`target_table` as Markdown, one row per method, a pair of columns per target."""
    if table.empty:
        return f"_{table.attrs.get('reason', 'no data')}_\n"
    goals = list(dict.fromkeys(zip(table["measure"], table["target"], strict=True)))
    header = ["method"]
    for measure, target in goals:
        sign = ">=" if objective_direction(measure) == MAXIMIZE else "<="
        header += [f"{measure} {sign} {target:g}: seeds", "evaluations (median)", "train time (s, median)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, part in table.groupby("method", sort=False):
        cells = [f"`{method}`"]
        for measure, target in goals:
            row = part[(part["measure"] == measure) & (part["target"] == target)].iloc[0]
            reached = row["reached"] > 0
            cells += [f"{row['reached']}/{row['seeds']}",
                      f"{row['grad_evals.median']:.0f}" if reached else "-",
                      f"{row['wall_time.median']:.1f}" if reached else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_differences(table: pd.DataFrame, reference: str = "fuse_pv", metric: str | None = None) -> pd.DataFrame:
    """Per method, the seed-by-seed difference ``reference - method`` of the final ``metric`` (default: the
    objective) over the seeds both ran (paired seeds: the same data order and initialisation): mean, std
    (:func:`seed_std`, ddof 1),
    the paired t statistic ``mean / (std / sqrt(n))``, and how many seeds the reference was ahead, level or behind
    (ahead = better in the metric's direction). Empty, with the reason, when ``reference`` has no complete run."""
    if table.empty:
        return empty(f"no per-epoch metrics in {_studies(table)}")
    metric = metric or objective_of(table)
    finals = final_values(_latest_complete(table), metric)
    if finals.empty or reference not in set(finals["optimizer"]):
        return empty(f"{reference} has no complete run in {_studies(table)}")
    wide = finals.pivot_table(index="seed", columns="optimizer", values="value")
    sign = 1.0 if objective_direction(metric) == MAXIMIZE else -1.0
    rows = []
    for method in wide.columns:
        if method == reference:
            continue
        both = wide[[reference, method]].dropna()
        diff = (both[reference] - both[method]).to_numpy(dtype=float)
        n = diff.size
        std = seed_std(diff)
        mean = float(diff.mean()) if n else np.nan
        t = mean / (std / np.sqrt(n)) if n > 1 and std > 0 else np.nan
        ahead = int((sign * diff > 0).sum())
        level = int((diff == 0).sum())
        rows.append({"reference": reference, "method": method, "metric": metric, "seeds": n, "mean": mean,
                     "std": std, "t": t, "ahead": ahead, "level": level, "behind": n - ahead - level})
    return pd.DataFrame(rows)


def paired_markdown(table: pd.DataFrame) -> str:
    """:func:`paired_differences` as Markdown."""
    if table.empty:
        return f"_{table.attrs.get('reason', 'no data')}_\n"
    first = table.iloc[0]
    lines = [f"| {first['reference']} minus | seeds | mean difference in {first['metric']} | std | paired t | "
             f"{first['reference']} ahead / level / behind |", "|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        t = f"{row['t']:.2f}" if np.isfinite(row["t"]) else "n/a"
        lines.append(f"| `{row['method']}` | {row['seeds']} | {row['mean']:+.4f} | {row['std']:.4f} | {t} | "
                     f"{row['ahead']} / {row['level']} / {row['behind']} |")
    return "\n".join(lines) + "\n"
