"""Output building blocks on real files: the OME-Zarr label store and its mode pyramid, the
preview PNG, the label FITS and the cluster catalogue."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import zarr
from astropy.io import fits
from PIL import Image

from pipelines import omezarr
from pipelines.fitsout import cluster_rows, provenance, write_catalog, write_labels_fits
from pipelines.preview import compose_preview, save_preview


def test_mode_downsample_majority_and_ties() -> None:
    block = np.array([[1, 1, 2, 3],
                      [1, 2, 4, 5],
                      [7, 8, 6, 6]], dtype=np.uint8)
    out = omezarr.mode_downsample(block)
    # 1 wins 3:1; all-different ties go to the top-left (2); odd last row is repeated (7 7 8 8 -> 7)
    assert out.tolist() == [[1, 2], [7, 6]]


def test_pyramid_counts_and_metadata(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 4, (300, 470)).astype(np.uint8)
    group = tmp_path / "x.zarr"
    omezarr.create_image_group(group, labels.shape, 64, 4, probabilities=False, uncertainty=False)
    arr = zarr.open_array(str(group / "0"), mode="r+")
    labels[:5, :7] = omezarr.NODATA  # NaN/inf input pixels: counted apart, last
    arr[:] = labels
    shapes, counts = omezarr.build_pyramid(group, 64, 4)
    assert shapes == [(300, 470), (150, 235), (75, 118), (38, 59)]
    assert counts.tolist() == [*np.bincount(labels.ravel(), minlength=4)[:4].tolist(), 35]
    level1 = zarr.open_array(str(group / "1"), mode="r")[:]
    assert np.array_equal(level1, omezarr.mode_downsample(labels))
    omezarr.write_metadata(group, "x", len(shapes), ["a", "b", "c", "d"], [(0, 0, 0)] * 4, {"model": "m"})
    attrs = zarr.open_group(str(group), mode="r").attrs.asdict()
    ms = attrs["ome"]["multiscales"][0]
    assert attrs["ome"]["version"] == "0.5" and [d["path"] for d in ms["datasets"]] == ["0", "1", "2", "3"]
    assert ms["datasets"][2]["coordinateTransformations"][0]["scale"] == [4.0, 4.0]
    assert attrs["ome"]["image-label"]["properties"][3] == {"label-value": 3, "class": "d"}
    assert omezarr.preview_level(group, 200).shape == (75, 118)


def test_preview_fits_2048_with_legend(tmp_path: Path) -> None:
    panels = [("AMP1", np.zeros((900, 1500), np.uint8)), ("AMP2", np.ones((900, 1500), np.uint8))]
    img = compose_preview(panels, ["bg", "glow"], [(0, 0, 0), (255, 0, 0)], [0.5, 0.5])
    assert max(img.size) <= 2048
    save_preview(tmp_path / "p.png", img)
    rgb = np.asarray(Image.open(tmp_path / "p.png"))
    assert (rgb == [255, 0, 0]).all(-1).sum() > 500_000  # the red panel is there
    assert not (tmp_path / "p.png.tmp").exists()


def test_cluster_catalogue_against_known_blobs(tmp_path: Path) -> None:
    adu = np.full((60, 80), 100.0) + np.random.default_rng(1).normal(0, 0.01, (60, 80))
    labels = np.zeros((60, 80), np.uint8)
    labels[10:13, 20:24] = 3  # 12 px, +50 ADU each
    adu[10:13, 20:24] += 50
    labels[40, 60] = labels[41, 61] = 3  # diagonal neighbours: one 8-connected cluster
    adu[40, 60] += 10
    adu[41, 61] += 30
    rows = cluster_rows("AMP1", labels, adu, 3)
    assert len(rows) == 2
    a, b = sorted(rows, key=lambda r: r["npix"], reverse=True)
    assert a["npix"] == 12 and abs(a["adu_sum"] - 600) < 1 and abs(a["background"] - 100) < 0.1
    assert (a["y0"], a["y1"], a["x0"], a["x1"]) == (10, 13, 20, 24) and a["x"] == 21.5 and a["y"] == 11.0
    assert b["npix"] == 2 and abs(b["adu_sum"] - 40) < 0.5 and abs(b["x_weighted"] - 60.75) < 0.01
    cards = provenance("models:/ccd/3", ["background", "glow", "hot", "cluster"], None)
    write_catalog(tmp_path / "c.fits", tmp_path / "c.csv", rows, cards)
    with fits.open(tmp_path / "c.fits") as hdul:
        assert hdul["CLUSTERS"].header["GSMODEL"] == "models:/ccd/3"
        assert sorted(hdul["CLUSTERS"].data["npix"].tolist()) == [2, 12]
    with (tmp_path / "c.csv").open() as f:
        assert [r["hdu"] for r in csv.DictReader(f)] == ["AMP1", "AMP1"]


def test_labels_fits_keeps_headers_and_extnames(tmp_path: Path) -> None:
    src = tmp_path / "in.fits"
    amp = fits.ImageHDU(np.zeros((8, 9), np.uint16), name="AMP1")
    amp.header["PEDESTAL"] = 1000.0
    primary = fits.PrimaryHDU()
    primary.header["OBSERVER"] = "ccd-lab"
    fits.HDUList([primary, amp]).writeto(src)
    labels = np.arange(72, dtype=np.uint8).reshape(8, 9) % 4
    write_labels_fits(tmp_path / "out.fits", str(src), [(1, "AMP1", labels)], provenance("m", ["a", "b"], None))
    with fits.open(tmp_path / "out.fits") as hdul:
        assert hdul[0].header["OBSERVER"] == "ccd-lab" and hdul[0].header["GSMODEL"] == "m"
        out = hdul["AMP1"]
        assert out.header["PEDESTAL"] == 1000.0 and out.header["GSCLS1"] == "b" and "BZERO" not in out.header
        assert out.data.dtype == np.uint8 and np.array_equal(out.data, labels)


def test_provenance_cards_fit_without_astropy_cutting_them(tmp_path: Path) -> None:
    """A model path long enough to crowd its comment off the card gets no comment (astropy would warn
    once per file and cut it); a short one keeps it; a very long one continues on CONTINUE cards."""
    import warnings

    for ref in ["/tmp/m", "/data/models/gigaseg/sem-4class/unet-resnet18-e3", "/x" * 60]:
        header = fits.Header()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for key, value, comment in provenance(ref, ["pore", "quartz"], None):
                header[key] = (value, comment)
            fits.PrimaryHDU(header=header).writeto(tmp_path / "p.fits", overwrite=True)
        with fits.open(tmp_path / "p.fits") as hdul:
            assert hdul[0].header["GSMODEL"] == ref
            assert (hdul[0].header.comments["GSMODEL"] == "gigaseg model reference") == (len(ref) < 40 or len(ref) > 68)
