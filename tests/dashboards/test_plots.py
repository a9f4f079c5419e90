"""Every renderer draws data on every axes it makes, or returns no figure and a one-line reason."""

from __future__ import annotations

import pandas as pd
import pytest

from dashboards import plots, tables
from dashboards.report import TABLES

from .test_tables import tidy_rows


def assert_has_data(plot: plots.Plot) -> None:
    assert plot.figure is not None and plot.reason is None, plot.reason
    axes = plot.figure.get_axes()
    assert axes
    for ax in axes:
        drawn = len(ax.lines) + len(ax.patches) + len(ax.collections) + len(ax.images)
        assert drawn > 0, f"{plot.name}: empty axes {ax.get_title()!r}"


def assert_reason(plot: plots.Plot, *fragments: str) -> None:
    assert plot.figure is None and not plot
    assert plot.reason and "\n" not in plot.reason
    for fragment in fragments:
        assert fragment in plot.reason


@pytest.mark.parametrize("name", [n for n in TABLES if n != "theta_schedules"])
def test_renderer_draws_the_real_study(name, tidy_table, tmp_path):
    plot = plots.RENDERERS[name](TABLES[name](tidy_table))
    assert_has_data(plot)
    paths = plot.save(tmp_path)
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 2000 for p in paths)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in paths[1].read_bytes()[:2000]


def test_sensitivity_has_a_panel_per_criterion_and_log_zeta(tidy_table):
    plot = plots.plot_sensitivity(tables.sensitivity_table(tidy_table))
    titles = {ax.get_title(): ax for ax in plot.figure.get_axes()}
    assert {"criterion: epoch", "criterion: grad_norm", "all criteria vs observed switch"} <= set(titles)
    assert titles["criterion: grad_norm"].get_xscale() == "log"
    assert titles["criterion: epoch"].get_xscale() == "linear"


def test_learning_curves_mark_the_switch(tidy_table):
    table = tables.learning_curve_table(tidy_table)
    assert set(table["metric"]) == {"train_loss", "val_accuracy"}
    plot = plots.plot_learning_curves(table)
    switches = sorted(table.dropna(subset=["switch_epoch"]).groupby("variant")["switch_epoch"].mean())
    for ax in plot.figure.get_axes():
        vertical = [line for line in ax.lines if line.get_linestyle() == "--" and len(set(line.get_xdata())) == 1]
        assert sorted(float(line.get_xdata()[0]) for line in vertical) == switches


def test_evaluation_curves_put_each_seed_on_the_evaluations_axis_and_mark_its_switch(tidy_table):
    table = tables.evaluation_curve_table(tidy_table)
    assert set(table["metric"]) == {"val_accuracy"}  # a study's trials: the objective (no test split)
    assert (table.groupby(["variant", "seed"])["grad_evals"].diff().dropna() > 0).all()  # cumulative evaluations
    switched = table[table["switched"]]
    assert (switched["epochs_completed"] == switched["switch_epoch"]).all()
    assert len(switched) == len(table.dropna(subset=["switch_epoch"]).drop_duplicates(["variant", "seed"]))
    plot = plots.plot_evaluation_curves(table)
    assert_has_data(plot)
    ax = plot.figure.get_axes()[0]
    assert ax.get_xlabel() == "gradient evaluations (closure calls)"
    marked = sum(len(c.get_offsets()) for c in ax.collections if len(c.get_offsets()))
    assert marked == len(switched)


def test_theta_schedules_say_why_on_fuse_pv_and_draw_on_fuse():
    assert_reason(plots.plot_theta_schedules(tables.theta_schedule_table(tidy_rows(
        [(0, "epoch", {"switch.epoch": 1.0}, {0: (0.9, 1.0)}, "fuse_pv", "w")]))), "theta.schedule")
    table = tidy_rows([(0, "", {"theta.schedule": "linear"}, {0: (0.8, float("nan")), 1: (0.7, float("nan"))},
                        "fuse", "w"),
                       (1, "", {"theta.schedule": "cosine"}, {0: (0.9, float("nan"))}, "fuse", "w")])
    assert_has_data(plots.plot_theta_schedules(tables.theta_schedule_table(table)))


def test_importance_from_the_optuna_study(optuna_study):
    table = tables.importance_table(optuna_study)
    assert set(table["param"]) <= set().union(*(t.params for t in optuna_study.trials))
    assert (table["importance"] >= 0).all() and table["importance"].sum() == pytest.approx(1.0)
    assert_has_data(plots.plot_importance(table))


def test_landscape_from_plain_arrays():
    from fuse_tune.trajectories import landscape_with_paths

    landscape = landscape_with_paths("rosenbrock", steps=120, resolution=40)
    assert len(landscape["z"]) == len(landscape["y"]) == 40 and len(landscape["z"][0]) == len(landscape["x"])
    assert all(isinstance(v, float) for v in landscape["z"][0])
    paths = {p["label"]: p for p in landscape["paths"]}
    assert all(len(p["points"]) == 121 and p["points"][0] == [-1.5, 2.0] for p in paths.values())
    assert paths["fuse_pv[switch.criterion=step,switch.step=100]"]["switch_step"] == 100
    assert paths["lbfgs"]["values"][-1] < 1e-8  # torch's L-BFGS reaches the valley floor's minimum
    plot = plots.plot_landscape(landscape)
    assert_has_data(plot)
    assert plot.name == "landscape_rosenbrock"
    assert_reason(plots.plot_landscape({"function": "ackley", "z": [], "paths": []}), "ackley")


def test_no_data_gives_a_reason_not_empty_axes():
    nothing = pd.DataFrame(columns=list(tidy_rows([(0, "", {}, {0: (1.0, 1.0)}, "adam", "w")]).columns))
    for name, table_of in TABLES.items():
        assert_reason(plots.RENDERERS[name](table_of(nothing)))
    assert_reason(plots.plot_importance(tables.empty("study 's' has 1 complete trial")), "1 complete trial")
