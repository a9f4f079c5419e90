"""The study report: every plot as PNG and SVG, one self-contained HTML page, and all of it logged as artifacts
of the study's parent MLflow run (under ``report/``, so it shows in the MLflow UI next to the trials).

:func:`build_report` reads the experiments' runs (:mod:`dashboards.data`), builds each plot's table
(:mod:`dashboards.tables`) and draws it (:mod:`dashboards.plots`). A plot with nothing to draw is not drawn: its
one-line reason goes into ``Report.skipped`` and the page. The HTML embeds its images as base64 PNG and needs no
network, script or stylesheet from anywhere else.

The best-configuration table comes from the trials' logged objective and is checked against the Optuna study's
``best_trial`` when the study's storage can be opened (``storage=`` or the parent run's ``Tags.STORAGE`` tag),
through :func:`fuse_tune.storage.open_storage` (no torch) with ``create=False``: a journal file that does not
exist is reported, never created, and a database gets no tables.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dashboards import tables
from dashboards.data import NoRuns, StudyRuns, read_experiments, tidy, trial_table
from dashboards.plots import RENDERERS, Plot, plot_importance, plot_landscape
from fuse_tune.records import REPORT_ARTIFACT_DIR, ROLE_STUDY, Metrics, Tags, redact
from fuse_tune.storage import open_storage

__all__ = ["Report", "build_report", "open_optuna_study", "render_html", "NoRuns"]

#: plot name -> the table function feeding its renderer (importance and landscapes are fed separately)
TABLES: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {
    "learning_curves": tables.learning_curve_table,
    "evaluation_curves": tables.evaluation_curve_table,
    "criterion_sensitivity": tables.sensitivity_table,
    "switch_ecdf": tables.switch_ecdf_table,
    "seed_variance": tables.seed_variance_table,
    "theta_schedules": tables.theta_schedule_table,
    "history_batch": tables.history_batch_table,
    "performance_profile": tables.performance_profile_table,
}

#: a callable ``test-function workloads -> [landscape dicts]`` (fuse_tune.trajectories computes them with torch)
LandscapeProvider = Callable[[Sequence[str]], Sequence[dict[str, Any]]]


@dataclass
class Report:
    """What :func:`build_report` made: files, the plots drawn, the reasons for those not drawn."""

    out_dir: Path
    html_path: Path
    files: list[Path]
    plots: list[Plot]
    skipped: dict[str, str]
    notes: list[str]
    best: pd.DataFrame
    studies: list[StudyRuns]
    table: pd.DataFrame
    artifact_runs: list[str] = field(default_factory=list)

    @property
    def drawn(self) -> list[str]:
        return [p.name for p in self.plots if p]


def open_optuna_study(name: str, storage: str | None) -> tuple[Any | None, str | None]:
    """``(study, None)``, or ``(None, one-line reason)`` when ``storage`` is missing or cannot be opened."""
    if not storage:
        return None, "no Optuna storage given (--storage) or recorded on the parent run"
    if "***" in storage:
        return None, "the recorded storage URL has its password redacted; pass --storage"
    try:
        import optuna
    except ImportError:  # pragma: no cover
        return None, "optuna is not installed"
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage, create=False)), None
    except FileNotFoundError as exc:  # a journal file that is not there
        return None, str(exc)
    except KeyError:
        return None, f"no study named {name!r} in the Optuna storage"
    except Exception as exc:  # unreachable database, bad URL, missing driver
        return None, f"cannot open the Optuna storage ({type(exc).__name__}: {redact(str(exc).splitlines()[0])})"


def _optuna_best(study: Any) -> Any:
    if len(study.directions) > 1:
        return "multi-objective study: no single best_trial"
    try:
        return study.best_trial
    except ValueError as exc:
        return str(exc).splitlines()[0]


def build_report(experiments: Sequence[str], *, tracking_uri: str | None = None, out_dir: str | Path = "report",
                 storage: str | None = None, landscapes: LandscapeProvider | None = None,
                 log_artifacts: bool = True, client: Any | None = None, formats: Sequence[str] = ("png", "svg"),
                 importance_evaluator: str = "ped_anova") -> Report:
    """Write the report of ``experiments`` into ``out_dir`` and (by default) log it on each parent run.

    Raises :class:`dashboards.data.NoRuns` (one line) when an experiment is missing or has no trial runs.
    ``landscapes`` is called with the experiments' test-function workloads (those whose runs logged ``gap``),
    if any, and returns plain landscape dicts to draw.
    """
    if client is None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
    studies = read_experiments(list(experiments), tracking_uri, client=client)
    table = tidy(studies)
    trials = trial_table(studies)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[Plot] = []
    notes: list[str] = []
    for name, table_of in TABLES.items():
        derived = table_of(table)
        if derived.attrs.get("note"):
            notes.append(derived.attrs["note"])
        plots.append(RENDERERS[name](derived))
    optuna_best: dict[str, Any] = {}
    for study in studies:
        if study.parent_tags.get(Tags.BACKEND) == "ray" and storage is None:
            optuna_study, reason = None, ("a Ray Tune experiment: its trials are in the Ray results folder, not in "
                                          "an Optuna storage")
        else:
            optuna_study, reason = open_optuna_study(study.study, storage or study.storage)
        if optuna_study is None:
            optuna_best[study.study] = reason
            plot = Plot("importance" if len(studies) == 1 else f"importance_{study.study}",
                        f"Hyperparameter importance: {study.study}", None, f"{study.study}: {reason}")
        else:
            optuna_best[study.study] = _optuna_best(optuna_study)
            plot = plot_importance(tables.importance_table(optuna_study, importance_evaluator))
            if len(studies) > 1:
                plot.name, plot.title = f"importance_{study.study}", f"{plot.title}: {study.study}"
        plots.append(plot)
    if landscapes is not None:
        # Test-function workloads are the ones whose runs log the gap f(x) - f*; the provider (which imports
        # torch) is called only when there are some.
        functions = sorted(table.loc[table["metric"] == Metrics.GAP, "workload"].unique()) if len(table) else []
        drawn = [plot_landscape(landscape) for landscape in landscapes(functions)] if functions else []
        plots.extend(drawn)
        if not drawn:
            workloads = ", ".join(sorted(table["workload"].unique())) if len(table) else "the runs"
            plots.append(Plot("landscapes", "Landscapes", None, f"no 2-D test-function workload among {workloads}"))
    best = tables.best_configurations(trials, optuna_best)
    files: list[Path] = []
    for plot in plots:
        files.extend(plot.save(out_dir, formats))
    skipped = {p.name: p.reason or "no data" for p in plots if not p}
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(studies, plots, best, skipped, notes, out_dir, tracking_uri or
                                     str(getattr(client, "tracking_uri", ""))), encoding="utf-8")
    files.append(html_path)
    best_csv = out_dir / "best_configurations.csv"
    best.to_csv(best_csv, index=False)
    files.append(best_csv)
    for plot in plots:
        if plot.figure is not None:
            plot.figure.clf()
    report = Report(out_dir, html_path, files, plots, skipped, notes, best, studies, table)
    if log_artifacts:
        for study in studies:
            if study.parent_run_id is None:
                report.notes.append(f"{study.study}: no parent run ({Tags.ROLE}={ROLE_STUDY}) to log the report on")
                continue
            for path in files:
                client.log_artifact(study.parent_run_id, str(path), artifact_path=REPORT_ARTIFACT_DIR)
            report.artifact_runs.append(study.parent_run_id)
    return report


# ------------------------------------------------------------------ HTML

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
.meta { color: #555; font-size: 0.9em; } .skipped li { margin: 0.2em 0; }
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None or (isinstance(value, float) and value != value) else str(value))


def _number(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _esc(value)
    return "" if number != number else f"{number:.6g}"


def _best_html(best: pd.DataFrame) -> str:
    if best.empty:
        return f"<p>{_esc(best.attrs.get('reason', 'no complete trials'))}</p>"
    head = ("<tr><th>workload</th><th>study</th><th>optimizer</th><th>trial</th><th>objective</th><th>mean</th>"
            "<th>std over seeds</th><th>switch epochs</th><th>parameters</th><th>Optuna check</th></tr>")
    rows = "".join(
        f"<tr><td>{_esc(r.workload)}</td><td>{_esc(r.study)}</td><td>{_esc(r.optimizer)}</td>"
        f"<td class='num'>{int(r.trial)}</td><td>{_esc(r.objective)}</td><td class='num'>{_number(r.value)}</td>"
        f"<td class='num'>{_number(r.std)}</td><td>{_esc(r.switch_epochs)}</td><td>{_esc(r.params)}</td>"
        f"<td>{_esc(r.checked)}</td></tr>"
        for r in best.itertuples())
    return f"<table id='best-configurations'>{head}{rows}</table>"


def _counts_html(studies: Sequence[StudyRuns]) -> str:
    rows = []
    for study in studies:
        counts: dict[str, int] = {}
        for trial in study.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        workload = study.parent_tags.get(Tags.WORKLOAD, "")
        optimizer = study.parent_tags.get(Tags.OPTIMIZER, "")
        rows.append(f"<tr><td>{_esc(study.study)}</td><td>{_esc(workload)}</td><td>{_esc(optimizer)}</td>"
                    f"<td>{_esc(study.objective)} ({_esc(study.direction)})</td>"
                    f"<td>{_esc(', '.join(f'{k} {v}' for k, v in sorted(counts.items())))}</td>"
                    f"<td>{_esc(study.parent_run_id or '-')}</td></tr>")
    return ("<table id='studies'><tr><th>study</th><th>workload</th><th>optimizer</th><th>objective</th>"
            f"<th>trials</th><th>parent run</th></tr>{''.join(rows)}</table>")


def render_html(studies: Sequence[StudyRuns], plots: Sequence[Plot], best: pd.DataFrame, skipped: dict[str, str],
                notes: Sequence[str], out_dir: Path, tracking_uri: str) -> str:
    """The report page: studies, best configurations, every drawn plot (embedded PNG, SVG linked), and the
    plots not drawn with their reasons. Reads the PNG files :meth:`Plot.save` wrote into ``out_dir``."""
    names = ", ".join(s.study for s in studies)
    figures = []
    for plot in plots:
        if not plot:
            continue
        png = out_dir / f"{plot.name}.png"
        if not png.is_file():
            continue
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        svg = f" <a href='{_esc(plot.name)}.svg'>SVG</a>" if (out_dir / f"{plot.name}.svg").is_file() else ""
        figures.append(f"<section id='{_esc(plot.name)}'><h2>{_esc(plot.title)}</h2><figure>"
                       f"<img alt='{_esc(plot.title)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{_esc(plot.name)}.png{svg}</figcaption></figure></section>")
    skipped_html = "".join(f"<li><b>{_esc(k)}</b>: {_esc(v)}</li>" for k, v in skipped.items())
    notes_html = "".join(f"<li>{_esc(n)}</li>" for n in notes)
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>fuse report: {_esc(names)}</title><style>{_STYLE}</style></head>
<body>
<h1>fuse report: {_esc(names)}</h1>
<p class="meta">MLflow: {_esc(redact(tracking_uri))} &middot; generated {when} by fuse-tune report</p>
{_counts_html(studies)}
<h2>Best configuration per workload</h2>
{_best_html(best)}
{"<h2>Notes</h2><ul>" + notes_html + "</ul>" if notes_html else ""}
{''.join(figures)}
{"<h2>Not drawn</h2><ul class='skipped'>" + skipped_html + "</ul>" if skipped_html else ""}
</body></html>
"""
