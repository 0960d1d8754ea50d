"""Shared fixtures: one real local Ray per test session (restarted only when a test needs
different resources), and a private SQLite MLflow per test."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

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
