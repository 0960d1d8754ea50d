"""Cluster + demo end to end, with real processes only: a local 3-node Ray cluster (head + 2
workers, token auth, loopback), a real ``mlflow server`` (SQLite + proxied artifacts), a tiny
search submitted with ``ray job submit`` that registers ``models:/e2e-shapes@champion``, and a
tiny archive segmented by a second ``ray job submit`` with that champion.

The tracking URI reaches the jobs only through ``--runtime-env-json`` (env_vars): this test
process and the cluster nodes have no ``MLFLOW_TRACKING_URI`` and a private ``GIGASEG_HOME``,
so a process that missed it would fall back to ``<GIGASEG_HOME>/mlflow.db``; the test checks
that no such file appears. Search trials get the URI from their driver (``MlflowTarget``);
the segmentation actors read it from the environment when they download the champion.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from PIL import Image
from tiny_search import tiny_search

from cluster.local import find_cluster_pids, list_nodes, start_cluster, stop_cluster

pytestmark = [pytest.mark.slow, pytest.mark.ray]

MODEL = "e2e-shapes"
SEARCH = "e2e-search"
CLASSES = ["background", "line", "ellipse"]  # gigaseg simulate shapes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(name: str) -> str:
    """A console script of this interpreter's environment (``ray``, ``gigaseg``)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else name


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` on 127.0.0.1:<free port>, SQLite + ``--artifacts-destination`` in
    tmp_path, up once ``/health`` answers; stopped (its process group, by PID) afterwards.
    Yields (URL, artifacts folder)."""
    port = _free_port()
    artifacts = tmp_path / "mlflow-artifacts"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow-server.db'}",
        "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runners: ~10 processes less on 2 cores
    log = tmp_path / "mlflow-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"mlflow server exited with {proc.returncode}:\n{_tail(log)}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"mlflow server not healthy after 300 s:\n{_tail(log)}"
            time.sleep(0.5)
        yield url, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server, its uvicorn worker (same process group)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _simulate(out: Path, n: int, size: int, seed: int) -> Path:
    done = subprocess.run(
        [_script("gigaseg"), "simulate", "shapes", "--out", str(out), "--n", str(n),
         "--size", str(size), "--seed", str(seed)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"shapes_{i:04d}.png" for i in range(n)]
    return out


def _search_yaml(data: Path, storage: Path) -> dict:
    """The shared tiny search with 2 trials. ASHA is off so that both trials train both epochs
    (each logs val_miou at steps 0 and 1). Every node is this machine: tmp_path is "shared
    storage"; the tracking URI comes from the job's environment."""
    return tiny_search(SEARCH, data, storage, seed=7, num_samples=2, asha={"enabled": False},
                       mlflow={"registered_model_name": MODEL})


def _submit(info, workdir: Path, runtime_env: dict, job_id: str, argv: list[str], log: Path,
            timeout: float) -> str:
    """``ray job submit`` (blocking, tails the driver's output into ``log``); returns the
    job's final status."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **info.env}
    cmd = [_script("ray"), "job", "submit", "--address", info.dashboard_url, "--submission-id", job_id,
           "--working-dir", str(workdir), "--runtime-env-json", json.dumps(runtime_env), "--", *argv]
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    assert done.returncode == 0, f"{job_id}: ray job submit ended with {done.returncode}:\n{_tail(log, 6000)}"
    return _job_status(info, job_id)


def _job_status(info, job_id: str) -> str:
    """The job's status from the job REST API (with the cluster's token): SUCCEEDED, FAILED, ..."""
    req = urllib.request.Request(f"{info.dashboard_url}/api/jobs/{job_id}",
                                 headers={"Authorization": f"Bearer {info.token_path.read_text().strip()}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)["status"]


def _archive(src: Path, dst: Path) -> dict[str, tuple[int, int]]:
    """Two small inputs from simulated shapes images: an 8-bit tiled TIFF (cropped to 100 x 128,
    so height != width) and a PNG as is. Returns stem -> (height, width)."""
    dst.mkdir()
    crop = np.asarray(Image.open(src / "images" / "shapes_0000.png"))[:100, :]
    tifffile.imwrite(dst / "rocks.tif", crop, tile=(32, 32), compression="zlib")
    png = Image.open(src / "images" / "shapes_0001.png")
    png.save(dst / "plate.png")
    assert crop.dtype == np.uint8 and crop.shape == (100, 128)
    return {"rocks": crop.shape, "plate": (png.height, png.width)}


def _check_mlflow(uri: str, artifacts: Path) -> tuple[str, set[str]]:
    """Parent run, 2 nested trial runs with params and stepped metrics, the champion alias.
    Returns (champion version, trial run ids)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(SEARCH)
    assert exp is not None, [e.name for e in client.search_experiments()]
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`gigaseg.kind` = 'search'")
    assert parent.info.status == "FINISHED" and parent.info.run_name == SEARCH
    assert parent.data.params["num_samples"] == "2" and parent.data.params["engine"] == "tpe"
    assert parent.data.metrics["n_trials"] == 2 and parent.data.metrics["n_completed"] == 2
    assert parent.data.tags["gigaseg.champion"] == f"models:/{MODEL}@champion"
    trials = client.search_runs([exp.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 2, [t.info.run_name for t in trials]
    for run in trials:
        params = run.data.params
        assert params["architecture"] in ("Unet", "Linknet") and params["encoder"] == "resnet18"
        assert 1e-3 <= float(params["lr"]) <= 1e-2 and params["model.arch"] == params["architecture"]
        assert run.info.status == "FINISHED" and run.data.tags["gigaseg.status"] == "completed"
        for metric in ("val_miou", "train_loss"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert [m.step for m in history] == [0, 1], (metric, history)
            assert all(np.isfinite(m.value) for m in history)
    version = client.get_model_version_by_alias(MODEL, "champion")
    trial_ids = {t.info.run_id for t in trials}
    # the champion (calibrated, maybe an ensemble) is logged on the parent run; the best trial is in it
    assert version.run_id == parent.info.run_id and version.status == "READY"
    best = max(trials, key=lambda t: t.data.metrics["val_miou"])
    members = client.get_run(parent.info.run_id).data.params["ensemble.members"].split(",")
    assert best.data.tags["gigaseg.trial_id"] in members
    # the trials uploaded through the server: weights and previews are in its artifacts folder
    assert any(artifacts.rglob("model.safetensors")) and any(artifacts.rglob("preview.png"))
    return version.version, trial_ids


def _check_outputs(out: Path, inputs: dict[str, Path], shapes: dict[str, tuple[int, int]], version: str) -> None:
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    last = {Path(e["input"]).name: e["status"] for e in manifest}  # last line per input wins
    assert last == {p.name: "done" for p in inputs.values()}, manifest
    for stem, (h, w) in shapes.items():
        group = zarr.open_group(str(out / f"{stem}.zarr"), mode="r")
        level0 = group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]
        assert level0.shape == (h, w), (stem, level0.shape)
        labels = level0[:]
        assert labels.min() >= 0 and labels.max() < len(CLASSES)
        assert group.attrs["gigaseg"]["status"] == "complete"
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["class_names"] == CLASSES
        assert summary["model"] == f"models:/{MODEL}/{version}"  # the alias, pinned for the whole run
        assert sum(summary["pixel_counts"].values()) == h * w
        for k, name in enumerate(CLASSES):
            assert summary["pixel_counts"][name] == int((labels == k).sum())


# Measured ~100 s on a busy 2-core machine (cluster 13 s, search job 35 s, segment job 39 s, stop 6 s);
# the limits below add up to less than pytest's 900 s timeout, so the finally clause always runs.
def test_search_and_segment_as_ray_jobs_on_a_three_node_cluster(tmp_path, mlflow_server, monkeypatch):
    uri, artifacts = mlflow_server
    home = tmp_path / "gigaseg-home"  # where a process that missed MLFLOW_TRACKING_URI would write
    monkeypatch.setenv("GIGASEG_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # nodes inherit this process's env

    data = _simulate(tmp_path / "shapes", n=4, size=96, seed=1)
    inputs_src = _simulate(tmp_path / "shapes-archive", n=2, size=128, seed=2)
    shapes = _archive(inputs_src, tmp_path / "archive")
    inputs = {"rocks": tmp_path / "archive" / "rocks.tif", "plate": tmp_path / "archive" / "plate.png"}
    workdir = tmp_path / "job"  # --working-dir is uploaded: keep it tiny (gigaseg is installed)
    workdir.mkdir()
    (workdir / "search.yaml").write_text(yaml.safe_dump(_search_yaml(data, tmp_path / "tune"), sort_keys=False))
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    out = tmp_path / "segmented"

    state = tmp_path / "cluster"
    t0 = time.monotonic()
    info = start_cluster(workers=2, cpus_per_node=1, gpus_per_node=0, state_dir=state,
                         object_store_memory="100MB", timeout=180)
    timings = {"cluster_start_s": time.monotonic() - t0}
    try:
        nodes = list_nodes(info)
        assert len(nodes) == 3 and sum(n["is_head_node"] for n in nodes) == 1
        assert all(n["state"] == "ALIVE" and n["node_ip"] == "127.0.0.1" for n in nodes)

        t0 = time.monotonic()
        status = _submit(info, workdir, runtime_env, "e2e-search",
                         [sys.executable, "-m", "search", "--config", "search.yaml"],
                         tmp_path / "search-job.log", timeout=420)
        timings["search_job_s"] = time.monotonic() - t0
        assert status == "SUCCEEDED", (status, _tail(tmp_path / "search-job.log"))

        t0 = time.monotonic()
        status = _submit(info, workdir, runtime_env, "e2e-segment",
                         [sys.executable, "-m", "pipelines.segment", "--model", f"models:/{MODEL}@champion",
                          "--input", *map(str, inputs.values()), "--output", str(out),
                          "--tile", "64", "--halo", "16", "--workers", "2", "--no-progress"],
                         tmp_path / "segment-job.log", timeout=240)
        timings["segment_job_s"] = time.monotonic() - t0
        assert status == "SUCCEEDED", (status, _tail(tmp_path / "segment-job.log"))
    finally:
        t0 = time.monotonic()
        stopped = stop_cluster(state)
        timings["cluster_stop_s"] = time.monotonic() - t0
        print("timings:", {k: round(v, 1) for k, v in timings.items()})
    assert stopped > 0 and not find_cluster_pids(info), "processes of the cluster survived stop_cluster"
    assert not Path(info.temp_dir).exists() and not (state / "cluster.json").exists()

    version, _ = _check_mlflow(uri, artifacts)
    _check_outputs(out, inputs, shapes, version)
    assert f'"champion": "models:/{MODEL}@champion"' in (tmp_path / "search-job.log").read_text()  # driver's JSON
    # nothing fell back to a private SQLite store: the URI reached every process that needed it
    assert not list(home.rglob("mlflow.db")), list(home.rglob("*"))
