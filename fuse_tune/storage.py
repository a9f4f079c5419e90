"""Where a study's state lives: storage URLs made absolute, and the Optuna storage opened, in one place.

Both backends, the comparisons and ``fuse-tune report`` go through these functions. No torch here (the
dashboards import this module to re-open a study's Optuna storage); Optuna and SQLAlchemy are imported when a
storage is opened.

Storage URLs (``--storage`` or the study file's ``storage``):

* default: Optuna's journal file ``./fuse-studies.log`` (``JournalFileBackend``); ``journal:PATH`` or a path
  ending in ``.log``/``.jsonl``/``.journal`` names another;
* ``sqlite:///...``: one process only (SQLite locks under parallel writers);
* any other SQLAlchemy URL (``postgresql://user:pw@host/db``): many machines, with heartbeats and one retry of a
  trial whose worker died. A ``postgresql://`` (or ``postgres://``) URL that names no driver is opened with the
  driver installed: psycopg2 (``psycopg2-binary``, in the ``tuning`` extra) unless psycopg 3 is there, which
  SQLAlchemy 2.1 would pick for it.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from fuse_tune.errors import UserError
from fuse_tune.records import redact

__all__ = ["DEFAULT_JOURNAL", "import_optuna", "absolute_sqlite_url", "resolve_storage_url", "resolve_tracking_uri",
           "database_url", "open_storage"]

DEFAULT_JOURNAL = "fuse-studies.log"
_JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")


def import_optuna() -> Any:
    """The ``optuna`` module with its logging at WARNING, or a one-line :class:`UserError` naming the extra."""
    try:
        import optuna
    except ImportError:  # pragma: no cover - depends on the install
        raise UserError("studies need the 'tuning' extra: pip install 'fuse[tuning]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def absolute_sqlite_url(url: str, workdir: str | os.PathLike[str] | None = None) -> str:
    """``sqlite:///relative.db`` -> ``sqlite:////<workdir>/relative.db``; any other URL as it is.

    A relative SQLite path is read from the working directory of whoever opens it: a worker process, a Ray
    trial in its own folder, a later ``fuse-tune report``. Made absolute once, where the user gave it, it
    means the same to all of them."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{(Path(workdir or os.getcwd()) / url[len('sqlite:///'):]).resolve()}"
    return url


def resolve_storage_url(url: str | None, workdir: str | os.PathLike[str] | None = None) -> str:
    """An absolute Optuna storage URL: the default journal, ``journal:PATH``, a ``*.log`` path, or a DB URL."""
    workdir = Path(workdir or os.getcwd())
    if url is None:
        return f"journal:{(workdir / DEFAULT_JOURNAL).resolve()}"
    if url.startswith("journal:"):
        return f"journal:{(workdir / url[len('journal:'):]).resolve()}"
    if "://" not in url:
        if url.endswith(_JOURNAL_SUFFIXES):
            return f"journal:{(workdir / url).resolve()}"
        raise UserError(f"storage must be a URL (sqlite:///..., postgresql://...) or journal:PATH, "
                         f"got {redact(url)!r}")
    return absolute_sqlite_url(url, workdir)


def resolve_tracking_uri(uri: str | None, workdir: str | os.PathLike[str] | None = None) -> str | None:
    """An MLflow URI that means the same from any working directory (relative sqlite/file paths made absolute)."""
    if uri is None:
        return None
    workdir = Path(workdir or os.getcwd())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return (workdir / uri[len("file:"):]).resolve().as_uri()
    if "://" not in uri and not uri.startswith("file:"):
        return str((workdir / uri).resolve())
    return absolute_sqlite_url(uri, workdir)


def database_url(url: str) -> str:
    """The SQLAlchemy URL to open for a storage URL: ``postgresql://`` (or ``postgres://``) without a driver gets
    the installed one, ``postgresql+psycopg2://`` unless psycopg 3 is installed; any other URL as it is.

    SQLAlchemy 2.1 opens a bare ``postgresql://`` with psycopg 3 (``Failed to import DB access module`` when only
    psycopg2 is installed), and has no ``postgres://`` alias at all; the URL the user wrote is what fuse shows."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    if importlib.util.find_spec("psycopg") is not None:
        return f"postgresql+psycopg://{rest}"
    if importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    raise UserError(f"storage {redact(url)}: no PostgreSQL driver is installed; pip install 'fuse-optim[tuning]' "
                     "(it brings psycopg2-binary)")


def open_storage(url: str, *, create: bool = True) -> Any:
    """The Optuna storage object for a URL from :func:`resolve_storage_url`.

    ``create=True`` (the backends): a missing journal file and its folder are made, a database gets Optuna's
    tables, and a database server other than SQLite gets heartbeats and one retry of a dead worker's trial.
    ``create=False`` (reading a study, ``fuse-tune report``): nothing is made; a journal file that does not
    exist raises ``FileNotFoundError`` (``journal file PATH not found``)."""
    optuna = import_optuna()
    journal = url[len("journal:"):] if url.startswith("journal:") else (
        url if "://" not in url and url.endswith(_JOURNAL_SUFFIXES) else None)
    if journal is not None:
        from optuna.storages.journal import JournalFileBackend

        path = Path(journal)
        if not create and not path.is_file():
            raise FileNotFoundError(f"journal file {path} not found")
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if not create:
        return optuna.storages.RDBStorage(database_url(url), skip_table_creation=True)
    if url.startswith("sqlite:"):
        return optuna.storages.RDBStorage(url)
    return _open_database_server(optuna, url)


def _open_database_server(optuna: Any, url: str) -> Any:
    """A shared database (PostgreSQL, MySQL) for workers on many machines."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    engine_url = database_url(url)
    try:
        for attempt in range(6):
            try:
                with warnings.catch_warnings():
                    # Heartbeats are "experimental" and failed_trial_callback "deprecated" in Optuna 5, and both
                    # are what keeps a dead worker's trial from staying RUNNING: keep stderr to one line.
                    warnings.simplefilter("ignore", FutureWarning)
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        engine_url, heartbeat_interval=30, grace_period=90,
                        failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
                        engine_kwargs={"pool_pre_ping": True},
                    )
            except (IntegrityError, ProgrammingError):
                # Workers started together on an empty database race to create Optuna's tables (duplicate
                # pg_type / relation): the losers retry and find the tables made.
                if attempt == 5:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except Exception as exc:  # connection refused, bad credentials, missing driver, ...
        raise UserError(f"storage {redact(url)}: cannot open ({type(exc).__name__}: "
                         f"{redact(str(exc).splitlines()[0] if str(exc) else '')})") from None
