"""An ``mlflow server`` process on 127.0.0.1: start it on a store, wait for ``/health``, stop it.

The backend store URI (it may hold a database password) reaches the server through
``MLFLOW_BACKEND_STORE_URI``, never its command line, which every local user can read. With
``--serve-artifacts`` and ``--artifacts-destination`` clients upload and download artifacts
through the server (``mlflow-artifacts:/`` URIs), so Ray workers need no shared disk.

Python API::

    proc = start_mlflow_server("postgresql+psycopg://...", artifacts, port, log_path)
    wait_healthy(f"http://127.0.0.1:{port}", proc)
    stop_mlflow_server(proc.pid)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cluster.postgres import PostgresServer, create_database, dump, start_postgres, stop_postgres

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def server_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def start_mlflow_server(
    backend_uri: str,
    artifacts: str | Path,
    port: int,
    log_path: str | Path,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` over ``backend_uri`` with proxied artifacts in
    ``artifacts``, in its own session (so its process group holds the server and its workers).
    Returns at once; call :func:`wait_healthy`. ``env`` defaults to this process's environment
    without its ``MLFLOW_*`` variables."""
    base = (
        dict(env) if env is not None else {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    )
    base["MLFLOW_BACKEND_STORE_URI"] = backend_uri  # not in argv: it may hold a password
    base.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no huey job runners (GenAI judges)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--artifacts-destination",
        str(artifacts),
        "--serve-artifacts",
    ]
    with open(log_path, "a") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=base,
            start_new_session=True,
        )


def is_healthy(url: str) -> bool:
    """Whether ``url/health`` answers 200 now."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(
    url: str, proc: subprocess.Popen | None = None, timeout: float = 300, log_path: str | Path | None = None
) -> None:
    """Poll ``url/health`` until it answers; raise (with the log's tail) if ``proc`` exits first
    or ``timeout`` s pass. The first start on an empty database creates MLflow's tables."""
    deadline = time.monotonic() + timeout
    while not is_healthy(url):
        tail = (
            Path(log_path).read_text(errors="replace")[-3000:] if log_path and Path(log_path).exists() else ""
        )
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server at {url} not healthy after {timeout:.0f} s:\n{tail}")
        time.sleep(0.5)


def stop_mlflow_server(pid: int, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> None:
    """Send ``sig`` to the server's process group (the server and its uvicorn workers), SIGKILL
    after ``timeout`` s, and wait until the group leader is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    if _wait_group(pid, timeout):
        return
    log.warning(
        "mlflow server (PID %d) still running %.0f s after %s; sending SIGKILL", pid, timeout, sig.name
    )
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if not _wait_group(pid, 10):
        raise RuntimeError(f"mlflow server process group {pid} survived SIGKILL")


def _wait_group(pgid: int, timeout: float) -> bool:
    """Whether process group ``pgid`` is gone within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in process group ``pgid``; reaps our child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            return True
    return False


# ---------------------------------------------------------------- the local cluster's stack

BACKENDS = ("postgres", "sqlite")
DATABASE = "mlflow"


@dataclass
class TrackingStack:
    """The MLflow part of a local cluster: a server on ``port`` over PostgreSQL (or SQLite), its
    files under ``folder`` (``postgres/``, ``artifacts/``, ``mlflow.db``, ``server.log``), which
    survive a stop and a start."""

    backend: str
    folder: str
    port: int
    postgres_port: int = 0
    workers: int = 2
    server_pid: int = 0
    postgres_pid: int = 0

    @property
    def url(self) -> str:
        return server_url(self.port)

    @property
    def artifacts(self) -> Path:
        return Path(self.folder) / "artifacts"

    @property
    def log_file(self) -> Path:
        return Path(self.folder) / "server.log"

    def postgres(self) -> PostgresServer:
        return PostgresServer(str(Path(self.folder) / "postgres"), self.postgres_port, self.postgres_pid)


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``backend`` is one."""
    if backend not in BACKENDS:
        raise ValueError(f"--mlflow {backend!r}: not a tracking backend; use one of {', '.join(BACKENDS)}")


def plan_stack(backend: str, folder: str | Path, port: int, postgres_port: int) -> TrackingStack:
    """A :class:`TrackingStack` to start; a clear error for an unknown backend."""
    check_backend(backend)
    return TrackingStack(
        backend, str(Path(folder).resolve()), port, postgres_port if backend == "postgres" else 0
    )


def store_uri(stack: TrackingStack) -> str:
    """The store's SQLAlchemy URI (with the database password), e.g. for ``mlflow db upgrade``."""
    if stack.backend == "postgres":
        return stack.postgres().uri(DATABASE)
    return f"sqlite:///{Path(stack.folder) / 'mlflow.db'}"


def _backend_uri(stack: TrackingStack) -> str:
    """:func:`store_uri`; on PostgreSQL, database ``mlflow`` is created first if missing."""
    if stack.backend == "postgres":
        create_database(stack.postgres(), DATABASE)
    return store_uri(stack)


def backup_store(stack: TrackingStack, out: str | Path) -> None:
    """A consistent copy of the running store: ``pg_dump -Fc`` (PostgreSQL) or SQLite's online
    backup. Artifacts are files under ``stack.artifacts``: copy that folder beside it."""
    if stack.backend == "postgres":
        dump(stack.postgres(), DATABASE, out)
        return
    import sqlite3

    with sqlite3.connect(Path(stack.folder) / "mlflow.db") as src, sqlite3.connect(out) as dst:
        src.backup(dst)


def start_stack(stack: TrackingStack, env: Mapping[str, str]) -> subprocess.Popen:
    """Start PostgreSQL (waiting until it takes logins, creating database ``mlflow``) if the
    backend is postgres, then launch the server without waiting: see :func:`wait_stack`.
    PIDs are recorded on ``stack`` as soon as each process exists."""
    Path(stack.folder).mkdir(parents=True, exist_ok=True)
    if stack.backend == "postgres":
        server = start_postgres(Path(stack.folder) / "postgres", stack.postgres_port, env)
        stack.postgres_pid = server.pid
    proc = start_mlflow_server(
        _backend_uri(stack), stack.artifacts, stack.port, stack.log_file, workers=stack.workers, env=env
    )
    stack.server_pid = proc.pid
    return proc


def wait_stack(stack: TrackingStack, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Wait until the stack's server answers ``/health``."""
    wait_healthy(stack.url, proc, timeout, stack.log_file)


def restart_server(stack: TrackingStack, env: Mapping[str, str], timeout: float = 300) -> int:
    """Start the server again on the same port and store, after it died (e.g. SIGKILL); returns
    the new PID. Refuses while the recorded server still answers."""
    if is_healthy(stack.url):
        raise RuntimeError(f"mlflow server at {stack.url} is running; stop the cluster to restart it")
    if stack.server_pid and not _wait_group(stack.server_pid, 10):
        raise RuntimeError(f"mlflow server process group {stack.server_pid} is still alive; stop it first")
    proc = start_mlflow_server(
        _backend_uri(stack), stack.artifacts, stack.port, stack.log_file, workers=stack.workers, env=env
    )
    stack.server_pid = proc.pid
    wait_stack(stack, proc, timeout)
    return proc.pid


def stop_stack(stack: TrackingStack) -> None:
    """The server first (its clients go), then PostgreSQL with a fast shutdown."""
    if stack.server_pid:
        stop_mlflow_server(stack.server_pid)
    if stack.postgres_pid:
        stop_postgres(stack.postgres_pid)
