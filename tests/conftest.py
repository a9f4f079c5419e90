"""Session-scoped fixtures for real servers (see tests/services.py). Nothing here is autouse: only tests that ask
for ``postgres_server``, ``postgres_url`` or ``mlflow_server`` start a server, once per session, and each of those
fixtures skips with the reason when the server's prerequisites are missing on this machine."""

from __future__ import annotations

import pytest

from .services import MlflowServer, PostgresServer, ServiceUnavailable


@pytest.fixture(scope="session")
def postgres_server():
    """A running :class:`tests.services.PostgresServer` (``.url``, ``.password``, ``.new_database()``, ...)."""
    server = PostgresServer()
    try:
        server.start()
    except ServiceUnavailable as e:
        pytest.skip(f"PostgreSQL unavailable: {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """SQLAlchemy URL ``postgresql+psycopg2://fuse:secret-pw@127.0.0.1:PORT/fuse`` of a database shared by the
    session: use unique study names, or ``postgres_server.new_database()`` for an empty database."""
    return postgres_server.url


@pytest.fixture(scope="session")
def mlflow_server():
    """A running :class:`tests.services.MlflowServer`: ``.uri`` is ``http://127.0.0.1:PORT``; artifacts are
    proxied over HTTP into ``.artifacts_dir``; the server log is ``.log_path``."""
    server = MlflowServer()
    try:
        server.start()
    except ServiceUnavailable as e:
        pytest.skip(f"MLflow server unavailable: {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after (small models: threads cost more than they give, and two
    test processes on two cores would fight over them)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
