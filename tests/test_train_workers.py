"""``gigaseg train --workers N`` (issue 26): real local Ray, gloo workers, tiny shapes data.

Two workers train one model into one MLflow run and a folder that ``segment`` loads, as good as one
worker at equal samples; a killed worker is replaced; a killed driver's run resumes from its last epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from pipelines.score import score_outputs
from search.train_workers import STATE_FILE, run_dir_of
from segcore.cli import main as gigaseg
from segcore.plan import decide_workers
from segcore.simulate import generate_shapes

pytestmark = pytest.mark.ray

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of a run's registered checkpoints

SMALL_UNET = "model.arch_kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}"
TINY = {  # a few seconds an epoch on 2 gloo workers: 2 steps of 8 patches per worker
    "model": {"arch": "Unet", "encoder": "resnet18", "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
    "data": {"patch_size": 64, "patches_per_epoch": 32, "batch_size": 8, "val_tile": 64, "val_halo": 16},
    "optim": {"schedule": "constant"},
    "epochs": 4,
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root / "train", n=6, size=96, seed=1)
    generate_shapes(root / "test", n=4, size=96, seed=2)
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root


def _segment_score(model: Path, test: Path, out: Path) -> float:
    """Test mIoU of ``model`` through ``gigaseg segment``, scored from the labels it wrote."""
    assert gigaseg(["segment", "--model", str(model), "--input", str(test / "images"), "--output", str(out),
                    "--executor", "local", "--no-progress"]) == 0
    return score_outputs(out, test)["miou"]


def _one_run(uri: str, experiment: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def _val_steps(uri: str, run: mlflow.entities.Run) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val_miou"))


def test_plan_scales_patches_and_lr_for_workers() -> None:
    over = {"data": {"patches_per_epoch": 96, "batch_size": 8}, "optim": {"lr": 2e-3}}
    decision = decide_workers(over, 4)
    assert over == {"data": {"patches_per_epoch": 384, "batch_size": 8}, "optim": {"lr": 4e-3}}
    assert "global batch 32" in decision.value and "sqrt(4)" in decision.reason


@pytest.mark.parametrize(("flags", "says"), [
    (["--steps", "20", "--epochs", "3"], "--steps 20 sets epochs"),
    (["--steps", "20", "--set", "data.patches_per_epoch=64"], "drop data.patches_per_epoch"),
    (["--cpus-per-worker", "2"], "--cpus-per-worker applies to a multi-worker run"),
    (["--workers", "0"], "--workers 0: needs at least 1"),
    (["--workers", "64", "--cpus-per-worker", "4"], "= 256 CPUs, but Ray has"),
    (["--workers", "2", "--resume"], "--resume: no stopped"),
    (["--config", "tiny.yaml", "--budget-min", "3"], "drop one of them"),
])
def test_flags_that_cannot_be_honoured_are_refused(shapes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch, flags: list[str], says: str) -> None:
    monkeypatch.chdir(shapes)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert gigaseg(["train", "--data", str(shapes / "train"), "--out", str(tmp_path / "m"), "--no-mlflow", *flags]) == 2
    assert says in caplog.text


@pytest.mark.slow
def test_two_workers_make_one_run_and_a_model_as_good_as_one_worker(shapes: Path, tmp_path: Path, ray_local: None,
                                                                    mlflow_sqlite: str) -> None:
    """Equal seed and samples: 1 worker x batch 16 vs 2 workers x batch 8 (the same global batch, lr and steps)."""
    common = ["--data", str(shapes / "train"), "--arch", "Unet", "--set", SMALL_UNET, "--patch-size", "64",
              "--lr", "0.003", "--steps", "60"]
    two, one = tmp_path / "two", tmp_path / "one"
    assert gigaseg(["train", *common, "--out", str(two), "--workers", "2", "--batch-size", "8",
                    "--experiment", "workers"]) == 0
    assert gigaseg(["train", *common, "--out", str(one), "--batch-size", "16", "--no-mlflow"]) == 0

    names = {p.name for p in two.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.json", "preview.png", "plan.yaml"} <= names
    assert "train_state.pt" not in names and not run_dir_of(two).exists()
    card = json.loads((two / "config.json").read_text())
    assert card["extra"]["halo"] > 0 and "workers = 2" in (two / "plan.yaml").read_text()
    run = _one_run(mlflow_sqlite, "workers")
    epochs = len(json.loads((two / "metrics.json").read_text())["history"])
    assert run.data.params["workers"] == "2" and run.info.status == "FINISHED"
    assert _val_steps(mlflow_sqlite, run) == list(range(epochs))  # rank 0 alone logs, once per epoch
    assert "model_dir/model.safetensors" in {a.path for a in mlflow.MlflowClient(mlflow_sqlite).list_artifacts(
        run.info.run_id, "model_dir")}

    two_miou = _segment_score(two, shapes / "test", tmp_path / "seg-two")
    one_miou = _segment_score(one, shapes / "test", tmp_path / "seg-one")
    assert one_miou > 0.7, one_miou  # trained far enough for the comparison to mean something
    assert abs(two_miou - one_miou) <= 0.02, (two_miou, one_miou)


def _train_workers() -> list[psutil.Process]:
    """This test's Ray Train workers (descendants of this process: never another session's)."""
    return [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(_cmdline(p))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _after_first_checkpoint(out: Path, act: Callable[[], None], timeout_s: float = 300) -> threading.Thread:
    """Run ``act`` in a thread as soon as Train has registered the first epoch checkpoint of the run into
    ``out`` (its snapshot lists it: what a retry or a resume restores; a checkpoint folder alone is not)."""
    def wait() -> None:
        deadline = time.monotonic() + timeout_s
        while not (run_dir_of(out) / SNAPSHOT).is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        act()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_run_finishes(shapes: Path, tmp_path: Path, ray_local: None,
                                                          mlflow_sqlite: str) -> None:
    out, killed = tmp_path / "m", []

    def kill_one() -> None:
        workers = _train_workers()
        if workers:
            workers[-1].kill()
            killed.append(workers[-1].pid)

    watcher = _after_first_checkpoint(out, kill_one)
    assert gigaseg(["train", "--data", str(shapes / "train"), "--out", str(out), "--config", str(shapes / "tiny.yaml"),
                    "--workers", "2", "--experiment", "lost"]) == 0
    watcher.join()
    assert killed, "no Train worker to kill"
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["steps"] for h in history] == [2.0, 4.0, 6.0, 8.0]
    run = _one_run(mlflow_sqlite, "lost")
    steps = _val_steps(mlflow_sqlite, run)
    assert set(steps) == {0, 1, 2, 3} and steps.count(0) == 1  # the new group resumed after epoch 0, not from scratch
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_killed_driver_resumes_from_its_last_epoch(shapes: Path, tmp_path: Path, ray_local: None,
                                                     mlflow_sqlite: str) -> None:
    import ray

    out = tmp_path / "m"
    args = ["train", "--data", str(shapes / "train"), "--out", str(out), "--workers", "2", "--experiment", "resume"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "segcore.cli", *args, "--config", str(shapes / "tiny.yaml")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _after_first_checkpoint(out, lambda: None).join()
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    assert (run_dir_of(out) / STATE_FILE).is_file() and not (out / "model.safetensors").exists()
    deadline = time.monotonic() + 60
    while _train_workers() and time.monotonic() < deadline:  # the dead driver's job takes its workers along
        time.sleep(0.5)

    assert gigaseg([*args, "--config", str(shapes / "tiny.yaml")]) == 2  # a new run would lose the stopped one
    assert gigaseg([*args, "--resume"]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["steps"] for h in history] == [2.0, 4.0, 6.0, 8.0]
    run = _one_run(mlflow_sqlite, "resume")
    steps = _val_steps(mlflow_sqlite, run)
    assert set(steps) == {0, 1, 2, 3} and steps.count(0) == 1  # epoch 0 was not trained again
    assert run.info.status == "FINISHED" and not run_dir_of(out).exists()
