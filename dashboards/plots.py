"""Thin seaborn renderers: one table from :mod:`dashboards.tables` (or plain arrays) -> one matplotlib figure.

Every renderer returns a :class:`Plot`: ``figure`` is a ``matplotlib.figure.Figure`` with data on its axes, or
``None`` with a one-line ``reason`` when the table has nothing to draw (never empty axes). Figures are made
with ``matplotlib.figure.Figure`` directly, not pyplot: no global figure registry, no GUI backend, safe in
threads and servers. Save them with :meth:`Plot.save`.

========================  ==========================================  ==============================================
renderer                  table                                       draws
========================  ==========================================  ==============================================
plot_sensitivity          tables.sensitivity_table                    final metric vs the criterion's threshold, one
                                                                      panel per criterion (log x for zeta / sigma),
                                                                      mean and band (+- 1 sd) over seeds, and all
                                                                      criteria vs the observed switch epoch
plot_seed_variance        tables.seed_variance_table                  boxes of the final metric over seeds per
                                                                      variant, one panel per workload
plot_learning_curves      tables.learning_curve_table                 train loss / test accuracy per epoch, band
                                                                      over seeds (min-max), switch marked
plot_evaluation_curves    tables.evaluation_curve_table               the reported metric against gradient
                                                                      evaluations, a line per seed, switch marked
plot_landscape            fuse_tune.trajectories.landscape_with_paths  contours of log10(f - f*) and optimizer paths
plot_theta_schedules      tables.theta_schedule_table                 final metric per theta schedule; the best
                                                                      trial's curve per schedule
plot_history_batch        tables.history_batch_table                  heatmap history_size x batch_size_after_switch
plot_importance           tables.importance_table                     bars of hyperparameter importance
plot_switch_ecdf          tables.switch_ecdf_table                    ECDF of the observed switch epoch per criterion
plot_performance_profile  tables.performance_profile_table            Dolan-More profiles rho_s(tau), log2 tau
========================  ==========================================  ==============================================
"""

from __future__ import annotations

import contextlib
import math
import textwrap
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuse_tune.errors import UserError
from fuse_tune.records import Metrics, short_value

__all__ = ["Plot", "plot_sensitivity", "plot_seed_variance", "plot_learning_curves", "plot_landscape",
           "plot_theta_schedules", "plot_history_batch", "plot_importance", "plot_switch_ecdf",
           "plot_performance_profile", "plot_evaluation_curves", "RENDERERS"]

#: axis labels of the recorded metrics (others are labelled by their name)
_LABELS = {Metrics.TEST_ACCURACY: "test accuracy", Metrics.TRAIN_LOSS: "training loss", Metrics.TEST_LOSS: "test loss",
           Metrics.VAL_ACCURACY: "validation accuracy", Metrics.VAL_LOSS: "validation loss", Metrics.GAP: "f(x) - f*",
           Metrics.GRAD_SQ_NORM: "mean ||g||^2"}


@dataclass
class Plot:
    """A rendered figure (``figure``) or the one-line ``reason`` there is none."""

    name: str
    title: str
    figure: Any = None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.figure is not None

    def save(self, directory: str | Path, formats: Sequence[str] = ("png", "svg"), dpi: int = 110) -> list[Path]:
        """Write ``<name>.<format>`` files into ``directory``; nothing for a plot without a figure."""
        if self.figure is None:
            return []
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for fmt in formats:
            path = directory / f"{self.name}.{fmt}"
            self.figure.savefig(path, format=fmt, dpi=dpi,
                                metadata={"Date": None} if fmt == "svg" else None)
            paths.append(path)
        return paths


def _sns():
    try:
        import seaborn as sns
    except ImportError:  # pragma: no cover - depends on the install
        raise UserError("dashboards draw with seaborn: pip install 'fuse[dashboards]'") from None
    return sns


def _figure(n_panels: int = 1, width: float = 5.0, height: float = 3.8, columns: int | None = None,
            **kwargs: Any) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    columns = columns or n_panels
    rows = math.ceil(n_panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, **kwargs).ravel().tolist()
    for extra in axes[n_panels:]:
        extra.remove()
    return figure, axes[:n_panels]


def _none(name: str, title: str, table: Any, default: str = "no data") -> Plot | None:
    if table is None or (isinstance(table, pd.DataFrame) and table.empty):
        reason = getattr(table, "attrs", {}).get("reason") if table is not None else None
        return Plot(name, title, None, reason or default)
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence seaborn 0.13's use of ``bxp(vert=...)``, deprecated in matplotlib 3.11 (not ours to fix)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*vert: bool was deprecated.*")
        yield


def _label(metric: str) -> str:
    return _LABELS.get(metric, metric.replace("_", " "))


def _wrap(text: str, width: int = 60) -> str:
    """Break a variant name at its commas into lines of at most ``width`` characters where possible."""
    lines: list[str] = []
    for part in text.replace(",", ", ").split(" "):
        if lines and len(lines[-1]) + len(part) <= width:
            lines[-1] += part
        else:
            lines.append(part)
    return "\n".join(line for chunk in lines for line in (textwrap.wrap(chunk, width) or [chunk]))


# ------------------------------------------------------------------ renderers


def plot_sensitivity(table: pd.DataFrame) -> Plot:
    """Final metric vs switch threshold, one panel per criterion, plus one vs the observed switch epoch."""
    name, title = "criterion_sensitivity", "Criterion sensitivity"
    if (none := _none(name, title, table)) is not None:
        return none
    sns = _sns()
    metric = table["metric"].iloc[0]
    criteria = list(dict.fromkeys(table["criterion"]))
    observed = table[table["switch_epoch"].notna()]
    figure, axes = _figure(len(criteria) + (1 if not observed.empty else 0), width=4.2, height=3.6, sharey=True)
    hue = "study" if table["study"].nunique() > 1 else None
    for ax, criterion in zip(axes, criteria, strict=False):
        rows = table[table["criterion"] == criterion].sort_values("threshold")
        sns.lineplot(data=rows, x="threshold", y="value", hue=hue, errorbar="sd", marker="o", ax=ax,
                     err_kws={"alpha": 0.25})
        sns.scatterplot(data=rows, x="threshold", y="value", color="0.3", s=14, alpha=0.6, ax=ax, legend=False)
        if bool(rows["log_x"].iloc[0]):
            ax.set_xscale("log")
            low, high = rows["threshold"].min(), rows["threshold"].max()
            ax.set_xlim(low / 1.5, high * 1.5)
            ax.xaxis.set_minor_formatter(_null_formatter())
        else:
            _integer_ticks(ax.xaxis)
        _log_y_if_spread(ax, rows["value"], metric)
        ax.set_title(f"criterion: {criterion}")
        ax.set_xlabel(rows["threshold_name"].iloc[0] + (" (log)" if bool(rows["log_x"].iloc[0]) else ""))
        ax.set_ylabel(_label(metric))
    if not observed.empty:
        ax = axes[-1]
        sns.lineplot(data=observed.sort_values("switch_epoch"), x="switch_epoch", y="value", hue="criterion",
                     errorbar="sd", marker="o", ax=ax, err_kws={"alpha": 0.2})
        _log_y_if_spread(ax, observed["value"], metric)
        _integer_ticks(ax.xaxis)
        ax.set_title("all criteria vs observed switch")
        ax.set_xlabel("epochs completed at the switch")
        ax.set_ylabel(_label(metric))
    figure.suptitle(f"Final {_label(metric)} vs switch threshold (mean +- sd over seeds)")
    return Plot(name, title, figure)


def plot_seed_variance(table: pd.DataFrame) -> Plot:
    """Boxes over seeds of the final metric per variant (best first), one panel per workload."""
    name, title = "seed_variance", "Seed variance"
    if (none := _none(name, title, table)) is not None:
        return none
    sns = _sns()
    metric = table["metric"].iloc[0]
    workloads = list(dict.fromkeys(table["workload"]))
    n_variants = table.groupby("workload")["variant"].nunique().max()
    figure, axes = _figure(len(workloads), width=7.5, height=0.9 + 0.42 * n_variants)
    for ax, workload in zip(axes, workloads, strict=True):
        rows = table[table["workload"] == workload].copy()
        rows["configuration"] = [f"#{t} {_wrap(v, 70)}" for t, v in zip(rows["trial"], rows["variant"], strict=True)]
        order = list(dict.fromkeys(rows.sort_values("rank")["configuration"]))
        hue = "optimizer" if rows["optimizer"].nunique() > 1 else None
        with _quiet():
            sns.boxplot(data=rows, x="value", y="configuration", order=order, hue=hue, ax=ax, fill=False,
                        color=None if hue else "C0", whis=(0, 100))
        sns.stripplot(data=rows, x="value", y="configuration", order=order, ax=ax, color="0.2", size=4,
                      jitter=0.1)
        ax.set_title(f"{workload}: final {_label(metric)} over seeds (best first)")
        ax.set_xlabel(_label(metric))
        ax.set_ylabel("")
        ax.tick_params(axis="y", labelsize=7)
    return Plot(name, title, figure)


def plot_learning_curves(table: pd.DataFrame) -> Plot:
    """One panel per (study, metric): mean per epoch, band = min..max over seeds, dashed line at the switch."""
    name, title = "learning_curves", "Learning curves"
    if (none := _none(name, title, table)) is not None:
        return none
    sns = _sns()
    panels = list(dict.fromkeys(zip(table["study"], table["metric"], strict=True)))
    figure, axes = _figure(len(panels), width=5.2, height=4.6)
    for ax, (study, metric) in zip(axes, panels, strict=True):
        rows = table[(table["study"] == study) & (table["metric"] == metric)].copy()
        rows["configuration"] = [f"#{t} {_wrap(v, 55)}" for t, v in zip(rows["trial"], rows["variant"], strict=True)]
        order = list(dict.fromkeys(rows.sort_values("rank")["configuration"]))
        palette = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
        sns.lineplot(data=rows, x="epochs_completed", y="value", hue="configuration", hue_order=order,
                     palette=palette, errorbar=("pi", 100), marker="o", markersize=4, ax=ax, err_kws={"alpha": 0.2})
        switches = rows.groupby("configuration")["switch_epoch"].mean().dropna()
        for configuration, epoch in switches.items():
            ax.axvline(epoch, color=palette[configuration], linestyle="--", linewidth=1.2, alpha=0.9)
        if not switches.empty:
            ax.plot([], [], color="0.3", linestyle="--", label="switch (epochs completed)")
        if "loss" in metric and (rows["value"] > 0).all():
            ax.set_yscale("log")
        _integer_ticks(ax.xaxis)
        ax.set_title(f"{study}: {_label(metric)}")
        ax.set_xlabel("epochs completed")
        ax.set_ylabel(_label(metric))
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    return Plot(name, title, figure)


def plot_evaluation_curves(table: pd.DataFrame) -> Plot:
    """One panel per study: the reported metric against gradient evaluations, a thin line per seed in its
    variant's colour, a triangle where each seed switched (log y when positive and spread over a decade)."""
    name, title = "evaluation_curves", "Metric against gradient evaluations"
    if (none := _none(name, title, table)) is not None:
        return none
    sns = _sns()
    studies = list(dict.fromkeys(table["study"]))
    figure, axes = _figure(len(studies), width=6.0, height=4.8)
    for ax, study in zip(axes, studies, strict=True):
        rows = table[table["study"] == study].copy()
        rows["configuration"] = [_wrap(v, 55) for v in rows["variant"]]
        order = list(dict.fromkeys(rows.sort_values("rank")["configuration"]))
        palette = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
        sns.lineplot(data=rows, x="grad_evals", y="value", hue="configuration", hue_order=order, palette=palette,
                     units="seed", estimator=None, linewidth=1.0, alpha=0.75, ax=ax)
        switches = rows[rows["switched"]]
        for configuration, points in switches.groupby("configuration", sort=False):
            ax.scatter(points["grad_evals"], points["value"], marker="v", s=36, color=palette[configuration],
                       edgecolors="black", linewidths=0.6, zorder=3)
        if not switches.empty:
            ax.scatter([], [], marker="v", color="0.6", edgecolors="black", label="switch (end of the Adam phase)")
        values = rows["value"]
        if (values > 0).all() and values.max() > 10 * values.min():
            ax.set_yscale("log")
        metric = str(rows["metric"].iloc[0])
        ax.set_title(f"{study}: {_label(metric)}, one line per seed")
        ax.set_xlabel("gradient evaluations (closure calls)")
        ax.set_ylabel(_label(metric))
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    return Plot(name, title, figure)


def plot_landscape(landscape: Mapping[str, Any], name: str | None = None) -> Plot:
    """Contours of ``log10(f - f* + 1e-12)`` on the grid, each path with its start, end and switch marked.

    ``landscape`` is plain data (:func:`fuse_tune.trajectories.landscape_with_paths`): ``x`` and ``y`` (lists),
    ``z`` (rows = y), ``f_star``, ``start``, ``minimizers``, ``bounds`` and ``paths`` (``label``, ``points``,
    ``switch_step``)."""
    function = landscape.get("function", "function")
    name = name or f"landscape_{function}"
    title = f"Landscape: {function}"
    paths = [p for p in landscape.get("paths", []) if len(p.get("points", [])) > 1]
    if not landscape.get("z") or not paths:
        return Plot(name, title, None, f"{function}: no grid or no optimizer path with two or more points")
    x, y = np.asarray(landscape["x"], float), np.asarray(landscape["y"], float)
    z = np.asarray(landscape["z"], float) - float(landscape.get("f_star", 0.0))
    figure, (ax,) = _figure(1, width=6.4, height=5.2)
    levels = np.log10(np.clip(z, 0, None) + 1e-12)
    filled = ax.contourf(x, y, levels, levels=30, cmap="viridis", alpha=0.85)
    ax.contour(x, y, levels, levels=15, colors="white", linewidths=0.3, alpha=0.5)
    figure.colorbar(filled, ax=ax, label="log10(f - f*)")
    colors = ["#e41a1c", "#ff7f00", "#00e5ff", "#ff00ff", "#ffffff", "#a65628"]
    for index, path in enumerate(paths):
        points = np.asarray(path["points"], float)
        color = colors[index % len(colors)]
        ax.plot(points[:, 0], points[:, 1], "-", color=color, linewidth=1.4, label=path["label"])
        ax.plot(points[-1, 0], points[-1, 1], "o", color=color, markersize=6, markeredgecolor="black")
        switch = path.get("switch_step")
        if switch is not None and 0 <= switch < len(points):
            ax.plot(points[switch, 0], points[switch, 1], "D", color=color, markersize=7, markeredgecolor="black")
    start = landscape.get("start")
    if start is not None:
        ax.plot(start[0], start[1], "s", color="white", markeredgecolor="black", markersize=7, label="start")
    for i, point in enumerate(landscape.get("minimizers", [])):
        ax.plot(point[0], point[1], "*", color="gold", markeredgecolor="black", markersize=12,
                label="global minimum" if i == 0 else None)
    ax.plot([], [], "D", color="0.6", markeredgecolor="black", label="switch")
    bounds = landscape.get("bounds")
    if bounds:
        ax.set_xlim(*bounds[0])
        ax.set_ylim(*bounds[1])
    ax.set_title(f"{function}: optimizer paths (o = end)")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    return Plot(name, title, figure)


def plot_theta_schedules(table: pd.DataFrame) -> Plot:
    """Left: final metric per theta schedule (boxes over trials and seeds); right: the best trial per schedule."""
    name, title = "theta_schedules", "Theta schedules"
    if (none := _none(name, title, table)) is not None:
        return none
    sns = _sns()
    metric = table["metric"].iloc[0]
    figure, (left, right) = _figure(2, width=5.0, height=4.0)
    finals = table[table["final"]]
    order = sorted(finals["schedule"].unique())
    with _quiet():
        sns.boxplot(data=finals, x="schedule", y="value", order=order, ax=left, fill=False, whis=(0, 100))
    sns.stripplot(data=finals, x="schedule", y="value", order=order, ax=left, color="0.2", size=4, jitter=0.15)
    left.set_title(f"final {_label(metric)} per schedule")
    left.set_ylabel(_label(metric))
    best = table[table["best"]].copy()
    best["configuration"] = [f"{s} (#{t})" for s, t in zip(best["schedule"], best["trial"], strict=True)]
    sns.lineplot(data=best, x="epochs_completed", y="value", hue="configuration", errorbar=("pi", 100),
                 marker="o", markersize=4, ax=right, err_kws={"alpha": 0.2})
    right.set_title(f"best trial per schedule: {_label(metric)}")
    right.set_xlabel("epochs completed")
    right.set_ylabel(_label(metric))
    right.legend(fontsize=7)
    return Plot(name, title, figure)


def plot_history_batch(table: pd.DataFrame) -> Plot:
    """Heatmap of the mean final metric per (history_size, batch_size_after_switch) cell."""
    name, title = "history_batch", "History size x batch size"
    if (none := _none(name, title, table)) is not None:
        return none
    sns = _sns()
    row, column = table.columns[0], table.columns[1]
    metric = table["metric"].iloc[0]
    grid = table.pivot(index=row, columns=column, values="value").sort_index().sort_index(axis=1)
    grid.index = [short_value(v) for v in grid.index]
    grid.columns = [short_value(v) for v in grid.columns]
    figure, (ax,) = _figure(1, width=1.2 + 1.1 * grid.shape[1], height=1.0 + 0.55 * grid.shape[0])
    sns.heatmap(grid, annot=True, fmt=".4g", cmap="viridis", ax=ax, cbar_kws={"label": _label(metric)},
                linewidths=0.5, linecolor="white")
    ax.set_xlabel(column)
    ax.set_ylabel(row)
    ax.set_title(f"mean final {_label(metric)} (blank: not run)")
    return Plot(name, title, figure)


def plot_importance(table: pd.DataFrame) -> Plot:
    """Horizontal bars of hyperparameter importance (largest first)."""
    name, title = "importance", "Hyperparameter importance"
    if (none := _none(name, title, table)) is not None:
        return none
    sns = _sns()
    rows = table.sort_values("importance", ascending=False)
    figure, (ax,) = _figure(1, width=6.0, height=1.0 + 0.4 * len(rows))
    sns.barplot(data=rows, x="importance", y="param", ax=ax, color="C0")
    ax.set_title(f"parameter importance ({rows['evaluator'].iloc[0].replace('_', '-')})")
    ax.set_ylabel("")
    return Plot(name, title, figure)


def plot_switch_ecdf(table: pd.DataFrame) -> Plot:
    """Step ECDF of the switch epoch per criterion; the curve's top is the share of runs that switched."""
    name, title = "switch_ecdf", "When the switch happened"
    if (none := _none(name, title, table)) is not None:
        return none
    figure, (ax,) = _figure(1, width=6.0, height=4.0)
    for index, (criterion, rows) in enumerate(table.groupby("criterion", sort=True)):
        x = np.concatenate([[0.0], rows["switch_epoch"].to_numpy(float)])
        y = np.concatenate([[0.0], rows["fraction"].to_numpy(float)])
        label = f"{criterion} ({int(rows['n_switched'].iloc[0])} of {int(rows['n_runs'].iloc[0])} runs switched)"
        ax.step(x, y, where="post", color=f"C{index}", linewidth=1.8, label=label)
        ax.plot(x[1:], y[1:], "o", color=f"C{index}", markersize=4)
    ax.set_ylim(0, 1.02)
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("epochs completed at the switch")
    ax.set_ylabel("share of (trial, seed) runs switched")
    ax.set_title("ECDF of the switch epoch (complete trials)")
    ax.legend(fontsize=8)
    return Plot(name, title, figure)


def plot_performance_profile(table: pd.DataFrame) -> Plot:
    """Dolan-More performance profiles: share of problems within a factor tau of the best, log2 tau axis."""
    name, title = "performance_profile", "Performance profiles"
    if (none := _none(name, title, table)) is not None:
        return none
    figure, (ax,) = _figure(1, width=6.0, height=4.0)
    right = max(2.0, float(table["tau"].max()) * 1.25)
    for index, (solver, rows) in enumerate(table.groupby("solver", sort=True)):
        rows = rows.sort_values("tau")
        x = np.append(rows["tau"].to_numpy(float), right)
        y = np.append(rows["fraction"].to_numpy(float), rows["fraction"].iloc[-1])
        ax.step(x, y, where="post", color=f"C{index}", linewidth=1.8, label=solver)
    ax.set_xscale("log", base=2)
    ax.set_xlim(1.0, right)
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("tau (cost / best cost on the problem, log2)")
    ax.set_ylabel("share of problems within tau")
    ax.set_title(f"performance profiles over {int(table['n_problems'].iloc[0])} (workload, seed) problems")
    ax.legend(fontsize=8)
    return Plot(name, title, figure)


def _log_y_if_spread(ax: Any, values: pd.Series, metric: str) -> None:
    """Log y for losses and gaps that are positive and span more than two decades."""
    if ("loss" in metric or metric == Metrics.GAP) and (values > 0).all() and values.max() > 100 * values.min():
        ax.set_yscale("log")


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _null_formatter() -> Any:
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


#: plot name -> renderer of the matching table in :mod:`dashboards.tables`
RENDERERS = {"criterion_sensitivity": plot_sensitivity, "seed_variance": plot_seed_variance,
             "learning_curves": plot_learning_curves, "theta_schedules": plot_theta_schedules,
             "history_batch": plot_history_batch, "importance": plot_importance, "switch_ecdf": plot_switch_ecdf,
             "performance_profile": plot_performance_profile, "evaluation_curves": plot_evaluation_curves}
