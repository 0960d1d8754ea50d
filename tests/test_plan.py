"""``gigaseg plan``: the plan adapts to the data, round-trips through ``gigaseg train``, is what
``gigaseg train`` uses without ``--config``, and is a search's trial 0 (real files, real training)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny_search import tiny_search as tiny

from search import parse_search_spec, run_search
from search.mlflow_runs import TRIAL_TAG
from search.planned import trial0_point
from search.space import SearchSpace
from segcore.cli import main as gigaseg
from segcore.config import TrainConfig, load_yaml_config
from segcore.data.spec import DatasetSpec
from segcore.modelio.ref import read_card
from segcore.plan import plan_training
from segcore.plan.decisions import (
    MIN_PATCH,
    THIN_MODEL,
    decide_loss,
    decide_model,
    decide_patch,
    memory_budget,
)
from segcore.plan.fingerprints import fingerprint
from segcore.plan.timing import EPOCH_HEADROOM, MIN_STEPS, OVERHEAD_SHARE, VAL_SHARE, Speed, fit_to_steps
from segcore.simulate import generate_shapes
from segcore.simulate.common import prepare_dataset_dir, rng_for, write_spec

SIZE = 160


def _thin_lines(rng: np.random.Generator) -> np.ndarray:
    """Short lines 2-3 px wide (cracks, tracks): class 1 on background."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(int(rng.integers(10, 16))):
        p0 = rng.uniform(10, SIZE - 10, 2)
        d = rng.uniform(12, 26) * np.array([np.sin(a := rng.uniform(0, 2 * np.pi)), np.cos(a)])
        t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / float(d @ d), 0, 1)
        mask[(yy - p0[0] - t * d[0]) ** 2 + (xx - p0[1] - t * d[1]) ** 2 <= (rng.uniform(2, 3) / 2) ** 2] = 1
    return mask


def _blobs(rng: np.random.Generator) -> np.ndarray:
    """Two to four large ellipses (grains): class 1 on background."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.2, 0.8, 2) * SIZE
        a, b = rng.uniform(18, 30, 2)
        mask[((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1] = 1
    return mask


def write_dataset(out: Path, render, n: int = 4, seed: int = 0) -> Path:
    """8-bit images (objects bright on noise) and class-id masks from ``render(rng) -> mask``."""
    images, masks = prepare_dataset_dir(out)
    for i in range(n):
        rng = rng_for(seed, i)
        mask = render(rng)
        image = np.clip(80 + 120 * mask + rng.normal(0, 12, mask.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(images / f"im_{i}.png")
        Image.fromarray(mask).save(masks / f"im_{i}.png")
    write_spec(out, DatasetSpec(class_names=["background", "object"]))
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("plan") / "shapes", n=4, size=96, seed=1)


def test_plan_adapts_to_data(tmp_path: Path) -> None:
    """Thin lines get a smaller patch and a recall-weighted loss; large blobs Dice + CE and a bigger patch."""
    thin = fingerprint(write_dataset(tmp_path / "thin", _thin_lines))
    blobs = fingerprint(write_dataset(tmp_path / "blobs", _blobs))
    assert thin.classes[1].thickness_px <= 4 and blobs.classes[1].thickness_px > 15
    assert thin.classes[1].extent_px < blobs.classes[1].extent_px
    memory = memory_budget("cpu")
    thin_patch, _ = decide_patch(thin, 32, memory)
    blob_patch, why = decide_patch(blobs, 32, memory)
    assert thin_patch % 32 == 0 and blob_patch % 32 == 0
    assert thin_patch < blob_patch <= SIZE, why
    assert thin_patch >= 4 * thin.classes[1].extent_px
    thin_loss, _ = decide_loss(thin)
    blob_loss, _ = decide_loss(blobs)
    assert set(thin_loss["terms"]) == {"tversky", "focal"} and thin_loss["tversky_beta"] > thin_loss["tversky_alpha"]
    assert set(blob_loss["terms"]) == {"dice", "ce"}
    # thin lines: a U-Net with a full-resolution skip; blobs keep the default model; a named model is kept
    assert decide_model(thin, {"encoder": "resnet34"})[0] == {"encoder": "resnet34", **THIN_MODEL}
    assert decide_model(blobs, {}) == ({}, None)
    assert decide_model(thin, {"arch": "FPN"}) == ({"arch": "FPN"}, None)


def test_a_short_budget_buys_steps_with_smaller_batches_and_patches(shapes: Path) -> None:
    """Too few steps in the budget: the batch shrinks first, then the patch, not below one object extent."""
    fp = fingerprint(shapes)
    cfg = TrainConfig.model_validate({"data": {"patch_size": 160, "batch_size": 8}})
    budget_s = 60 * (1 - OVERHEAD_SHARE) * (1 - VAL_SHARE)
    fast = Speed("cpu", budget_s / (2 * MIN_STEPS), 1e-7, 4)
    assert fit_to_steps(fp, cfg, fast, 1.0, 32) is None  # enough steps: the plan stands
    floor = min(160, max(MIN_PATCH, -(-max(c.extent_px for c in fp.classes[1:]) // 32) * 32))
    patch, batch, why = fit_to_steps(fp, cfg, Speed("cpu", budget_s / MIN_STEPS * 4, 1e-7, 4), 1.0, 32)
    # a quarter of the px per step: batch / 2, patch 160 / sqrt 2 = 113, down to a multiple of 32
    assert (patch, batch) == (max(96, floor), 4) and "aims at 200" in why
    patch, batch, _ = fit_to_steps(fp, cfg, Speed("cpu", budget_s, 1e-7, 4), 1.0, 32)
    assert batch == 4 and patch == floor  # one step in the budget: down to the floor, no further


def test_a_search_plan_is_timed_with_a_trials_threads(shapes: Path) -> None:
    """A trial on 1 CPU trains on 1 torch thread: the plan times its steps that way, says so, and
    leaves the process's thread count as it was."""

    before = torch.get_num_threads()
    plan = plan_training(shapes, 0.5, base={"model": {"arch": "Unet", "encoder": "resnet18"}}, device="cpu",
                         threads=1)
    assert plan.speed.threads == 1 and torch.get_num_threads() == before
    assert "cpu (1 thread" in " ".join(plan.lines())


def test_the_plan_times_steps_with_the_autocast_training_uses(shapes: Path) -> None:
    """Training runs bf16 autocast exactly where train_autocast says (a GPU, or a CPU with native bf16);
    the plan times its steps the same way and says so, and amp off is fp32 everywhere."""
    from segcore.device import cpu_has_native_bf16, train_autocast

    cpu = torch.device("cpu")
    assert train_autocast(cpu, True) is cpu_has_native_bf16() and not train_autocast(cpu, False)
    base = {"model": {"arch": "Unet", "encoder": "resnet18"}}
    on = plan_training(shapes, 0.5, base=base, device="cpu", threads=1)
    off = plan_training(shapes, 0.5, base={**base, "amp": False}, device="cpu", threads=1)
    assert on.speed.bf16 is cpu_has_native_bf16() and off.speed.bf16 is False
    assert ("bf16)" in " ".join(on.lines())) is cpu_has_native_bf16() and "bf16" not in " ".join(off.lines())


def test_fingerprint_reads_a_bounded_sample(shapes: Path) -> None:
    """At most max_pixels are read; shapes' lines are thin, its ellipses are not."""
    fp = fingerprint(shapes, max_pixels=4 * 48 * 48)
    assert fp.pixels_read <= 4 * 48 * 48 and fp.n_images == 4 and fp.median_size == (96, 96)
    full = fingerprint(shapes)
    line, ellipse = full.classes[1], full.classes[2]
    assert line.thickness_px <= 6 < ellipse.thickness_px
    assert full.dtype == "uint8" and full.channels == 1


def test_plan_yaml_roundtrips_through_train(shapes: Path, tmp_path: Path, capsys) -> None:
    """`gigaseg plan` prints one reason per decision and writes a YAML `gigaseg train --config` takes."""
    out = tmp_path / "plan.yaml"
    assert gigaseg(["plan", str(shapes), "--out", str(out), "--budget-min", "0.2"]) == 0
    printed = capsys.readouterr().out
    for key in ("data.patch_size", "data.batch_size", "loss", "normalize", "optim", "epochs"):
        assert f"  {key}" in printed
    planned = load_yaml_config(out)
    assert planned.optim.schedule == "one_cycle" and "tversky" in planned.loss.terms  # shapes' lines are thin
    model = tmp_path / "model"
    assert gigaseg(["train", "--data", str(shapes), "--config", str(out), "--out", str(model), "--no-mlflow",
                    "--epochs", "1", "--patches-per-epoch", "8"]) == 0
    trained = read_card(model).train
    assert trained.loss == planned.loss and trained.data.patch_size == planned.data.patch_size
    assert trained.normalize == planned.normalize


def test_train_without_config_uses_the_plan(shapes: Path, tmp_path: Path) -> None:
    """No --config: the plan is computed, trained with (flags still win) and saved beside the model."""
    model = tmp_path / "model"
    assert gigaseg(["train", "--data", str(shapes), "--out", str(model), "--no-mlflow", "--budget-min", "0.1",
                    "--epochs", "1", "--patches-per-epoch", "8"]) == 0
    plan = load_yaml_config(model / "plan.yaml")
    trained = read_card(model).train
    assert trained.epochs == 1 and trained.data.patches_per_epoch == 8  # the flags
    assert plan.max_minutes and trained.max_minutes is None  # --epochs, not the budget's minutes, ends it
    assert trained.loss == plan.loss and trained.optim == plan.optim
    assert trained.model.arch == "ResUNet" and trained.model.arch_kwargs == {"full_res_channels": 16}  # thin lines
    assert trained.data.patch_size == plan.data.patch_size and trained.data.batch_size == plan.data.batch_size
    assert "data.patch_size" in (model / "plan.yaml").read_text()  # the reasons, as comments


def test_a_budget_plan_ends_with_its_minutes_not_its_timed_epochs(shapes: Path, tmp_path: Path) -> None:
    """`gigaseg train --budget-min` / `gigaseg plan`: max_minutes is the budget less overhead and the timed
    epochs become a cap with headroom, so a timing on a busy machine (too few epochs) does not cut the
    run short: it trains on into the headroom, and its one-cycle anneals at the cap."""
    from segcore.train import train

    base = {"model": {"arch": "Unet", "encoder": "resnet18"}}
    timed = plan_training(shapes, 0.5, base=base, device="cpu", threads=1)
    bound = plan_training(shapes, 0.5, base=base, device="cpu", threads=1, until_minutes=True)
    assert timed.config.max_minutes is None and bound.config.max_minutes == pytest.approx(0.5 * (1 - OVERHEAD_SHARE))
    assert bound.config.epochs % EPOCH_HEADROOM == 0 and "max_minutes = 0.425" in "\n".join(bound.lines())
    # as if the timing had said 1 epoch of 8 patches: the run goes on into its headroom (3 epochs, ~1 s each)
    small = bound.config.data.model_copy(update={"patches_per_epoch": 8, "batch_size": 4, "patch_size": 64})
    busy = bound.config.model_copy(update={"epochs": EPOCH_HEADROOM, "data": small})
    result = train(busy, shapes, tmp_path / "model")
    assert len(result.history) == EPOCH_HEADROOM
    assert result.history[-1]["lr"] < busy.optim.lr / 100  # annealed where it stopped


def test_trial0_snaps_the_plan_into_the_space(shapes: Path, tmp_path: Path) -> None:
    """Values outside the space are snapped (nearest choice, clamped range); explicit base keys win."""
    raw = tiny("snap", shapes, tmp_path, space={
        "architecture": {"choice": ["Unet", "Linknet"]}, "encoder": {"choice": ["resnet18"]},
        "lr": {"loguniform": [3e-3, 1e-2]}, "batch_size": {"choice": [2, 6]}, "focal_weight": {"uniform": [0, 0.5]},
        "ce_weight": {"uniform": [0.1, 1.0]}, "epochs": 1,
    }, base={"data": {"batch_size": 5, "val_tile": 64}, "optim": {"lr": 2e-3}, "loss": {"terms": {"focal": 1.0}}})
    space = SearchSpace.from_spec(parse_search_spec(raw), "snap")
    point = trial0_point(space)
    assert point == {"architecture": "Unet", "encoder": "resnet18", "lr": 3e-3, "batch_size": 6,
                     "focal_weight": 0.5, "ce_weight": 0.1}


def test_the_plan_chooses_the_model_among_the_listed_and_leaves_a_named_one(shapes: Path, tmp_path: Path) -> None:
    """Thin data: a search whose space lists ResUNet with the plan's kwargs plans for it and trial 0 takes
    it, though it is listed second; a space without those kwargs keeps its first architecture. A
    `gigaseg train --arch` on thin data plans for the user's architecture, with no kwargs of the plan's."""
    from search.planned import plan_search

    kwargs = {"ResUNet": THIN_MODEL["arch_kwargs"]}
    for listed, want in (({"arch_kwargs": kwargs}, "ResUNet"), ({}, "Unet")):
        raw = tiny(f"model-{want}", shapes, tmp_path, base={}, plan={"enabled": True, "budget_min": 0.1}, space={
            "architecture": {"choice": ["Unet", "ResUNet"]}, "encoder": {"choice": ["resnet18"]}, "epochs": 1,
            **listed})
        spec = parse_search_spec(raw)
        planned, space, plan = plan_search(spec, SearchSpace.from_spec(spec, "m"))
        assert plan.config.model.arch == want and planned.seed_configs[0]["architecture"] == want
        seed = planned.seed_configs[0]
        trial0 = space.sample(lambda dim, act, seed=seed: seed[dim.key])  # as Optuna replays the seed
        assert space.to_train_config(trial0).model == plan.config.model
    model = tmp_path / "unet"
    assert gigaseg(["train", "--data", str(shapes), "--out", str(model), "--no-mlflow", "--budget-min", "0.1",
                    "--epochs", "1", "--patches-per-epoch", "4", "--arch", "Unet"]) == 0
    assert load_yaml_config(model / "plan.yaml").model.arch == "Unet" and read_card(model).train.model.arch_kwargs == {}


@pytest.mark.ray
def test_search_trial0_is_the_plan(ray_local, mlflow_sqlite, shapes: Path, tmp_path: Path) -> None:
    """The first trial's drawn params are the plan's values; the plan is the parent run's plan.yaml."""
    raw = tiny("planned", shapes, tmp_path, num_samples=1, plan={"enabled": True, "budget_min": 0.2})
    outcome = run_search(parse_search_spec(raw))
    client = mlflow.MlflowClient(mlflow_sqlite)
    plan_text = client.download_artifacts(outcome.parent_run_id, "plan.yaml")
    plan = yaml.safe_load(Path(plan_text).read_text())
    exp = client.get_experiment_by_name("planned")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    first = min(runs, key=lambda r: r.data.tags[TRIAL_TAG])  # Tune numbers trials in order: _00000 first
    params = first.data.params
    assert params["architecture"] == "Unet" and params["encoder"] == "resnet18"
    assert float(params["lr"]) == pytest.approx(plan["optim"]["lr"])
    assert float(params["focal_weight"]) == pytest.approx(plan["loss"]["terms"].get("focal", 0.0))
    # the space searches the loss mix (focal_weight): the plan sets trial 0's focal weight, but its
    # other terms are not added under every sampled mix, so trial 0's mix is base's + the searched one
    logged = {k.split(".")[-1] for k in params if k.startswith("loss.terms.")}
    default_mix = set(TrainConfig().loss.terms)
    assert logged == default_mix | {"focal"}, (logged, plan["loss"]["terms"])
