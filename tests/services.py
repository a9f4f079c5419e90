"""Real servers for tests: PostgreSQL and an MLflow tracking server on 127.0.0.1, each in a temporary directory.

Both classes are context managers::

    with PostgresServer() as pg:        # pg.url: postgresql+psycopg2://fuse:secret-pw@127.0.0.1:PORT/fuse
        ...
    with MlflowServer() as ml:          # ml.uri: http://127.0.0.1:PORT
        ...

They raise :class:`ServiceUnavailable` when a prerequisite is missing (PostgreSQL binaries, a user to run
PostgreSQL as when we are root, the mlflow package); any other failure to start raises ``RuntimeError`` with
the tail of the server's log. ``tests/conftest.py`` turns ``ServiceUnavailable`` into a skip.

Only the standard library is imported at module level; psycopg2 is imported when a server is started.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["ServiceUnavailable", "PostgresServer", "MlflowServer", "free_port", "find_postgres_bin"]

HOST = "127.0.0.1"


class ServiceUnavailable(RuntimeError):
    """A prerequisite of a server (binaries, a system user, a Python package) is missing on this machine."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it; a server may still race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _version_key(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[./]", path) if p)


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None.

    Order: ``$FUSE_PG_BIN``, the newest ``/usr/lib/postgresql/*/bin`` (Debian keeps the server binaries off
    ``PATH``), then the directory of ``pg_ctl`` on ``PATH`` (symlinks resolved).
    """
    names = ("initdb", "pg_ctl", "postgres")
    candidates: list[Path] = []
    if os.environ.get("FUSE_PG_BIN"):
        candidates.append(Path(os.environ["FUSE_PG_BIN"]))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for d in candidates:
        if all(os.access(d / n, os.X_OK) for n in names):
            return d
    return None


class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>.

    - ``initdb`` in a fresh temporary directory; the bootstrap superuser (``postgres``) may connect only over
      the Unix socket in that directory (trust); TCP connections need a password (scram-sha-256).
    - Creates the login role ``user`` with ``password`` (not a superuser) and the database ``dbname`` it owns.
    - PostgreSQL refuses to run as root: when we are root, every server command runs as the unprivileged
      ``run_as`` user (default: the ``postgres`` system user made by the Debian package) via ``runuser``, and
      the temporary directory is handed to that user. When not root, the commands run as the current user.
    - Durability is switched off (fsync, synchronous_commit, full_page_writes): it is a test server.

    Attributes once started: ``url`` (SQLAlchemy URL with the password), ``password``, ``user``, ``dbname``,
    ``host``, ``port``, ``directory``, ``log_path``, ``bin_dir``, ``startup_seconds``.
    """

    def __init__(self, user: str = "fuse", password: str = "secret-pw", dbname: str = "fuse",
                 run_as: str = "postgres", startup_timeout: float = 60.0) -> None:
        self.user, self.password, self.dbname = user, password, dbname
        self.host = HOST
        self.port: int | None = None
        self.run_as = run_as
        self.startup_timeout = startup_timeout
        self.directory: Path | None = None
        self.log_path: Path | None = None
        self.bin_dir: Path | None = None
        self.startup_seconds: float | None = None
        self._running = False
        self._uid_gid: tuple[int, int] | None = None

    # -- public API ---------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.directory is not None
        return self.directory / "data"

    def url_for(self, dbname: str, driver: str = "psycopg2") -> str:
        """SQLAlchemy URL for ``dbname`` on this server, as ``self.user``."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def connect(self, dbname: str | None = None):
        """A psycopg2 connection over TCP with the password, as an application would connect."""
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=dbname or self.dbname, connect_timeout=5)

    def new_database(self, name: str | None = None) -> str:
        """Create an empty database owned by ``self.user`` and return its URL (for tests wanting isolation)."""
        name = name or f"db_{os.getpid()}_{time.monotonic_ns()}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"database name must be a plain identifier: {name!r}")
        self._admin_sql(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return self.url_for(name)

    def start(self) -> PostgresServer:
        bin_dir = find_postgres_bin()
        if bin_dir is None:
            raise ServiceUnavailable("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
                                     "/usr/lib/postgresql/*/bin or on PATH; run scripts/install-system-deps.sh "
                                     "as root (Debian package 'postgresql')")
        self.bin_dir = bin_dir
        self._uid_gid = self._pick_user()
        t0 = time.monotonic()
        self.directory = Path(tempfile.mkdtemp(prefix="fuse-pg-"))
        atexit.register(self.stop)
        try:
            self._initdb()
            for attempt in range(3):
                self.port = free_port()
                self._configure()
                if self._pg_ctl_start():
                    break
                if attempt == 2 or "could not bind" not in _tail(self.log_path, 20).lower():
                    raise RuntimeError(f"PostgreSQL did not start; log {self.log_path}:\n{_tail(self.log_path)}")
            self._running = True
            self._wait_ready_superuser(t0)
            self._bootstrap_role_and_db()
            self._wait_ready_app(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """``pg_ctl stop -m fast`` (then ``-m immediate``), remove the directory. Safe to call twice."""
        if self.directory is None:
            return
        # postmaster.pid also covers a start that timed out with the server still coming up.
        if self._running or (self.data_dir / "postmaster.pid").exists():
            for mode in ("fast", "immediate"):
                r = self._run([self.bin_dir / "pg_ctl", "stop", "-D", self.data_dir, "-m", mode, "-w", "-t", "30"],
                              check=False)
                if r.returncode == 0:
                    break
            else:  # pragma: no cover - last resort
                self._kill_postmaster()
        self._running = False
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:  # never show the password
        return f"PostgresServer(host={self.host!r}, port={self.port}, user={self.user!r}, dbname={self.dbname!r})"

    # -- internals ----------------------------------------------------------------------------------

    def _pick_user(self) -> tuple[int, int] | None:
        """(uid, gid) to run the server as, or None to run as ourselves."""
        if os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam(self.run_as)
        except KeyError:
            raise ServiceUnavailable(
                f"running as root and there is no '{self.run_as}' user to run PostgreSQL as (PostgreSQL refuses "
                "to run as root); install the Debian package 'postgresql', which creates it") from None
        if not (shutil.which("runuser") or shutil.which("su")):
            raise ServiceUnavailable("running as root and neither runuser nor su is available to drop privileges")
        return pw.pw_uid, pw.pw_gid

    def _as_server_user(self, argv: list) -> list[str]:
        argv = [str(a) for a in argv]
        if self._uid_gid is None:
            return argv
        if shutil.which("runuser"):
            return ["runuser", "-u", self.run_as, "--", *argv]
        return ["su", "-s", "/bin/sh", self.run_as, "-c", shlex.join(argv)]

    def _run(self, argv: list, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        r = subprocess.run(self._as_server_user(argv), cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{shlex.join(map(str, argv))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def _chown(self, path: Path) -> None:
        if self._uid_gid is not None:
            os.chown(path, *self._uid_gid)

    def _initdb(self) -> None:
        assert self.directory is not None
        self._chown(self.directory)  # mkdtemp made it 0700, owned by us
        self.log_path = self.directory / "postgres.log"
        # -U postgres: the bootstrap superuser, reachable only through the Unix socket (trust).
        self._run([self.bin_dir / "initdb", "-D", self.data_dir, "-U", "postgres", "--encoding=UTF8",
                   "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions"])

    def _configure(self) -> None:
        # postgresql.auto.conf is read after postgresql.conf, last setting wins; rewriting it on a retry is fine.
        conf = self.data_dir / "postgresql.auto.conf"
        conf.write_text(
            "# written by tests/services.py\n"
            f"listen_addresses = '{self.host}'\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = '{self.directory}'\n"
            "max_connections = 100\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            "logging_collector = off\n"
        )
        self._chown(conf)

    def _pg_ctl_start(self) -> bool:
        r = self._run([self.bin_dir / "pg_ctl", "start", "-D", self.data_dir, "-l", self.log_path, "-w",
                       "-t", str(int(self.startup_timeout))], check=False, timeout=self.startup_timeout + 30)
        return r.returncode == 0

    def _admin_sql(self, sql: str, dbname: str = "postgres") -> None:
        """Run one statement as the superuser over the Unix socket (trust)."""
        import psycopg2

        conn = psycopg2.connect(host=str(self.directory), port=self.port, user="postgres", dbname=dbname,
                                connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def _wait(self, t0: float, probe, what: str) -> None:
        last: Exception | None = None
        while time.monotonic() - t0 < self.startup_timeout:
            try:
                probe()
                return
            except Exception as e:  # any connection error means "not yet"
                last = e
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL not {what} after {self.startup_timeout:.0f} s ({last}); "
                           f"log:\n{_tail(self.log_path)}")

    def _wait_ready_superuser(self, t0: float) -> None:
        self._wait(t0, lambda: self._admin_sql("SELECT 1"), "accepting connections on its Unix socket")

    def _bootstrap_role_and_db(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host=str(self.directory), port=self.port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE ROLE "{self.user}" LOGIN CREATEDB PASSWORD %s', (self.password,))
                cur.execute(f'CREATE DATABASE "{self.dbname}" OWNER "{self.user}"')
        finally:
            conn.close()

    def _wait_ready_app(self, t0: float) -> None:
        def probe() -> None:
            conn = self.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            finally:
                conn.close()

        self._wait(t0, probe, f"accepting password connections on {self.host}:{self.port}")

    def _kill_postmaster(self) -> None:
        with contextlib.suppress(Exception):
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:<free port> with a SQLite backend store in a temporary directory.

    Artifacts are proxied: the server runs with ``--serve-artifacts --artifacts-destination <tmp>/artifacts`` and
    no ``--default-artifact-root``, so new experiments get the artifact root ``mlflow-artifacts:/`` and clients
    upload and download artifacts over HTTP through the server, as a remote user would. (With a local
    ``--default-artifact-root`` path, clients on this machine would write into that directory themselves and the
    tests would not exercise the HTTP artifact path.)

    ``workers`` uvicorn workers (1 by default; MLflow's default of 4 takes longer to start on 2 cores), and MLflow 3's
    job execution (a job runner plus seven huey consumers, for GenAI jobs) is off unless ``job_execution=True``.

    The server runs in its own process group (uvicorn spawns workers); ``stop`` sends SIGTERM to the group, then
    SIGKILL. stdout and stderr go to ``log_path``.

    Attributes once started: ``uri``, ``port``, ``directory``, ``backend_store_uri``, ``artifacts_dir``,
    ``log_path``, ``startup_seconds``.
    """

    def __init__(self, workers: int = 1, job_execution: bool = False, startup_timeout: float = 120.0) -> None:
        self.workers = workers
        self.job_execution = job_execution
        self.startup_timeout = startup_timeout
        self.host = HOST
        self.port: int | None = None
        self.directory: Path | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.directory / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.directory / "artifacts"

    @staticmethod
    def _command() -> list[str]:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise ServiceUnavailable(f"the mlflow package is not installed for {sys.executable}")
        script = Path(sys.executable).parent / "mlflow"
        return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "mlflow"]

    def start(self) -> MlflowServer:
        base = self._command()
        t0 = time.monotonic()
        self.directory = Path(tempfile.mkdtemp(prefix="fuse-mlflow-"))
        self.artifacts_dir.mkdir()
        self.log_path = self.directory / "server.log"
        atexit.register(self.stop)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["PYTHONUNBUFFERED"] = "1"
        # MLflow 3 starts a job runner and seven huey consumer processes by default (for GenAI jobs); the
        # tracking tests need none of them, and on 2 cores they slow the start-up.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if self.job_execution else "false"
        try:
            for attempt in range(3):
                self.port = free_port()
                cmd = [*base, "server", "--host", self.host, "--port", str(self.port),
                       "--backend-store-uri", self.backend_store_uri,
                       "--serve-artifacts", "--artifacts-destination", str(self.artifacts_dir),
                       "--workers", str(self.workers)]
                self._log_file = open(self.log_path, "ab")  # closed in stop()
                self._log_file.write(f"$ {shlex.join(cmd)}\n".encode())
                self._log_file.flush()
                self._proc = subprocess.Popen(cmd, cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
                                              stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
                if self._wait_healthy(t0):
                    break
                log = _tail(self.log_path, 30)
                self._terminate()
                if attempt == 2 or "address already in use" not in log.lower():
                    raise RuntimeError(f"mlflow server exited during start-up; log {self.log_path}:\n{log}")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> bool:
        """True once GET /health answers 200; False if the process died; raises on timeout."""
        while time.monotonic() - t0 < self.startup_timeout:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"mlflow server not healthy after {self.startup_timeout:.0f} s; log {self.log_path}:\n"
                           f"{_tail(self.log_path)}")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Workers left behind in the group (the leader already gone) get a SIGKILL too.
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, keep_directory: bool = False) -> None:
        """Terminate the server's process group and remove its directory. Safe to call twice."""
        self._terminate()
        if self.directory is not None and not keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MlflowServer(uri={self.uri!r})"
