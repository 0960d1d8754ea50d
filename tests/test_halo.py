"""The measured exact halo: training stores on the card the smallest halo at which a window's
probabilities equal the whole image's (within HALO_TOL); tiled labels then equal whole-image
labels, and one multiple less is not exact."""

from __future__ import annotations

import numpy as np
import pytest

from segcore.cli import main as gigaseg
from segcore.config import TrainConfig, parse_config
from segcore.data import load_samples
from segcore.halo import (
    HALO_KEY,
    HALO_TOL,
    MEASURED_ON_KEY,
    card_halo,
    measure_exact_halo,
    measuring_images,
    stage_caps,
    window_change,
    window_norms,
)
from segcore.modelio.ref import load_model
from segcore.tiling import pad_to_multiple, predict_tiled, predict_whole
from segcore.train import train

TINY = {
    "model": {"arch": "Unet", "encoder": "resnet18", "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
    "data": {"patch_size": 64, "patches_per_epoch": 32, "batch_size": 8, "val_tile": 64, "val_halo": 16},
    "epochs": 2,
    "augment": {"strength": 0.3},
}


def brute_force_halo(predict, images, tile: int, multiple: int, cap: int) -> int | None:  # noqa: ANN001
    """Every halo in turn, the whole tiled image each time (every window, no shortcuts): the
    smallest at which all probabilities are within HALO_TOL of the whole image's."""
    for halo in range(0, cap + 1, multiple):
        if all(np.abs(predict_tiled(im, predict, tile=tile, halo=halo) - predict_whole(im, predict)).max() <= HALO_TOL
               for im in images):
            return halo
    return None


def box_proba(batch: np.ndarray) -> np.ndarray:
    """A 5x5 mean filter (zero outside the window) as 2-class probabilities: reach 2."""
    x = np.pad(batch, ((0, 0), (0, 0), (2, 2), (2, 2)))
    h, w = batch.shape[-2:]
    acc = sum(x[..., dy : dy + h, dx : dx + w] for dy in range(5) for dx in range(5)) / 25
    return np.concatenate([acc, 1 - acc], axis=1)


def test_measure_exact_halo_finds_a_local_predictors_reach() -> None:
    images = [np.random.default_rng(s).random((1, 70, 90), dtype=np.float32) for s in range(2)]
    assert measure_exact_halo(box_proba, images, tile=8, multiple=1, cap=10) == (2, 0.0)
    assert brute_force_halo(box_proba, images, 8, 1, 10) == 2
    halo, change = measure_exact_halo(box_proba, images, tile=8, multiple=1, cap=1)
    assert halo is None and change > HALO_TOL
    with pytest.raises(ValueError, match="multiple"):
        measure_exact_halo(box_proba, images, tile=12, multiple=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("halo")
    for name, n, size, seed in [("train", 4, 192, 1), ("val", 1, 256, 2)]:
        assert gigaseg(["simulate", "shapes", "--out", str(root / name), "--n", str(n), "--size", str(size),
                        "--seed", str(seed)]) == 0
    train(parse_config(TINY, TrainConfig), root / "train", root / "model", val_dir=root / "val")
    return root


def test_training_stores_the_smallest_exact_halo(trained) -> None:
    loaded = load_model(trained / "model", device="cpu")
    extra = loaded.card.extra
    on, halo, m = extra[MEASURED_ON_KEY], extra[HALO_KEY], loaded.size_multiple
    assert on["tile"] == 128 and on["multiple"] == m == 8 and on["images"] == 1 and on["exact"] is True
    assert 0 < halo < on["cap"] and on["change"] <= HALO_TOL  # a trained U-Net needs context, and has a finite reach
    stage = next(c for c in stage_caps(on["cap"], m) if c >= halo)
    crop = measuring_images([s.image for s in load_samples(trained / "val")], on["tile"], stage, m)[0]
    predict = pad_to_multiple(loaded.predict_proba, m)
    whole = predict_whole(crop, predict)
    assert window_change(crop, whole, predict, on["tile"], halo - m) > HALO_TOL  # one multiple less is not exact
    tiled = predict_tiled(crop, predict, tile=on["tile"], halo=halo)  # every window of the crop, not just one
    assert np.abs(tiled - whole).max() <= HALO_TOL  # the halo's promise, in every window
    # so a label can flip only where the whole image's top two probabilities are within 2 x HALO_TOL:
    # a float tie that a different conv blocking (CPU kernels differ by size) may break either way
    flipped = loaded.labels_from_proba(tiled) != loaded.labels_from_proba(whole)
    top2 = np.sort(whole, axis=0)[-2:]
    assert flipped.sum() <= 4 and np.all((top2[1] - top2[0])[flipped] <= 2 * HALO_TOL)


def test_measure_halo_switch_turns_it_off(trained) -> None:
    loaded = load_model(trained / "model", device="cpu")
    card = loaded.card
    card.train = card.train.model_copy(update={"data": card.train.data.model_copy(update={"measure_halo": False})})
    image = load_samples(trained / "val")[0].image
    assert card_halo(loaded.model, card, [image], loaded.device) == {}


def test_tile_is_chosen_from_the_halo_deterministically(trained) -> None:
    from pipelines.options import choose_tile, resolve_tiling, tile_overhead

    halo = load_model(trained / "model", device="cpu").card.extra[HALO_KEY]
    first = resolve_tiling(load_model(trained / "model", device="cpu"), {"tile": None, "halo": None, "batch_size": 8})
    second = resolve_tiling(load_model(trained / "model", device="cpu"), {"tile": None, "halo": None, "batch_size": 8})
    assert first == second and first["halo"] == halo  # same card, same machine: same tile
    tile = first["tile"]
    assert tile % 8 == 0 and tile_overhead(tile, halo) <= 1.35 < tile_overhead(tile - 8, halo)
    assert choose_tile(128, 32) == 1600 and tile_overhead(1600, 128) == pytest.approx(1.3456, abs=1e-4)
    assert choose_tile(128, 32, 2.0) < 1600 and choose_tile(0, 32) == 32
    assert choose_tile(128, 32, max_window_px=1024**2) == 768  # the memory cap wins over the overhead target


def test_given_tile_is_honoured_or_refused_and_halo_rounded(trained) -> None:
    from pipelines.options import resolve_tiling
    from segcore.errors import ConfigError

    loaded = load_model(trained / "model", device="cpu")
    given = resolve_tiling(loaded, {"tile": 96, "halo": 60, "max_overhead": 1.2, "tta": False})
    assert (given["tile"], given["halo"]) == (96, 64) and "max_overhead" not in given
    with pytest.raises(ConfigError, match="--tile 100: not a multiple of the model's size multiple 8. Use 104"):
        resolve_tiling(loaded, {"tile": 100, "halo": 60})
    with pytest.raises(ConfigError, match="--memory-gb 2.0 with --tile 96"):
        resolve_tiling(loaded, {"tile": 96, "halo": 60, "memory_gb": 2.0})


def test_memory_gb_sizes_the_tile_and_the_calls(trained) -> None:
    """--memory-gb is the budget of one model call: a smaller budget gives a smaller tile (never above
    the overhead target's) and a pixel budget per call that fits it."""
    from pipelines.options import forward_bytes_per_px, resolve_tiling

    loaded = load_model(trained / "model", device="cpu")
    per_px = forward_bytes_per_px(loaded)
    small = resolve_tiling(loaded, {"tile": None, "halo": None, "memory_gb": 0.05})
    default = resolve_tiling(loaded, {"tile": None, "halo": None})
    assert "memory_gb" not in small and small["tile"] < default["tile"]
    assert small["call_px"] * per_px <= 0.05e9 and (small["tile"] + 2 * small["halo"]) ** 2 * per_px <= 0.05e9


def test_default_call_budget_and_balanced_tiles(trained) -> None:
    """Without --memory-gb one call's activations stay within DEFAULT_CALL_GB (not what the RAM would
    hold: RSS flat near 3 GB); a chosen tile is balanced per image, a given one is kept."""
    from pipelines.options import DEFAULT_CALL_GB, SegmentOptions, forward_bytes_per_px, resolve_tiling
    from pipelines.plan import image_tile

    loaded = load_model(trained / "model", device="cpu")
    chosen = resolve_tiling(loaded, {"tile": None, "halo": None})
    per_px = forward_bytes_per_px(loaded)
    assert chosen["call_px"] * per_px <= DEFAULT_CALL_GB * 1e9 < (chosen["call_px"] + 1) * per_px
    assert chosen["balance_tile"] and resolve_tiling(loaded, {"tile": None, "halo": None, "memory_gb": 8})["call_px"] > chosen["call_px"]
    opts = SegmentOptions(model="m", **{**chosen, "tile": 2400, "halo": 192, "call_px": 2784**2})
    assert image_tile((4096, 4096), opts, 32) == 2048 and image_tile((6000, 3000), opts, 32) == 2016
    assert image_tile((3000, 2000), opts, 32) == 3008  # fits one call: one window, no halo
    given = SegmentOptions(model="m", tile=2400, halo=192, call_px=2784**2)  # --tile: kept as given
    assert image_tile((4096, 4096), given, 32) == 2400


def test_window_wide_norms_are_not_measured(trained) -> None:
    """smp's FPN normalises with GroupNorm over each whole window: no halo is exact, so none is
    measured; the card says why and gets the default (4 x the size multiple)."""
    import segmentation_models_pytorch as smp

    assert window_norms(smp.FPN("resnet18", encoder_weights=None, in_channels=1, classes=3)) == ["GroupNorm"]
    assert window_norms(smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=3)) == []
    loaded = load_model(trained / "model", device="cpu")
    fpn = smp.FPN("resnet18", encoder_weights=None, in_channels=1, classes=3, encoder_depth=3, upsampling=2)
    image = load_samples(trained / "val")[0].image
    extra = card_halo(fpn, loaded.card, [image], loaded.device)
    assert extra[HALO_KEY] == 4 * 8 and extra[MEASURED_ON_KEY] == {"exact": False, "window_norms": ["GroupNorm"],
                                                                    "multiple": 8}
