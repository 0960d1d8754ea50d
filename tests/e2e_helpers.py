"""The design card's used-by line as the end-to-end test runs it (tests/test_e2e_postgres.py, on
the local stack's PostgreSQL): the inputs, ``ray job submit`` of a search and of a segmentation, and the checks of what they left in
MLflow and in the output folder."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import yaml
import zarr
from PIL import Image
from tiny_search import tiny_search

CLASSES = ["background", "line", "ellipse"]  # gigaseg simulate shapes


def script(name: str) -> str:
    """A console script of this interpreter's environment (``ray``, ``gigaseg``)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else name


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def simulate(out: Path, n: int, size: int, seed: int) -> Path:
    """``gigaseg simulate shapes`` as a user runs it."""
    done = subprocess.run(
        [script("gigaseg"), "simulate", "shapes", "--out", str(out), "--n", str(n),
         "--size", str(size), "--seed", str(seed)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"shapes_{i:04d}.png" for i in range(n)]
    return out


@dataclass
class Inputs:
    """What the jobs get: the job's working dir (with search.yaml), the archive to segment and
    the shape of each of its images."""

    workdir: Path
    inputs: dict[str, Path]
    shapes: dict[str, tuple[int, int]]


def prepare_inputs(tmp_path: Path, search: str, model: str, trials: int, epochs: int, **over: object) -> Inputs:
    """Training shapes (4 of 96 px), a 2-file archive, and a tiny ``--working-dir`` (gigaseg is
    installed) with search.yaml: the shared tiny search, ``trials`` trials of ``epochs`` epochs all
    at once, ASHA off so every trial trains every epoch (val_miou at steps 0..epochs-1); ``over``
    replaces top-level keys. Every node is this machine: tmp_path is "shared storage"; the
    tracking URI comes from the job's environment."""
    data = simulate(tmp_path / "shapes", n=4, size=96, seed=1)
    spec = tiny_search(search, data, tmp_path / "tune", seed=7, num_samples=trials, max_concurrent_trials=trials,
                       asha={"enabled": False}, mlflow={"registered_model_name": model}, **over)  # fmt: skip
    spec["space"]["epochs"] = epochs
    shapes = _archive(simulate(tmp_path / "shapes-archive", n=2, size=128, seed=2), tmp_path / "archive")
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "search.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    inputs = {"rocks": tmp_path / "archive" / "rocks.tif", "plate": tmp_path / "archive" / "plate.png"}
    return Inputs(workdir, inputs, shapes)


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


def submit(info, workdir: Path, runtime_env: dict, job_id: str, argv: list[str], log: Path,
           timeout: float) -> str:  # fmt: skip
    """``ray job submit`` (blocking, tails the driver's output into ``log``); returns the
    job's final status."""
    proc = submit_async(info, workdir, runtime_env, job_id, argv, log)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, f"{job_id}: ray job submit ended with {rc}:\n{tail(log, 6000)}"
    return job_status(info, job_id)


def submit_async(info, workdir: Path, runtime_env: dict, job_id: str, argv: list[str], log: Path) -> subprocess.Popen:
    """``ray job submit`` started in the background (it tails the driver's output into ``log``
    until the job ends)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **info.env}
    cmd = [script("ray"), "job", "submit", "--address", info.dashboard_url, "--submission-id", job_id,
           "--working-dir", str(workdir), "--runtime-env-json", json.dumps(runtime_env), "--", *argv]  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def job_status(info, job_id: str) -> str:
    """The job's status from the job REST API (with the cluster's token): SUCCEEDED, FAILED, ..."""
    req = urllib.request.Request(f"{info.dashboard_url}/api/jobs/{job_id}",
                                 headers={"Authorization": f"Bearer {info.token_path.read_text().strip()}"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)["status"]


def still_running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that are alive (zombies count as gone)."""
    alive = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if b") Z " not in Path(f"/proc/{pid}/stat").read_bytes():
                alive.append(pid)
    return alive


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the block's wall time (s) in ``timings[key]``, also when it raises."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        timings[key] = round(time.monotonic() - t0, 1)


def segment_job(info, inputs: Inputs, runtime_env: dict, job_id: str, model: str, out: Path, log: Path) -> None:
    """``ray job submit`` of ``python -m pipelines.segment`` of the archive with
    ``models:/<model>@champion``; it must succeed."""
    argv = [sys.executable, "-m", "pipelines.segment", "--model", f"models:/{model}@champion",
            "--input", *map(str, inputs.inputs.values()), "--output", str(out),
            "--tile", "64", "--halo", "16", "--workers", "2", "--no-progress"]  # fmt: skip
    status = submit(info, inputs.workdir, runtime_env, job_id, argv, log, timeout=240)
    assert status == "SUCCEEDED", (status, tail(log))


def check_search_runs(uri: str, search: str, model: str, trials: int, epochs: int, artifacts: Path) -> tuple[str, list]:
    """Parent run, ``trials`` nested trial runs with params and metrics at every step, the
    champion alias, and the trials' uploads in the server's ``artifacts`` folder.
    Returns (champion version, trial runs)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(search)
    assert exp is not None, [e.name for e in client.search_experiments()]
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`gigaseg.kind` = 'search'")
    assert parent.info.status == "FINISHED" and parent.info.run_name == search
    assert parent.data.params["num_samples"] == str(trials) and parent.data.params["engine"] == "tpe"
    assert parent.data.metrics["n_trials"] == trials and parent.data.metrics["n_completed"] == trials
    assert parent.data.tags["gigaseg.champion"] == f"models:/{model}@champion"
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")  # fmt: skip
    assert len(runs) == trials, [t.info.run_name for t in runs]
    for run in runs:
        _check_trial(client, run, epochs)
    version = client.get_model_version_by_alias(model, "champion")
    # the champion (calibrated, maybe an ensemble) is logged on the parent run; the best trial is in it
    assert version.run_id == parent.info.run_id and version.status == "READY"
    best = max(runs, key=lambda t: t.data.metrics["val_miou"])
    members = client.get_run(parent.info.run_id).data.params["ensemble.members"].split(",")
    assert best.data.tags["gigaseg.trial_id"] in members
    # the trials uploaded through the server: weights and previews are in its artifacts folder
    assert any(artifacts.rglob("model.safetensors")) and any(artifacts.rglob("preview.png"))
    return version.version, runs


def _check_trial(client, run, epochs: int) -> None:
    """A completed trial: its sampled params and val_miou / train_loss at steps 0..epochs-1."""
    params = run.data.params
    assert params["architecture"] in ("Unet", "Linknet") and params["encoder"] == "resnet18"
    assert 1e-3 <= float(params["lr"]) <= 1e-2 and params["model.arch"] == params["architecture"]
    assert run.info.status == "FINISHED" and run.data.tags["gigaseg.status"] == "completed"
    for metric in ("val_miou", "train_loss"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == list(range(epochs)), (metric, history)
        assert all(np.isfinite(m.value) for m in history)


def check_outputs(out: Path, inputs: Inputs, model: str, version: str) -> None:
    """Every input segmented in full, at its shape, labelled by the pinned champion version."""
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    last = {Path(e["input"]).name: e["status"] for e in manifest}  # last line per input wins
    assert last == {p.name: "done" for p in inputs.inputs.values()}, manifest
    for stem, (h, w) in inputs.shapes.items():
        group = zarr.open_group(str(out / f"{stem}.zarr"), mode="r")
        level0 = group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]
        assert level0.shape == (h, w), (stem, level0.shape)
        labels = level0[:]
        assert labels.min() >= 0 and labels.max() < len(CLASSES)
        assert group.attrs["gigaseg"]["status"] == "complete"
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["class_names"] == CLASSES
        assert summary["model"] == f"models:/{model}/{version}"  # the alias, pinned for the whole run
        assert sum(summary["pixel_counts"].values()) == h * w
        for k, name in enumerate(CLASSES):
            assert summary["pixel_counts"][name] == int((labels == k).sum())
