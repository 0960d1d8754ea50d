"""Output-changing options through the whole job (--only-class, probabilities, uncertainty, flip
TTA, Gaussian-blended sub-tiles) and the command line (entry point, exit codes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from pipelines_helpers import CLASSES, HALO, STRIDE, TILE, make_model, write_tiled_tiff8

from pipelines.options import SegmentOptions
from pipelines.plan import ImagePlan
from pipelines.predictor import build_predictor
from pipelines.runner import RunConfig, segment_archive
from segcore.data.normalize import NormStats, apply_norm
from segcore.modelio.ref import load_model
from segcore.tiling import predict_tiled


@pytest.mark.ray
def test_mask_probabilities_uncertainty_with_tta_and_blending(tmp_path: Path, ray_local: None) -> None:
    model, image = make_model(tmp_path / "model"), tmp_path / "small.tif"
    pixels = write_tiled_tiff8(image, (70, 120))
    out = tmp_path / "out"
    settings = {"tile": TILE, "halo": HALO, "tta": True, "blend_tile": 64, "blend_overlap": 0.5}
    report = segment_archive(str(model), [str(image)], out, RunConfig(progress_bars=False), only_class="glow",
                             probabilities=True, uncertainty=True, **settings)
    assert len(report.done) == 1, report.failed

    # reference: the same window predictor (flips + blended sub-tiles) run by the plain tiler
    plan = ImagePlan.load(out / ".gigaseg" / "small" / "image")
    predictor = build_predictor(load_model(model, device="cpu"), SegmentOptions(model=str(model), **settings), STRIDE)
    x = apply_norm(pixels[None], NormStats(plan.norm_offset, plan.norm_scale))
    ref_proba = predict_tiled(x, predictor, tile=TILE, halo=HALO)
    ref = ref_proba.argmax(0)

    group = zarr.open_group(str(out / "small.zarr"), mode="r")
    mask = group["0"][:]
    assert set(np.unique(mask)) == {0, 1}
    assert np.array_equal(mask, (ref == CLASSES.index("glow")).astype(np.uint8))
    proba = group["probabilities"][:].astype(np.float32)
    assert group["probabilities"].dtype == np.float16 and proba.shape == (4, 70, 120)
    assert np.allclose(proba, ref_proba, atol=2e-3)
    unc = group["uncertainty"][:]
    assert unc.dtype == np.float16 and 0 <= unc.min() and unc.max() <= 1 and unc.std() > 0
    summary = json.loads((out / "small.json").read_text())
    assert summary["class_names"] == ["not glow", "glow"] and summary["only_class"] == "glow"
    assert summary["pixel_counts"]["glow"] == int(mask.sum()) and summary["settings"]["tta"]


def test_gigaseg_cli_registers_segment() -> None:
    from segcore.cli import build_parser

    args = build_parser().parse_args(["segment", "--model", "m", "--input", "a.tif", "b.fits", "--output", "o",
                                      "--only-class", "cluster", "--tta"])
    assert args.func.__module__ == "pipelines.segment" and args.input == ["a.tif", "b.fits"] and args.tta


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    from pipelines.segment import main

    model = make_model(tmp_path / "model")
    assert main(["--model", str(tmp_path / "nope"), "--input", "x.tif", "--output", str(tmp_path / "o")]) == 2
    assert main(["--model", str(model), "--input", str(tmp_path / "none*.tif"), "--output", str(tmp_path / "o")]) == 2
    assert main(["--model", str(model), "--input", "x.tif", "--output", str(tmp_path / "o"),
                 "--only-class", "quartz"]) == 2


def test_halo_default_comes_from_the_model_card(tmp_path: Path) -> None:
    from pipelines.options import default_halo, load_for_run

    plain, _ = load_for_run(str(make_model(tmp_path / "a")), tracking_uri="unused-for-a-directory")
    measured, info = load_for_run(str(make_model(tmp_path / "b", extra={"halo": 48})), "unused-for-a-directory")
    assert default_halo(plain) == 4 * STRIDE and default_halo(measured) == 48
    assert info.stride == STRIDE and info.class_names == CLASSES and len(info.class_colors) == 4
