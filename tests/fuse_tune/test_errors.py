"""User errors against bugs: bad input is one line and exit 2 (``--debug``: with its traceback); any other
exception is a bug and shows its traceback, whatever its type (a plain ``ValueError`` included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fuse_tune import optimizers
from fuse_tune.cli import CLIError, main
from fuse_tune.errors import UserError
from fuse_tune.spec import SpecError

STUDY = {
    "name": "errors", "workload": "digits-logreg", "optimizer": "adam", "epochs": 1, "seeds": [0],
    "search": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, "budget": {"trials": 1},
}


def bad_study(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "epoch": 3}))  # unknown top-level field
    return path


def run_args(path: Path, tmp_path: Path) -> list[str]:
    return ["run", str(path), "--no-mlflow", "--storage", f"journal:{tmp_path / 'j.log'}", "--quiet"]


def test_user_errors_are_value_errors_of_their_own_type():
    from dashboards.data import NoRuns
    from fuse_tune.ray_backend import ResourceError
    from fuse_tune.workloads import DatasetNotFound

    for kind in (SpecError, CLIError, ResourceError, NoRuns, DatasetNotFound):
        assert issubclass(kind, UserError) and issubclass(kind, ValueError), kind
    assert issubclass(DatasetNotFound, FileNotFoundError)  # still caught as a missing file


def test_a_bad_study_file_is_one_line_and_exit_2(tmp_path, capsys):
    path = bad_study(tmp_path)
    code = main(run_args(path, tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert err.startswith(f"fuse-tune: error: {path}: epoch: unknown field; accepted: ['budget', 'data_dir'")


def test_debug_shows_the_traceback_of_a_user_error_and_still_exits_2(tmp_path, capsys):
    path = bad_study(tmp_path)
    code = main(["--debug", *run_args(path, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback (most recent call last)" in err and "SpecError" in err
    assert err.splitlines()[-1].startswith(f"fuse-tune: error: {path}: epoch: unknown field")


def test_a_bug_is_not_reported_as_bad_input(monkeypatch, capsys):
    def broken(name):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(optimizers, "accepted_arguments", broken)  # what `fuse-tune list` calls
    with pytest.raises(ValueError, match="a bug"):
        main(["list"])  # not turned into exit 2: it propagates, and Python prints its traceback (exit 1)
    assert "fuse-tune: error:" not in capsys.readouterr().err


def test_a_bug_shows_its_traceback_and_exits_1_in_the_real_command():
    script = ("import sys\n"
              "from fuse_tune import optimizers\n"
              "def broken(name):\n"
              "    raise RuntimeError('a bug')\n"
              "optimizers.accepted_arguments = broken\n"
              "from fuse_tune.cli import main\n"
              "sys.exit(main(['list']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "RuntimeError: a bug" in done.stderr
    assert "fuse-tune: error:" not in done.stderr


def test_a_refused_training_setting_is_a_user_error_with_its_cause_under_debug(capsys):
    args = ["train", "--workload", "digits-logreg", "--optimizer", "adam", "--set", "lr=-1", "--epochs", "1",
            "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "learning rate" in err
    assert main(["--debug", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError" in err and "learning rate" in err.splitlines()[-1]


def test_a_base_install_without_the_tuning_extra_gets_one_line(monkeypatch, capsys):
    """``pip install fuse-optim`` brings torch alone; ``fuse-tune`` then says which extra it needs."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "yaml" else find_spec(name, *a))
    assert main(["list"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fuse-tune: error: fuse-tune needs the 'tuning' extra (missing: yaml): "
                   "pip install 'fuse-optim[tuning]'")


def test_a_postgresql_url_without_a_driver_opens_with_the_installed_one(monkeypatch):
    """SQLAlchemy 2.1 opens a bare ``postgresql://`` with psycopg 3; fuse opens it with the driver installed
    (psycopg2 from the tuning extra), and says which extra to install when there is none."""
    import importlib.util

    from fuse_tune.storage import database_url

    assert database_url("postgresql+psycopg2://u:pw@h/db") == "postgresql+psycopg2://u:pw@h/db"
    assert database_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    real = importlib.util.find_spec
    for installed, expected in (({"psycopg2"}, "postgresql+psycopg2://u:pw@h/db"),
                                ({"psycopg", "psycopg2"}, "postgresql+psycopg://u:pw@h/db")):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, ok=installed: (real("os") if name in ok else None)
                            if name in ("psycopg", "psycopg2") else real(name, *a))
        assert database_url("postgresql://u:pw@h/db") == expected
        assert database_url("postgres://u:pw@h/db") == expected
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("psycopg", "psycopg2") else real(name, *a))
    with pytest.raises(UserError, match=r"^storage postgresql://u:\*\*\*@h/db: no PostgreSQL driver .*tuning"):
        database_url("postgresql://u:pw@h/db")


def test_check_tracking_server_passes_what_is_not_a_server_and_answers_in_seconds():
    import socket
    import time

    from fuse_tune.tracking import check_tracking_server

    for uri in (None, "", "sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "databricks"):
        check_tracking_server(uri)  # not an HTTP server: nothing to check
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(UserError, match=rf"^--mlflow-uri http://u:\*\*\*@127.0.0.1:{port}: no MLflow tracking"):
            check_tracking_server(f"http://u:pw@127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - started < 5


class _Answering:
    """A local HTTP server that answers every GET with ``status`` (what a wrong port or a proxy may be)."""

    def __init__(self, status: int) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Answering:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_check_tracking_server_refuses_what_answers_but_is_not_mlflow():
    """Every MLflow server has /health: a 404 there is another service (MLflow's client would then fail with a
    traceback on its first call); 401 and 403 are an auth layer in front of a server, which passes."""
    from fuse_tune.tracking import check_tracking_server

    with _Answering(404) as other:
        with pytest.raises(UserError, match="HTTP 404 from /health: something answers there, but not MLflow"):
            check_tracking_server(f"http://127.0.0.1:{other.port}", timeout=2)
    with _Answering(401) as guarded:
        check_tracking_server(f"http://127.0.0.1:{guarded.port}", timeout=2)


def test_check_ray_cluster_refuses_what_answers_but_is_not_ray():
    """A port that accepts connections but is not a Ray GCS (here an HTTP server): one line within seconds, where
    ray.init would retry for 40 s and more."""
    import time

    pytest.importorskip("ray")
    from fuse_tune.ray_backend.resources import check_ray_cluster

    with _Answering(200) as other:
        started = time.monotonic()
        with pytest.raises(UserError, match=rf"^--address 127.0.0.1:{other.port}: (what answers .* is not a Ray "
                                            rf"cluster|no Ray cluster answers .* within 3 s)"):
            check_ray_cluster(f"127.0.0.1:{other.port}", timeout=3)
        assert time.monotonic() - started < 20
