"""End-to-end searches on real local Ray and real MLflow (SQLite, a server process, a job submit).

Sizes: 4 shapes images of 96 px, 64 px patches, tiny encoders (depth 3), 2 epochs, <= 5 trials.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import yaml
from tiny_search import tiny_search as tiny

from search import parse_search_spec, run_search
from search.mlflow_runs import COMPLETED, STATUS_TAG, STOPPED, TRIAL_TAG
from segcore.cli import main as gigaseg
from segcore.modelio.ref import download_model_dir, load_model, read_card
from segcore.simulate import generate_shapes

pytestmark = pytest.mark.ray

@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "train", n=4, size=96, seed=1)


def child_runs(client: mlflow.MlflowClient, experiment: str, parent_run_id: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def check_search_in_mlflow(uri: str, name: str, outcome, n_trials: int) -> None:
    """Parent run, nested runs with params, stepped metrics, statuses, artifacts, champion."""
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.params["engine"] == "tpe" and parent.data.tags["gigaseg.kind"] == "search"
    assert "search.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["n_trials"] == n_trials
    assert parent.data.tags["gigaseg.best_trial_id"] == outcome.best_trial_id
    runs = child_runs(client, name, outcome.parent_run_id)
    assert len(runs) == n_trials
    statuses = {r.data.tags[STATUS_TAG] for r in runs}
    assert statuses <= {COMPLETED, STOPPED} and COMPLETED in statuses
    for run in runs:
        assert {"architecture", "encoder", "lr", "model.arch", "loss.terms.dice"} <= set(run.data.params)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")]
        if run.data.tags[STATUS_TAG] == COMPLETED:
            assert steps == [0, 1]
            assert client.get_metric_history(run.info.run_id, "val_iou_line")
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"preview.png", "confusion_matrix.json", "metrics.json"} <= names
            # the model directory, logged as the run's pyfunc model (an MLflow 3 LoggedModel)
            model_dir = download_model_dir(f"runs:/{run.info.run_id}/model", tracking_uri=uri)
            assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
            assert "halo_measured_on" not in read_card(model_dir).extra  # trials skip it; the champion has it
            assert run.data.tags["gigaseg.model_uri"].startswith("models:/")
        else:
            assert steps == [0]
    best = next(r for r in runs if r.data.tags[TRIAL_TAG] == outcome.best_trial_id)
    assert best.data.metrics["val_miou"] == pytest.approx(outcome.best_value)


def check_champion(uri: str, name: str) -> None:
    """The champion loads by alias, through gigaseg and through mlflow.pyfunc, at any tile size."""
    champion = f"models:/{name}@champion"
    mlflow.set_tracking_uri(uri)
    try:
        loaded = load_model(champion)
        assert loaded.card.extra["halo_measured_on"]["images"] >= 1  # measured once, on the champion
        x = np.random.default_rng(0).random((1, 1, 96, 160), dtype=np.float32)
        proba = loaded.predict_proba(x)
        assert proba.shape == (1, 3, 96, 160)
        assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-4)
        pyfunc = mlflow.pyfunc.load_model(champion)
        out = pyfunc.predict(np.random.default_rng(1).random((3, 1, 64, 96), dtype=np.float32))
        assert out.shape == (3, 3, 64, 96)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_tiny_search_sqlite(ray_local, mlflow_sqlite, shapes, tmp_path) -> None:
    seed = {"architecture": "Linknet", "encoder": "resnet18", "lr": 0.005}
    spec = parse_search_spec(tiny("tiny-sqlite", shapes, tmp_path / "runs", seed_configs=[seed]))
    outcome = run_search(spec)
    assert sum(outcome.counts.values()) == 3 and outcome.counts["completed"] >= 1
    runs = child_runs(mlflow.MlflowClient(mlflow_sqlite), "tiny-sqlite", outcome.parent_run_id)
    # the seed configuration was tried (enqueued first; a TPE draw would not hit lr=0.005 exactly)
    assert ("Linknet", "0.005") in {(r.data.params["architecture"], r.data.params["lr"]) for r in runs}
    assert outcome.champion_uri == "models:/tiny-sqlite-model@champion"
    check_search_in_mlflow(mlflow_sqlite, "tiny-sqlite", outcome, 3)
    check_champion(mlflow_sqlite, "tiny-sqlite-model")
    # SQLite + artifacts side by side under GIGASEG_HOME
    assert any((Path(os.environ["GIGASEG_HOME"]) / "mlartifacts" / "tiny-sqlite").rglob("model.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts), stopped after."""
    port = free_port()
    artifacts = tmp_path / "server-artifacts"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(artifacts),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "wb"), start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            mlflow.MlflowClient(uri).search_experiments()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError((tmp_path / "server.log").read_text()[-2000:]) from None
            time.sleep(1)
    yield uri, artifacts
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_tiny_search_against_mlflow_server(ray_local, mlflow_server, shapes, tmp_path, monkeypatch) -> None:
    uri, artifacts = mlflow_server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tiny("tiny-server", shapes, tmp_path / "runs", num_samples=2, seed=3)
    data["mlflow"]["tracking_uri"] = uri
    outcome = run_search(parse_search_spec(data))
    check_search_in_mlflow(uri, "tiny-server", outcome, 2)
    check_champion(uri, "tiny-server-model")
    # clients uploaded through the server: the files are in its --artifacts-destination
    assert any(artifacts.rglob("model.safetensors")) and any(artifacts.rglob("preview.png"))


@pytest.mark.slow
def test_failed_trial_is_retried_from_its_checkpoint(ray_local, mlflow_sqlite, shapes, tmp_path) -> None:
    data = tiny("retry", shapes, tmp_path / "runs", num_samples=1, asha={"enabled": False},
                testing={"fail_once_at_epoch": 1}, failure={"max_failures": 1})
    data["mlflow"]["registered_model_name"] = None
    outcome = run_search(parse_search_spec(data))
    assert outcome.counts["completed"] == 1
    assert list((tmp_path / "runs" / "retry").rglob("gigaseg_failed_once"))  # it did fail once
    (run,) = child_runs(mlflow.MlflowClient(mlflow_sqlite), "retry", outcome.parent_run_id)
    # resumed after epoch 0 from the checkpoint: epoch 0 was not trained (nor logged) twice
    assert [m.step for m in mlflow.MlflowClient(mlflow_sqlite).get_metric_history(run.info.run_id, "val_miou")] \
        == [0, 1]


def terminated_trials(exp_dir: Path) -> int:
    """How many trials Tune's experiment state (on disk) records as TERMINATED."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return 0
    try:
        text = states[-1].read_text()
        json.loads(text)
    except (OSError, ValueError):
        return 0
    return text.count('\\"status\\": \\"TERMINATED\\"')


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(ray_local, mlflow_sqlite, shapes,
                                                                tmp_path) -> None:
    data = tiny("resume", shapes, tmp_path / "runs", num_samples=3, max_concurrent_trials=1,
                asha={"enabled": False})
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "search", "--config", str(config)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    exp_dir = tmp_path / "runs" / "resume"
    deadline = time.monotonic() + 240
    try:
        while terminated_trials(exp_dir) < 1:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "first trial did not finish"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    client = mlflow.MlflowClient(mlflow_sqlite)
    parent_id = json.loads((exp_dir / "gigaseg_search.json").read_text())["mlflow"]["parent_run_id"]
    finished = [r for r in child_runs(client, "resume", parent_id) if r.data.tags[STATUS_TAG] == COMPLETED]
    assert len(finished) >= 1 and terminated_trials(exp_dir) < 3

    assert gigaseg(["search", "--resume", str(exp_dir)]) == 0

    runs = child_runs(client, "resume", parent_id)
    done = [r for r in runs if r.data.tags[STATUS_TAG] == COMPLETED]
    # a trial started after Tune's last experiment checkpoint is re-suggested on resume; its
    # half-run is closed as interrupted, or, had it finished before the kill, kept as orphaned
    assert len(done) == 3
    assert all(r.data.tags[STATUS_TAG] in ("interrupted", "orphaned") for r in runs if r not in done)
    for run in finished:  # not rerun: one value per epoch, and the run was not reopened
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [0, 1]
        assert client.get_run(run.info.run_id).info.end_time == run.info.end_time
    assert client.get_run(parent_id).data.metrics["n_completed"] == 3


def test_runs_tune_forgot_are_closed_as_interrupted_or_orphaned(mlflow_sqlite) -> None:
    """The killed driver's last snapshot may miss a trial that was half-run or had even finished;
    after the resume both are closed, and neither counts as completed."""
    from search.mlflow_runs import TrialRun, start_parent_run
    from search.summary import close_orphans

    target = start_parent_run(mlflow_sqlite, "orphans", "orphans", "name: orphans\n", {"name": "orphans"})
    runs = {t: TrialRun(target, t, t) for t in ("known", "half", "finished")}
    for trial_id in ("known", "finished"):
        target.client().set_tag(runs[trial_id].run_id, STATUS_TAG, COMPLETED)
        target.client().set_terminated(runs[trial_id].run_id, "FINISHED")
    ended = target.client().get_run(runs["finished"].run_id).info.end_time

    assert close_orphans(target, {"known"}) == {"interrupted": 1, "orphaned": 1}
    tags = {t: target.client().get_run(r.run_id).data.tags[STATUS_TAG] for t, r in runs.items()}
    assert tags == {"known": COMPLETED, "half": "interrupted", "finished": "orphaned"}
    assert target.client().get_run(runs["finished"].run_id).info.end_time == ended
    assert close_orphans(target, {"known"}) == {}


@pytest.mark.slow
def test_ray_job_submit_runs_a_search_on_a_local_head(mlflow_sqlite, shapes, tmp_path) -> None:
    from cluster.local import start_cluster, stop_cluster

    data = tiny("job", shapes, tmp_path / "runs", num_samples=2)
    data["mlflow"]["registered_model_name"] = None
    data["space"]["epochs"] = 1
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "search.yaml").write_text(yaml.safe_dump(data))
    info = start_cluster(workers=0, cpus_per_node=2, gpus_per_node=0, state_dir=tmp_path / "cluster")
    try:
        env = {**os.environ, **info.env}
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_sqlite, "GIGASEG_HOME": os.environ["GIGASEG_HOME"]}}
        done = subprocess.run(
            ["ray", "job", "submit", "--address", info.dashboard_url, "--working-dir", str(workdir),
             "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "search", "--config", "search.yaml"],
            env=env, capture_output=True, text=True, timeout=420,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        stop_cluster(info.state_dir)
    client = mlflow.MlflowClient(mlflow_sqlite)
    (parent,) = client.search_runs([client.get_experiment_by_name("job").experiment_id],
                                   filter_string="tags.`gigaseg.kind` = 'search'")
    assert parent.data.metrics["n_trials"] == 2 and parent.info.status == "FINISHED"
    assert len(child_runs(client, "job", parent.info.run_id)) == 2


@pytest.mark.slow
def test_fractional_gpus_pack_four_trials(ray_fake_gpus, mlflow_sqlite, shapes, tmp_path) -> None:
    barrier = tmp_path / "barrier"
    data = tiny("packing", shapes, tmp_path / "runs", num_samples=5, engine="random", max_concurrent_trials=None,
                asha={"enabled": False}, resources={"cpus_per_trial": 0.5, "gpus_per_trial": 0.5},
                testing={"barrier_dir": str(barrier), "barrier_parties": 4, "barrier_timeout_s": 240})
    data["space"]["epochs"] = 1
    data["mlflow"]["registered_model_name"] = None
    outcome = run_search(parse_search_spec(data))
    assert outcome.counts == {"completed": 5, "stopped early": 0, "failed": 0}
    live = sorted(int(p.read_text()) for p in barrier.glob("*.live"))
    assert len(live) == 5
    assert max(live) == 4  # 4 trials met at the barrier (2 GPUs / 0.5); a 5th never ran alongside


@pytest.mark.slow
def test_two_worker_trials_run_ddp_and_release_placement_groups(ray_fake_gpus, mlflow_sqlite, shapes,
                                                               tmp_path) -> None:
    # Each Train run takes all 4 CPUs; ASHA (max_t=1) stops both trials after epoch 0. Without
    # the placement-group guard the first run's group stays reserved and the second never starts.
    data = tiny("ddp", shapes, tmp_path / "runs", num_samples=2, max_concurrent_trials=1, time_budget_s=240,
                asha={"grace_period": 1, "max_t": 1}, resources={"cpus_per_trial": 1.5, "workers_per_trial": 2})
    data["mlflow"]["registered_model_name"] = None
    # depth-5 Unet: DDP needs every parameter used (segcore.train sets find_unused_parameters=False)
    data["space"].update({"architecture": "Unet", "arch_kwargs": {"decoder_channels": [32, 16, 8, 8, 8]}})
    outcome = run_search(parse_search_spec(data))
    assert outcome.counts == {"completed": 0, "stopped early": 2, "failed": 0}
    client = mlflow.MlflowClient(mlflow_sqlite)
    runs = child_runs(client, "ddp", outcome.parent_run_id)
    assert len(runs) == 2
    for run in runs:
        assert run.data.metrics["world_size"] == 2 and run.data.tags[STATUS_TAG] == STOPPED
    deadline = time.monotonic() + 30
    while any(pg["state"] == "CREATED" for pg in ray.util.placement_group_table().values()):
        assert time.monotonic() < deadline, ray.util.placement_group_table()
        time.sleep(1)
