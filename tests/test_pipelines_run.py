"""The whole Ray Data job on a 2-CPU local Ray with real files: a tiled 8-bit TIFF, a striped
16-bit TIFF and a multi-HDU FITS with BZERO next to a corrupt TIFF and a truncated FITS.
Labels equal whole-image prediction; outputs (OME-Zarr, PNG, JSON, label FITS, catalogue)
are complete; broken files are recorded as failed while the others finish; a rerun skips."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from astropy.io import fits
from PIL import Image
from pipelines_helpers import (
    CLASSES,
    HALO,
    TILE,
    make_model,
    reference_labels,
    write_corrupt_tiff,
    write_fits_bzero,
    write_striped_tiff16,
    write_tiled_tiff8,
    write_truncated_fits,
)

from pipelines.finalize import finalize_file
from pipelines.options import ModelInfo
from pipelines.plan import ImagePlan
from pipelines.runner import RunConfig, segment_archive
from segcore.data.normalize import NormStats, compute_norm_stats
from segcore.modelio.ref import load_model

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("archive")
    (root / "sem").mkdir()
    (root / "ccd").mkdir()
    images = {
        "rock8": write_tiled_tiff8(root / "sem" / "rock8.tif", (150, 200)),
        "rock16": write_striped_tiff16(root / "sem" / "rock16.tif", (130, 170)),
    }
    amps = write_fits_bzero(root / "ccd" / "frame.fits", (100, 140), n_hdus=2)
    write_corrupt_tiff(root / "sem" / "broken.tif")
    write_truncated_fits(root / "ccd" / "cut.fits", (100, 140))
    return {"root": root, "model": make_model(root / "model"), "images": images, "amps": amps}


@pytest.fixture(scope="module")
def run(archive: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from conftest import ensure_ray

    ensure_ray(num_cpus=2, num_gpus=0)
    root, out = archive["root"], tmp_path_factory.mktemp("out")
    report = segment_archive(str(archive["model"]), [f"{root}/sem/*.tif", f"{root}/**/*.fits"], out,
                             RunConfig(progress_bars=False), tile=TILE, halo=HALO, batch_size=4)
    return {"out": out, "report": report}


def _stats(out: Path, stem: str, image: str = "image") -> NormStats:
    plan = ImagePlan.load(out / ".gigaseg" / stem / image)
    return NormStats(plan.norm_offset, plan.norm_scale)


def test_broken_files_fail_and_others_finish(archive: dict, run: dict) -> None:
    report, out = run["report"], run["out"]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    status = {Path(e["input"]).name: e["status"] for e in manifest}
    assert status == {"rock8.tif": "done", "rock16.tif": "done", "frame.fits": "done",
                      "broken.tif": "failed", "cut.fits": "failed"}
    errors = {Path(e["input"]).name: e["error"] for e in manifest if e["status"] == "failed"}
    assert "broken.tif" in errors["broken.tif"] and "TIFF" in errors["broken.tif"]
    assert "cut.fits" in errors["cut.fits"] and "truncated" in errors["cut.fits"]
    assert len(report.done) == 3 and len(report.failed) == 2
    assert report.workers and all(w["rss_mb"] > 0 for w in report.workers)


@pytest.mark.parametrize("stem", ["rock8", "rock16"])
def test_tiff_labels_equal_whole_image_prediction(archive: dict, run: dict, stem: str) -> None:
    out, image = run["out"], archive["images"][stem]
    labels = zarr.open_array(str(out / f"{stem}.zarr" / "0"), mode="r")[:]  # the README one-liner
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert np.array_equal(labels, reference_labels(archive["model"], image, _stats(out, stem)))
    assert len(np.unique(labels)) > 1


def test_norm_stats_come_from_the_model_config_and_a_sample(archive: dict, run: dict) -> None:
    from segcore.modelio.ref import read_card

    cfg = read_card(archive["model"]).train.normalize
    image = archive["images"]["rock16"]  # small: the sample is the whole image
    assert _stats(run["out"], "rock16") == compute_norm_stats(image, cfg)


def test_striped_tiff_is_read_band_by_band(run: dict) -> None:
    plan = ImagePlan.load(run["out"] / ".gigaseg" / "rock16" / "image")
    assert plan.slow and plan.unit_cols == 3  # a whole row of 3 windows per unit = one band read
    assert any("slow random access" in w for w in plan.warnings)
    summary = json.loads((run["out"] / "rock16.json").read_text())
    assert any("slow random access" in w for w in summary["images"][0]["warnings"])


def test_fits_hdus_labels_fits_and_catalogue(archive: dict, run: dict) -> None:
    out = run["out"]
    labels_fits = out / "frame.labels.fits"
    with fits.open(labels_fits) as hdul:
        assert [h.name for h in hdul[1:]] == ["AMP1", "AMP2"]
        for k, amp in enumerate(archive["amps"]):
            hdu = hdul[f"AMP{k + 1}"]
            zarr_labels = zarr.open_array(str(out / "frame.zarr" / f"AMP{k + 1}" / "0"), mode="r")[:]
            assert np.array_equal(hdu.data, zarr_labels)
            ref = reference_labels(archive["model"], amp, _stats(out, "frame", f"AMP{k + 1}"))
            assert np.array_equal(zarr_labels, ref)
            assert hdu.header["PEDESTAL"] == 1000.0 and hdu.header["GSMODEL"] == str(archive["model"])
            assert hdu.header["GSCLS3"] == "cluster" and "GSDATE" in hdu.header and "GSVERS" in hdu.header
    with (out / "frame.clusters.csv").open() as f:
        rows = list(csv.DictReader(f))
    with fits.open(out / "frame.clusters.fits") as hdul:
        assert len(hdul["CLUSTERS"].data) == len(rows) > 0
    with fits.open(labels_fits) as hdul:
        for amp in ("AMP1", "AMP2"):
            n_cluster_px = int((hdul[amp].data == CLASSES.index("cluster")).sum())
            assert sum(int(r["npix"]) for r in rows if r["hdu"] == amp) == n_cluster_px


def test_fits_products_follow_the_input_hdu_order(archive: dict, run: dict) -> None:
    """Finishing in any order (here AMP2's state first) writes the labels FITS and the summary in
    the input's HDU order: a 4-HDU demo frame had come out as AMP2, AMP1, AMP3, AMP4."""
    out = run["out"]
    states = sorted((out / ".gigaseg" / "frame").iterdir(), reverse=True)
    assert [s.name for s in states] == ["AMP2", "AMP1"]
    settings = json.loads((states[0] / "plan.json").read_text())["settings"]
    opts = {k: v for k, v in settings.items() if k != "model_digest"}
    info = ModelInfo.from_loaded(load_model(opts["model"], device="cpu"), opts["model"])
    finalize_file([str(s) for s in states], opts, info.model_dump(mode="json"), str(out), 1.0)
    with fits.open(out / "frame.labels.fits") as hdul:
        assert [h.name for h in hdul[1:]] == ["AMP1", "AMP2"]
    assert [im["name"] for im in json.loads((out / "frame.json").read_text())["images"]] == ["AMP1", "AMP2"]


def test_ome_zarr_pyramid_preview_and_summary(archive: dict, run: dict) -> None:
    out = run["out"]
    for group_path, shape in [(out / "rock8.zarr", (150, 200)), (out / "frame.zarr" / "AMP2", (100, 140))]:
        group = zarr.open_group(str(group_path), mode="r")
        ms = group.attrs["ome"]["multiscales"][0]
        levels = [group[d["path"]] for d in ms["datasets"]]
        assert levels[0].shape == shape and levels[-1].shape[0] <= TILE and levels[0].chunks == (TILE, TILE)
        assert group.attrs["ome"]["image-label"]["properties"][3]["class"] == "cluster"
        assert group.attrs["gigaseg"]["status"] == "complete"
    summary = json.loads((out / "rock8.json").read_text())
    assert summary["class_names"] == CLASSES and summary["model"] == str(archive["model"])
    assert sum(summary["pixel_counts"].values()) == 150 * 200
    assert abs(sum(summary["area_fractions"].values()) - 1) < 1e-9
    assert summary["timings"]["predict_s"] > 0 and summary["images"][0]["windows"] == 12
    labels = zarr.open_array(str(out / "rock8.zarr" / "0"), mode="r")[:]
    assert summary["pixel_counts"]["cluster"] == int((labels == 3).sum())
    frame = json.loads((out / "frame.json").read_text())
    assert [im["name"] for im in frame["images"]] == ["AMP1", "AMP2"]
    assert sum(frame["pixel_counts"].values()) == 2 * 100 * 140
    for stem in ("rock8", "rock16", "frame"):
        with Image.open(out / f"{stem}.png") as png:
            assert max(png.size) <= 2048 and png.mode == "RGB"


def test_rerun_skips_done_inputs_and_retries_failed(archive: dict, run: dict) -> None:
    out, root = run["out"], archive["root"]
    before = (out / "rock8.zarr" / "0" / "c" / "0" / "0").stat().st_mtime_ns
    report = segment_archive(str(archive["model"]), [f"{root}/sem/*.tif", f"{root}/**/*.fits"], out,
                             RunConfig(progress_bars=False), tile=TILE, halo=HALO, batch_size=4)
    assert len(report.skipped) == 3 and sorted(Path(f).name for f in report.failed) == ["broken.tif", "cut.fits"]
    assert (out / "rock8.zarr" / "0" / "c" / "0" / "0").stat().st_mtime_ns == before


def test_ome_zarr_reader_opens_labels(run: dict) -> None:
    """napari-ome-zarr reads through ome-zarr-py; skipped where that package is not installed."""
    reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    for path in (run["out"] / "rock8.zarr", run["out"] / "frame.zarr" / "AMP1"):
        location = parse_url(str(path))
        assert location is not None and location.version == "0.5"
        (node,) = list(reader.Reader(location)())
        assert {type(s).__name__ for s in node.specs} >= {"Label", "Multiscales"}
        level0 = zarr.open_array(str(path / "0"), mode="r")[:]
        assert np.array_equal(node.data[0].compute(), level0) and len(node.metadata["color"]) == len(CLASSES)


def test_registered_model_uri_reaches_actors_through_the_explicit_tracking_uri(
        archive: dict, run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``models:/name@champion`` from a store that neither the driver's nor the actors'
    environment points at: only the ``tracking_uri`` passed with the options finds it."""
    import mlflow

    from segcore.mlflow_model import log_model_dir
    from segcore.tracking import setup_mlflow

    monkeypatch.setenv("GIGASEG_HOME", str(tmp_path / "registry-home"))
    uri = setup_mlflow("registry", f"sqlite:///{tmp_path / 'registry-home' / 'mlflow.db'}")
    with mlflow.start_run():
        log_model_dir(archive["model"], registered_model_name="rock")
    mlflow.MlflowClient(uri).set_registered_model_alias("rock", "champion", "1")
    monkeypatch.setenv("GIGASEG_HOME", str(tmp_path / "elsewhere"))  # the default store is now empty
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)

    out = tmp_path / "out"
    report = segment_archive("models:/rock@champion", [str(archive["root"] / "sem" / "rock8.tif")], out,
                             RunConfig(progress_bars=False), tile=TILE, halo=HALO, batch_size=4, tracking_uri=uri)
    assert len(report.done) == 1, report.failed
    assert json.loads((out / "rock8.json").read_text())["model"] == "models:/rock/1"  # pinned on the driver
    labels = zarr.open_array(str(out / "rock8.zarr" / "0"), mode="r")[:]
    assert np.array_equal(labels, zarr.open_array(str(run["out"] / "rock8.zarr" / "0"), mode="r")[:])


def test_local_executor_writes_the_ray_jobs_bytes(archive: dict, run: dict, tmp_path: Path) -> None:
    """``--executor local`` (in this process, no Ray) runs the same units and finishing step: every
    label array, preview, labels FITS and catalogue equals the Ray job's byte for byte, and the
    broken files fail the same way."""
    from pipelines_helpers import tree_digest

    root, out = archive["root"], tmp_path / "local"
    report = segment_archive(str(archive["model"]), [f"{root}/sem/*.tif", f"{root}/**/*.fits"], out,
                             RunConfig(executor="local", progress_bars=False), tile=TILE, halo=HALO, batch_size=4)
    assert report.pool["executor"] == "local" and report.pool["size"] >= 1
    assert sorted(Path(f).name for f in report.failed) == ["broken.tif", "cut.fits"] and len(report.done) == 3
    skip = (".json", "manifest", "lock", "done.jsonl", ".fits")  # timings, run ids; FITS: GSDATE below
    ray_tree = {k: v for k, v in tree_digest(run["out"], skip).items() if not k.startswith(".gigaseg")}
    local_tree = {k: v for k, v in tree_digest(out, skip).items() if not k.startswith(".gigaseg")}
    assert any(k.endswith(".png") for k in local_tree) and any(".zarr/" in k for k in local_tree)
    assert local_tree == ray_tree
    for name in ("frame.labels.fits", "frame.clusters.fits"):
        with fits.open(out / name) as mine, fits.open(run["out"] / name) as theirs:
            assert [h.name for h in mine] == [h.name for h in theirs]
            for a, b in zip(mine, theirs, strict=True):
                assert (a.data is None and b.data is None) or np.array_equal(a.data, b.data)
                assert {k: v for k, v in a.header.items() if k != "GSDATE"} == \
                    {k: v for k, v in b.header.items() if k != "GSDATE"}


def test_whole_row_strips_give_the_whole_image_labels(archive: dict, tmp_path: Path) -> None:
    """With a pixel budget per model call (``call_px``, set with a chosen tile), a row's windows
    form one unit predicted as one strip; the labels still equal the whole-image prediction."""
    image, out = archive["images"]["rock8"], tmp_path / "strips"
    tif = archive["root"] / "sem" / "rock8.tif"
    report = segment_archive(str(archive["model"]), [str(tif)], out, RunConfig(executor="local", progress_bars=False),
                             tile=TILE, halo=HALO, batch_size=1, call_px=(TILE + 2 * HALO) * image.shape[1])
    assert len(report.done) == 1
    plan = ImagePlan.load(out / ".gigaseg" / "rock8" / "image")
    assert plan.unit_cols == 4 and len(plan.units) == 3  # 150 x 200 at tile 64: 3 rows of 4 windows
    labels = zarr.open_array(str(out / "rock8.zarr" / "0"), mode="r")[:]
    assert np.array_equal(labels, reference_labels(archive["model"], image, _stats(out, "rock8")))


def test_an_image_that_fits_one_call_is_one_window(archive: dict, tmp_path: Path) -> None:
    """An image larger than the tile but within one model call's pixel budget is predicted whole:
    one window the size of the image (no halo at all), labels equal to the whole-image forward."""
    image, out = archive["images"]["rock8"], tmp_path / "whole"
    tif = archive["root"] / "sem" / "rock8.tif"
    report = segment_archive(str(archive["model"]), [str(tif)], out, RunConfig(executor="local", progress_bars=False),
                             tile=TILE, halo=HALO, batch_size=1, call_px=152 * 200)
    assert len(report.done) == 1 and report.windows == 1
    plan = ImagePlan.load(out / ".gigaseg" / "rock8" / "image")
    assert plan.tile == 200 and plan.units == [(0, 0, 1)]  # 150 x 200, size multiple 4
    labels = zarr.open_array(str(out / "rock8.zarr" / "0"), mode="r")[:]
    assert np.array_equal(labels, reference_labels(archive["model"], image, _stats(out, "rock8")))
