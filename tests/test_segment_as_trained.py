"""Segment what was trained (issue 11): the saved binary threshold, the normalisation the config
asked for, FITS keys inherited from the primary header, NaN pixels as no-data with an
out-of-range warning, and model folders whose card disagrees with the weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from astropy.io import fits
from pipelines_helpers import HALO, TILE, structured, write_tiled_tiff8

from pipelines.runner import RunConfig, segment_archive
from segcore.cli import main as gigaseg
from segcore.config import DataConfig, LossConfig, ModelConfig, NormalizeConfig, TrainConfig
from segcore.data import read_image
from segcore.data.errors import DataError
from segcore.data.normalize import compute_norm_stats
from segcore.errors import ModelError
from segcore.evaluate import predict_labels
from segcore.modelio.card import CONFIG_FILE, WEIGHTS_FILE, ModelCard
from segcore.modelio.folder import save_model_dir
from segcore.modelio.ref import load_model
from segcore.models import build_model
from segcore.readers import open_sources
from segcore.simulate import generate_shapes
from segcore.train import build_run

SMALL_UNET = {"encoder_depth": 2, "decoder_channels": [16, 8]}


def binary_model(path: Path, image: np.ndarray) -> tuple[Path, float]:
    """A 1-channel (bce) head whose saved threshold is the median foreground probability on
    ``image``, so thresholding and argmax (0.5) disagree on many pixels."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(arch="Unet", encoder="resnet18", classes=1, arch_kwargs=SMALL_UNET),
                      loss=LossConfig(terms={"bce": 1.0}), normalize=NormalizeConfig(mode="dtype_range"))
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(image[None, None].astype(np.float32) / 255)))
    threshold = round(float(p.median()), 4)
    assert abs(threshold - 0.5) > 1e-3, "the test needs a threshold away from 0.5"
    card = ModelCard(train=cfg.model_copy(update={"binary_threshold": threshold}), class_names=["bg", "fg"])
    return save_model_dir(path, model, card), threshold


@pytest.mark.ray
def test_segment_labels_a_binary_head_with_its_saved_threshold(tmp_path: Path, ray_local: None) -> None:
    image = write_tiled_tiff8(tmp_path / "scan.tif", (96, 128))
    model_dir, threshold = binary_model(tmp_path / "model", image)
    segment_archive(str(model_dir), [str(tmp_path / "scan.tif")], tmp_path / "out", RunConfig(progress_bars=False),
                    tile=TILE, halo=HALO, batch_size=4)
    labels = zarr.open_array(str(tmp_path / "out" / "scan.zarr" / "0"), mode="r")[:]
    loaded = load_model(model_dir, device="cpu")
    expected = predict_labels(loaded, image[None].astype(np.float32) / 255, tile=TILE, halo=HALO)
    np.testing.assert_array_equal(labels, expected)
    argmax = (loaded.predict_proba(image[None, None].astype(np.float32) / 255)[0].argmax(0))
    assert (argmax != expected).mean() > 0.05, f"threshold {threshold} should change labels against argmax"


def _shapes_dataset(root: Path, normalize: dict | None) -> Path:
    generate_shapes(root, n=3, size=64, seed=1)
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    if normalize is not None:
        spec["normalize"] = normalize
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return root


def _tiny(**update: object) -> TrainConfig:
    return TrainConfig(model=ModelConfig(arch="Unet", encoder="resnet18", arch_kwargs=SMALL_UNET),
                       data=DataConfig(patch_size=64), device="cpu", **update)


def test_config_normalize_wins_over_dataset_yaml(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _shapes_dataset(tmp_path / "d", {"mode": "dtype_range"})
    cfg = _tiny(normalize=NormalizeConfig(mode="percentile", low_percentile=1, high_percentile=99))
    with caplog.at_level(logging.INFO, logger="segcore.train"):
        run = build_run(cfg, data)
    assert run.card.train.normalize.mode == "percentile"
    lows = [np.percentile(s.image, 1) for s in run.patches.samples]
    np.testing.assert_allclose(lows, 0.0, atol=1e-5)  # percentile-normalised, not /255
    assert "from the train config" in caplog.text


def test_dataset_yaml_normalize_applies_when_the_config_is_silent(tmp_path: Path) -> None:
    data = _shapes_dataset(tmp_path / "d", {"mode": "zscore"})
    run = build_run(_tiny(), data)
    assert run.card.train.normalize.mode == "zscore"


def _mef(path: Path, inherit: bool | None) -> None:
    primary = fits.PrimaryHDU()
    primary.header["PEDESTAL"] = 1200.0
    primary.header["GAIN"] = 0.25
    hdus: list = [primary]
    for k in range(2):
        hdu = fits.ImageHDU(structured((40, 50), k, 60000).astype(np.int32), name=f"AMP{k + 1}")
        if inherit is not None:
            hdu.header["INHERIT"] = inherit
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path)


@pytest.mark.parametrize("inherit", [None, True])
def test_pedestal_and_gain_from_the_primary_header(tmp_path: Path, inherit: bool | None) -> None:
    _mef(tmp_path / "f.fits", inherit)
    cfg = NormalizeConfig(mode="fits_header")
    training = [compute_norm_stats(r.array, cfg, r.header, "t") for r in read_image(tmp_path / "f.fits")]
    sources = open_sources(tmp_path / "f.fits")
    segmenting = [compute_norm_stats(s.sample(), cfg, s.header, s.label) for s in sources]
    for s in sources:
        s.close()
    assert [(st.offset, st.scale) for st in training] == [(1200.0, 0.25)] * 2 == \
        [(st.offset, st.scale) for st in segmenting]
    assert all(r.header.get("NAXIS1") == 50 for r in read_image(tmp_path / "f.fits"))  # own structure kept


def test_inherit_false_does_not_look_in_the_primary_header(tmp_path: Path) -> None:
    _mef(tmp_path / "f.fits", inherit=False)
    raw = read_image(tmp_path / "f.fits")[0]
    with pytest.raises(DataError, match="PEDESTAL"):
        compute_norm_stats(raw.array, NormalizeConfig(mode="fits_header"), raw.header, "f.fits[AMP1]")


def _uint8_model(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(arch="Unet", encoder="resnet18", classes=3, arch_kwargs=SMALL_UNET),
                      normalize=NormalizeConfig(mode="dtype_range"))
    card = ModelCard(train=cfg, class_names=["pore", "quartz", "clay"], extra={"input_range": [0.05, 0.9]})
    return save_model_dir(path, build_model(cfg.model).eval(), card)


@pytest.mark.ray
def test_nan_pixels_are_no_data_and_far_inputs_warn(tmp_path: Path, ray_local: None,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    data = structured((64, 80), 5, 60000).astype(np.float32)  # floats "pre-scaled" by dtype_range: 0..60000
    data[10:20, 30:37] = np.nan
    data[0, 0] = np.inf
    fits.PrimaryHDU(data).writeto(tmp_path / "frame.fits")
    with caplog.at_level(logging.WARNING):
        report = segment_archive(str(_uint8_model(tmp_path / "m")), [str(tmp_path / "frame.fits")], tmp_path / "o",
                                 RunConfig(progress_bars=False), tile=TILE, halo=HALO, batch_size=4)
    assert not report.failed
    summary = json.loads((tmp_path / "o" / "frame.json").read_text())
    assert summary["nodata_pixels"] == 71
    assert sum(summary["pixel_counts"].values()) == 64 * 80 - 71
    labels = zarr.open_array(str(tmp_path / "o" / "frame.zarr" / "PRIMARY" / "0"), mode="r")[:]
    assert (labels == 255).sum() == 71 and (labels[10:20, 30:37] == 255).all()
    assert any("outside the range the model was trained on" in w for w in summary["warnings"])
    assert "outside the range the model was trained on" in caplog.text


def test_card_with_too_few_class_names_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _uint8_model(tmp_path / "m")
    card = json.loads((model / CONFIG_FILE).read_text())
    card["class_names"] = card["class_names"][:2]
    (model / CONFIG_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="2 class_names .* 3 classes"):
        load_model(model)
    _shapes_dataset(tmp_path / "d", None)
    assert gigaseg(["evaluate", "--model", str(model), "--data", str(tmp_path / "d")]) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "class_names" in errors[0].getMessage() and errors[0].exc_info is None


def test_truncated_weights_are_one_line(tmp_path: Path) -> None:
    model = _uint8_model(tmp_path / "m")
    weights = model / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated") as err:
        load_model(model)
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


def test_card_whose_classes_changed_is_one_line(tmp_path: Path) -> None:
    model = _uint8_model(tmp_path / "m")
    card = json.loads((model / CONFIG_FILE).read_text())
    card["train"]["model"]["classes"] = 4
    card["class_names"].append("albite")
    (model / CONFIG_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="does not match config.json"):
        load_model(model)


def test_train_yaml_without_normalize_keeps_dataset_yaml(tmp_path: Path) -> None:
    """``gigaseg train --config`` marks only the keys its YAML writes as set, so a YAML silent on
    ``normalize`` leaves dataset.yaml's in force (and one that writes it wins)."""
    import argparse

    from segcore.train_cli import FLAG_KEYS, config_from_args

    data = _shapes_dataset(tmp_path / "d", {"mode": "zscore"})
    for written, expected in ((None, "zscore"), ({"mode": "percentile"}, "percentile")):
        body = {"model": {"arch": "Unet", "arch_kwargs": SMALL_UNET}, "data": {"patch_size": 64}, "device": "cpu"}
        if written:
            body["normalize"] = written
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(body))
        args = argparse.Namespace(config=str(tmp_path / "c.yaml"), loss=None, set=None, **dict.fromkeys(FLAG_KEYS))
        assert build_run(config_from_args(args), data).card.train.normalize.mode == expected
