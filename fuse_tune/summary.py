"""What a study ended with, the same for both backends: trial counts by state and the best configurations.

Each backend turns its own trials (Optuna's ``FrozenTrial``, Tune's ``Result``) into :class:`TrialRow` and says
where its state lives; counting, ranking and the lines ``fuse-tune run`` prints are written once here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fuse_tune.records import redact, short_value

__all__ = ["TrialRow", "StudySummaryBase", "summary_lines", "runs_table_url"]


@dataclass(frozen=True)
class TrialRow:
    """One trial as a summary sees it. ``state``: Optuna's state names (``COMPLETE``, ``PRUNED``, ``FAIL``,
    ``RUNNING``, ...), which the Ray backend uses too; ``value``, ``std`` and ``cost`` for a complete trial."""

    number: int | None
    state: str
    value: float | None = None
    std: float | None = None
    cost: float | None = None
    switch_epochs: Sequence[int | None] | None = None
    params: dict[str, Any] | None = None


class StudySummaryBase:
    """``counts()`` and ``best_rows()`` over a backend's :meth:`trial_rows`; :meth:`locations` says where to look.

    Subclasses (dataclasses with ``storage_url``, ``tracking_uri``, ``parent_run_id``) implement
    :meth:`trial_rows`, :attr:`maximize` and :meth:`locations`."""

    storage_url: str
    tracking_uri: str | None
    parent_run_id: str | None

    def trial_rows(self) -> list[TrialRow]:
        raise NotImplementedError

    @property
    def maximize(self) -> bool:
        raise NotImplementedError

    def locations(self) -> list[str]:
        """Lines that say where the study's state and runs are (printed after the best configurations)."""
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        """Trials by state name: ``{"COMPLETE": 3, "PRUNED": 1}``."""
        counts: dict[str, int] = {}
        for row in self.trial_rows():
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts

    def best_rows(self, limit: int = 5) -> list[dict[str, Any]]:
        """The best ``limit`` complete trials by their (first) objective, best first; ties keep trial order.
        Keys: trial, value, std, cost, switch_epochs, params."""
        complete = [row for row in self.trial_rows() if row.state == "COMPLETE"]
        complete.sort(key=lambda row: row.value, reverse=self.maximize)
        return [{"trial": row.number, "value": row.value, "std": row.std, "cost": row.cost,
                 "switch_epochs": row.switch_epochs, "params": row.params or {}} for row in complete[:limit]]

    def mlflow_lines(self) -> list[str]:
        """How to browse the runs: the ``mlflow ui`` command for a local store, and the runs table's address."""
        if not self.tracking_uri:
            return []
        served = self.tracking_uri.startswith(("http://", "https://"))
        lines = [] if served else [f"browse the runs: mlflow ui --backend-store-uri {redact(self.tracking_uri)}"]
        experiment_id = self._experiment_id()
        if experiment_id is not None:
            base = self.tracking_uri if served else "http://127.0.0.1:5000"
            lines.append(f"{'browse the runs' if served else 'then open'}: {runs_table_url(base, experiment_id)}")
        return lines

    def _experiment_id(self) -> str | None:
        if not self.parent_run_id:
            return None
        try:
            from mlflow.tracking import MlflowClient

            return MlflowClient(self.tracking_uri).get_run(self.parent_run_id).info.experiment_id
        except Exception:  # the summary must not fail on a tracking store that went away
            return None


def runs_table_url(ui: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment. MLflow 3's UI keeps its GenAI / model-training switch in the
    browser (``localStorage``, GenAI by default) whatever the experiment's ``mlflow.experimentKind``: a fresh browser
    would open on the GenAI traces overview, so the address asks for the model-training view explicitly."""
    return f"{redact(ui).rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def summary_lines(spec: Any, summary: StudySummaryBase) -> list[str]:
    """What ``fuse-tune run`` prints when a study ends (either backend): counts, the best configurations, then
    :meth:`StudySummaryBase.locations`."""
    counts = summary.counts()
    lines = [f"study {spec.name}: " + ", ".join(f"{n.lower()} {c}" for n, c in sorted(counts.items()))]
    rows = summary.best_rows()
    if rows:
        metric = spec.objective.metric
        lines.append(f"best configurations ({metric}, mean +- std over seeds {list(spec.seeds)}):")
        lines.append(f"  {'trial':>5}  {metric:>16}  {'std':>8}  {'switch epochs':>13}  parameters")
        for row in rows:
            switch = ",".join("-" if e is None else str(e) for e in (row["switch_epochs"] or []))
            params = ", ".join(f"{k}={short_value(v)}" for k, v in row["params"].items())
            std = "" if row["std"] is None or not math.isfinite(row["std"]) else f"{row['std']:.4g}"
            lines.append(f"  {row['trial']:>5}  {row['value']:>16.6g}  {std:>8}  {switch:>13}  {params}")
    return lines + summary.locations()
