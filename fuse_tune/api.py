"""The Python API: run a study from a notebook or a script, as ``fuse-tune run`` does from a terminal.

    import fuse_tune

    result = fuse_tune.run_study(
        {"name": "my-switch", "workload": "mypackage.models:build", "optimizer": "fuse_pv", "epochs": 6,
         "seeds": [0, 1], "fixed": {"batch_size": 64},
         "search": {"switch.epoch": {"type": "int", "low": 1, "high": 5}}, "budget": {"trials": 8}},
        backend="optuna",                 # or "ray"
    )
    result.best            # {"trial": 3, "value": 0.97, "std": ..., "params": {...}, "config": {...}}
    result.trials          # one dict per trial; result.trials_frame() as a pandas DataFrame

``study`` is a study file's path or the same content as a dict; ``workload=`` may pass the builder itself (a
function returning a :class:`fuse_tune.Problem`), which then replaces the study's ``workload``. Everything the
CLI does happens here too, through the same code: the up-front server checks, the dry run of every setting,
the storage, the MLflow parent and child runs (so the records are the CLI's, run for run), resume on rerun.
Bad input raises :class:`fuse_tune.errors.UserError` with the one line the CLI would print.

A builder defined in an importable module is referred to by its import path (``module:qualname``) and found by
every worker process. One defined in a notebook or a script's ``__main__`` cannot be imported by another
process: it runs in this process (the Optuna backend with ``n_jobs=1``), or is shipped by value to Ray's
workers (cloudpickle) with ``backend="ray"``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuse_tune.errors import UserError

__all__ = ["StudyResult", "run_study", "builder_reference"]


@dataclass
class StudyResult:
    """What a study ended with.

    Attributes:
        spec: the study as run (objective resolved).
        best: the best complete trial: ``trial`` (its number), ``value`` and ``std`` (of the objective over the
            study's seeds), ``cost``, ``switch_epochs``, ``params`` (the sampled values) and ``config`` (the fixed
            settings with the sampled ones, nested: what to train with); ``None`` when no trial completed.
        trials: one dict per trial, by trial number: ``trial``, ``state``, ``value``, ``std``, ``cost``,
            ``switch_epochs`` and one key per sampled parameter (:meth:`trials_frame`: the same as a DataFrame).
        summary: the backend's summary (``counts()``, ``best_rows()``, ``locations()``).
        experiment: the MLflow experiment (= study name); ``parent_run_id``: the study's MLflow parent run.
    """

    spec: Any
    best: dict[str, Any] | None
    trials: Any
    summary: Any
    experiment: str
    parent_run_id: str | None

    def trials_frame(self) -> Any:
        """:attr:`trials` as a pandas DataFrame (pandas comes with the ``dashboards`` extra)."""
        import pandas as pd

        return pd.DataFrame(self.trials)


def builder_reference(builder: Callable[..., Any]) -> tuple[str, tuple[str, ...]] | None:
    """``("package.module:qualname", (folder the package is found in,))`` for a builder another process can
    import; ``None`` for one defined in ``__main__``, a notebook, or a nested scope."""
    module_name = getattr(builder, "__module__", None)
    qualname = getattr(builder, "__qualname__", "")
    module = sys.modules.get(module_name or "")
    if module is None or module_name == "__main__" or "<locals>" in qualname or not getattr(module, "__file__", None):
        return None
    root = Path(module.__file__).resolve().parent
    for _ in range(module_name.count(".") + (1 if Path(module.__file__).stem == "__init__" else 0)):
        root = root.parent
    return f"{module_name}:{qualname}", (str(root),)


def _spec_of(study: Mapping[str, Any] | str | os.PathLike[str], builder: Callable[..., Any] | None,
             backend: str, n_jobs: int | None) -> Any:
    import yaml

    from fuse_tune.spec import SpecError, parse_spec, read_spec

    if isinstance(study, Mapping):
        raw = dict(study)
        if builder is not None and not raw.get("workload"):
            raw["workload"] = "builder:passed"  # replaced below by the builder's reference or registered name
        spec = parse_spec(raw, source=yaml.safe_dump(raw, sort_keys=False))
    elif isinstance(study, str | os.PathLike):
        spec = read_spec(study)
    else:
        raise UserError(f"study: expected a study file's path or a dict of its settings, got {type(study).__name__}")
    if builder is None:
        return spec
    if not callable(builder):
        raise UserError(f"workload: expected a builder function or None, got {type(builder).__name__}")
    reference = builder_reference(builder)
    if reference is not None:
        return dataclasses.replace(spec, workload=reference[0], workload_path=reference[1])
    from fuse_tune.workloads import register_workload

    name = f"{getattr(builder, '__module__', 'local')}.{getattr(builder, '__qualname__', 'builder')}"
    if backend == "optuna" and (n_jobs or 1) > 1:
        raise SpecError(f"workload: {name} is defined in __main__ or a notebook, which worker processes cannot "
                        f"import: use n_jobs=1, backend='ray', or move it into a module")
    register_workload(name, builder)
    return dataclasses.replace(spec, workload=name)


def run_study(study: Mapping[str, Any] | str | os.PathLike[str], *, workload: Callable[..., Any] | None = None,
              backend: str = "optuna", n_trials: int | None = None, n_jobs: int | None = None,
              storage: str | None = None, mlflow_uri: str | None = "default", address: str | None = None,
              threads: int | None = None, device: str | None = None, data_dir: str | os.PathLike[str] | None = None,
              resume_only: bool = False, progress: bool = False) -> StudyResult:
    """Run (or resume) a study on the Optuna or the Ray backend; see the module docstring.

    Args:
        study: a study file's path, or its settings as a dict (the file's keys).
        workload: the builder function itself (replaces the study's ``workload``).
        backend: ``"optuna"`` (worker processes on this machine) or ``"ray"`` (a local Ray or ``address``).
        n_trials: finished trials to reach (default: the study's budget).
        n_jobs: Optuna: worker processes (default 1); Ray: trials at once (default: as many as fit).
        storage: the Optuna storage URL (default: the study's, else the journal ``./fuse-studies.log``); Ray:
            the results folder.
        mlflow_uri: the tracking URI (``"default"``: ``sqlite:///$PWD/mlflow.db``; ``None``: no tracking).
        address: a Ray cluster's ``HOST:PORT`` (Ray only).
        threads, device: torch threads per worker and the device (``auto``, ``cpu``, ``cuda[:i]``).
        data_dir: the data folder handed to the workload (replaces the study's ``data_dir``).
        resume_only: the study must exist already (``fuse-tune resume``).
        progress: show progress bars.
    """
    if backend not in ("optuna", "ray"):
        raise UserError(f"backend: expected 'optuna' or 'ray', got {backend!r}")
    if backend != "ray" and address:
        raise UserError("address joins a Ray cluster: use it with backend='ray'")
    from fuse_tune.servers import check_cluster_address, check_tracking_server
    from fuse_tune.tracking import default_tracking_uri

    tracking = default_tracking_uri() if mlflow_uri == "default" else mlflow_uri
    # Servers first, in seconds: MLflow's client retries a dead tracking server for minutes, Ray a missing cluster
    # for 90 s and more, and the study's dry run below imports torch.
    check_tracking_server(tracking)
    if backend == "ray" and (address or os.environ.get("RAY_ADDRESS")):
        flag = "--address" if address else "RAY_ADDRESS"
        check_cluster_address(address or os.environ["RAY_ADDRESS"], flag)
        from fuse_tune.ray_backend.resources import check_ray_cluster

        check_ray_cluster(address or os.environ["RAY_ADDRESS"], flag)  # what answers there is Ray's GCS
    from fuse_tune.spec import SpecError
    from fuse_tune.trial import check_spec

    spec = _spec_of(study, workload, backend, n_jobs)
    if data_dir is not None:
        spec = dataclasses.replace(spec, data_dir=str(Path(data_dir).resolve()))
    try:
        spec = check_spec(spec)  # the dry run through the real constructors; the objective resolved
    except SpecError as exc:
        where = study if isinstance(study, str | os.PathLike) else None
        raise SpecError(f"{where}: {exc}" if where is not None else str(exc)) from None
    options = dict(n_trials=n_trials, storage=storage, tracking_uri=tracking, must_exist=resume_only,
                   threads=threads, device=device, progress=progress)
    if backend == "ray":
        from fuse_tune.ray_backend import run_ray_study

        summary = run_ray_study(spec, n_jobs=n_jobs, address=address, **options)
    else:
        from fuse_tune.optuna_backend import run_study as run_optuna_study

        summary = run_optuna_study(spec, n_jobs=1 if n_jobs is None else n_jobs, **options)
    return _result(spec, summary)


def _result(spec: Any, summary: Any) -> StudyResult:
    rows = sorted(summary.trial_rows(), key=lambda row: (row.number is None, row.number or 0))
    table = [{"trial": row.number, "state": row.state, "value": row.value, "std": row.std, "cost": row.cost,
              "switch_epochs": list(row.switch_epochs or []), **(row.params or {})} for row in rows]
    best_rows = summary.best_rows(limit=1)
    best = None
    if best_rows:
        best = {**best_rows[0], "config": spec.configuration(best_rows[0]["params"])}
    return StudyResult(spec=spec, best=best, trials=table, summary=summary, experiment=spec.name,
                       parent_run_id=summary.parent_run_id)
