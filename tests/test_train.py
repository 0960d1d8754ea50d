"""The one training function end to end: CLI, MLflow logging, model directory, resume, evaluate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from segcore.cli import main as gigaseg
from segcore.config import TrainConfig, parse_config
from segcore.modelio.ref import load_model
from segcore.train import EpochReport, train

TINY = {
    "model": {"arch": "Unet", "encoder": "resnet18", "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
    "data": {"patch_size": 64, "patches_per_epoch": 16, "batch_size": 8, "val_tile": 64, "val_halo": 16},
    "epochs": 2,
    "augment": {"strength": 0.3},
}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    assert gigaseg(["simulate", "shapes", "--out", str(root / "train"), "--n", "4", "--size", "96", "--seed", "1"]) == 0
    assert gigaseg(["simulate", "shapes", "--out", str(root / "test"), "--n", "2", "--size", "96", "--seed", "2"]) == 0
    return root


def test_train_cli_logs_to_mlflow_and_writes_model_dir(shapes_data, tmp_path, mlflow_sqlite):
    out = tmp_path / "model"
    rc = gigaseg(["train", "--data", str(shapes_data / "train"), "--out", str(out), "--epochs", "2",
                  "--arch", "Unet", "--encoder", "resnet18", "--patch-size", "64", "--patches-per-epoch", "16",
                  "--set", "data.val_tile=64", "--set", "model.arch_kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}",
                  "--loss", "dice=1,focal=0.5", "--experiment", "t-train"])
    assert rc == 0
    for name in ("config.json", "model.safetensors", "metrics.json", "confusion_matrix.json", "preview.png"):
        assert (out / name).is_file(), name
    card = json.loads((out / "config.json").read_text())
    assert card["train"]["loss"]["terms"] == {"dice": 1.0, "focal": 0.5}
    assert card["class_names"][0] == "background"

    client = mlflow.MlflowClient(mlflow_sqlite)
    exp = client.get_experiment_by_name("t-train")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["model.arch"] == "Unet" and run.data.params["loss.terms.focal"] == "0.5"
    history = client.get_metric_history(run.info.run_id, "val_miou")
    assert [m.step for m in history] == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model_dir")}
    assert "model_dir/model.safetensors" in artifacts


def test_train_callbacks_checkpoint_and_resume(shapes_data, tmp_path):
    cfg = parse_config(TINY, TrainConfig)
    reports: list[EpochReport] = []

    def keep_checkpoint(report: EpochReport) -> None:
        reports.append(report)
        report.save_checkpoint(tmp_path / f"ckpt{report.epoch}")

    full = train(cfg, shapes_data / "train", tmp_path / "full", callbacks=[keep_checkpoint])
    assert [r.epoch for r in reports] == [0, 1] and reports[-1].is_last
    assert {"train_loss", "val_loss", "val_miou", "val_iou_background"} <= set(reports[0].metrics)

    # resuming after epoch 0 runs exactly one more epoch and keeps the earlier history
    resumed_epochs: list[int] = []
    resumed = train(cfg, shapes_data / "train", tmp_path / "resumed", resume_from=tmp_path / "ckpt0",
                    callbacks=[lambda r: resumed_epochs.append(r.epoch)])
    assert resumed_epochs == [1]
    assert len(resumed.history) == 2
    assert np.isclose(resumed.history[0]["val_miou"], full.history[0]["val_miou"])


def test_saved_model_predicts_any_size_and_evaluate_writes_report(shapes_data, tmp_path, capsys):
    cfg = parse_config(TINY, TrainConfig)
    train(cfg, shapes_data / "train", tmp_path / "m")
    loaded = load_model(tmp_path / "m", device="cpu")
    proba = loaded.predict_proba(np.zeros((3, 1, 96, 160), np.float32))
    assert proba.shape == (3, 3, 96, 160)
    assert torch.allclose(torch.from_numpy(proba.sum(1)), torch.ones(3, 96, 160), atol=1e-4)

    rc = gigaseg(["evaluate", "--model", str(tmp_path / "m"), "--data", str(shapes_data / "test"),
                  "--out", str(tmp_path / "eval")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "background" in printed and "IoU" in printed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and len(metrics["confusion_matrix"]) == 3
    assert list((tmp_path / "eval").glob("overlay_*.png"))


def test_bad_config_names_the_key(tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text("optim:\n  lr: -1\nmodel:\n  archh: Unet\n")
    from segcore.config import ConfigError, load_yaml_config

    with pytest.raises(ConfigError) as err:
        load_yaml_config(bad)
    assert "optim.lr" in str(err.value) and "model.archh" in str(err.value) and str(bad) in str(err.value)


def _train_rank(rank: int, world: int, port: int, data: str, out: str) -> None:
    """One rank of ``train()`` under a real gloo process group (what a Ray Train worker sees)."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = parse_config({**TINY, "epochs": 1}, TrainConfig)
    result = train(cfg, data, f"{out}/rank{rank}")
    Path(f"{out}/rank{rank}.json").write_text(
        json.dumps({"val_miou": result.metrics["val_miou"], "epochs": len(result.history)}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_train_finishes_when_a_rank_holds_no_validation_image(shapes_data, tmp_path):
    """4 images -> 1 validation image: rank 1 scores none, and must still make the same collectives."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_train_rank, args=(2, port, str(shapes_data / "train"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP train() hung: the ranks disagree on their collectives")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["epochs"] == 1  # confusion matrix summed over ranks: both see the same score
    assert (tmp_path / "rank0" / "model.safetensors").is_file()


def _binary_copy(src, dst):
    """The shapes dataset as a 2-class task (background vs any shape), for a 1-channel bce head."""
    from PIL import Image

    from segcore.data.spec import DatasetSpec
    from segcore.simulate.common import prepare_dataset_dir, write_spec

    images, masks = prepare_dataset_dir(dst)
    for path in sorted((src / "images").glob("*.png")):
        Image.open(path).save(images / path.name)
        mask = np.asarray(Image.open(src / "masks" / path.name))
        Image.fromarray((mask != 0).astype(np.uint8)).save(masks / path.name)
    write_spec(dst, DatasetSpec(class_names=["background", "shape"], normalize={"mode": "dtype_range"}))
    return dst


def test_binary_head_is_scored_with_the_threshold_it_saves(shapes_data, tmp_path):
    """Validation picks the threshold on this epoch's pixels, then scores with it: the reported
    val_miou is what ``evaluate`` gets from the saved model and its saved threshold."""
    from segcore.evaluate import evaluate
    from segcore.modelio.ref import read_card

    train_dir = _binary_copy(shapes_data / "train", tmp_path / "train")
    val_dir = _binary_copy(shapes_data / "test", tmp_path / "val")
    cfg = parse_config({**TINY, "epochs": 1, "loss": {"terms": {"bce": 1.0}}}, TrainConfig)
    result = train(cfg, train_dir, tmp_path / "model", val_dir=val_dir)
    card = read_card(tmp_path / "model")
    assert card.train.model.classes == 1
    assert 0 < card.train.binary_threshold < 1
    scored = evaluate(tmp_path / "model", val_dir, tmp_path / "eval")
    assert scored.metrics["miou"] == pytest.approx(result.metrics["val_miou"], abs=1e-9)
