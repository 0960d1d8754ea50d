"""Lazy readers on real files: TIFF (tiled 8-bit, striped 16-bit), FITS (BZERO, multi-HDU,
tile-compressed), PNG, zarr / OME-Zarr; broken files give errors naming the file. Also the
input expansion, output stems and the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from astropy.io import fits
from PIL import Image
from pipelines_helpers import (
    write_corrupt_tiff,
    write_fits_bzero,
    write_striped_tiff16,
    write_tiled_tiff8,
    write_truncated_fits,
)

from pipelines.layout import Manifest, assign_stems, expand_inputs
from segcore.data.errors import DataError
from segcore.readers import open_source, open_sources, reader_name

R, C = slice(13, 41), slice(7, 50)


def test_tiled_tiff8_reads_regions(tmp_path: Path) -> None:
    img = write_tiled_tiff8(tmp_path / "a.tif", (100, 130))
    (src,) = open_sources(tmp_path / "a.tif")
    assert (src.shape, src.dtype, src.channels, src.slow_random_access) == ((100, 130), np.uint8, 1, False)
    assert np.array_equal(src.read(R, C), img[R, C])
    sample = src.sample(max_pixels=1000)
    assert 0 < sample.size <= 100 * 130 and np.array_equal(sample, src.sample(max_pixels=1000))
    with pytest.raises(IndexError):
        src.read(slice(90, 101), C)


def test_striped_tiff16_is_flagged_slow(tmp_path: Path) -> None:
    img = write_striped_tiff16(tmp_path / "s.tif", (90, 75))
    (src,) = open_sources(tmp_path / "s.tif")
    assert src.dtype == np.uint16 and src.slow_random_access and src.block_rows == 8
    assert np.array_equal(src.read(slice(3, 50), slice(0, 75)), img[3:50])


def test_fits_bzero_multi_hdu_exact_native(tmp_path: Path) -> None:
    data = write_fits_bzero(tmp_path / "f.fits", (40, 60), n_hdus=3)
    with fits.open(tmp_path / "f.fits") as hdul:  # astropy really stored int16 + BZERO
        assert hdul[1].header["BITPIX"] == 16 and hdul[1].header["BZERO"] == 32768
    sources = open_sources(tmp_path / "f.fits")
    assert [s.name for s in sources] == ["AMP1", "AMP2", "AMP3"] and [s.index for s in sources] == [1, 2, 3]
    for s, d in zip(sources, data, strict=True):
        block = s.read(slice(5, 30), slice(10, 50))
        assert block.dtype == np.uint16 and block.dtype.isnative
        assert np.array_equal(block, d[5:30, 10:50])
        assert s.header["PEDESTAL"] == 1000.0
    assert np.array_equal(open_source(tmp_path / "f.fits", 2).read(slice(13, 15), slice(0, 60)), data[1][13:15])


def test_fits_scaled_and_compressed(tmp_path: Path) -> None:
    raw = np.arange(50 * 70, dtype=np.int16).reshape(50, 70)
    scaled = fits.ImageHDU(raw, name="SCALED", do_not_scale_image_data=True)
    scaled.header["BSCALE"], scaled.header["BZERO"] = 0.5, 100.0
    comp = fits.CompImageHDU(raw.astype(np.uint16) * 3, name="COMP")
    fits.HDUList([fits.PrimaryHDU(raw.astype(np.float32)), scaled, comp]).writeto(tmp_path / "m.fits")
    prim, sc, cp = open_sources(tmp_path / "m.fits")
    assert prim.name == "PRIMARY" and prim.dtype == np.float32
    assert np.allclose(sc.read(R, C), raw[R, C] * 0.5 + 100.0)
    assert cp.dtype == np.uint16 and cp.slow_random_access
    assert np.array_equal(cp.read(R, C), (raw.astype(np.uint16) * 3)[R, C])


def test_broken_files_name_the_file(tmp_path: Path) -> None:
    write_corrupt_tiff(tmp_path / "bad.tif")
    write_truncated_fits(tmp_path / "cut.fits", (40, 60))
    (tmp_path / "notes.txt").write_text("x")
    for name, words in [("bad.tif", "TIFF"), ("cut.fits", "truncated"), ("notes.txt", "unsupported")]:
        with pytest.raises(DataError) as err:
            open_sources(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and words in str(err.value)


def test_png_and_zarr(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "p.png")
    (png,) = open_sources(tmp_path / "p.png")
    assert png.channels == 3 and np.array_equal(png.read(slice(2, 9), slice(5, 30)), rgb[2:9, 5:30])
    arr = np.arange(50 * 60, dtype=np.uint16).reshape(50, 60)
    zarr.create_array(str(tmp_path / "plain.zarr"), data=arr, chunks=(16, 16))
    group = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    group.create_array("0", data=arr[None, None], chunks=(1, 1, 16, 16))
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}
    for name in ("plain.zarr", "ome.zarr"):
        (src,) = open_sources(tmp_path / name)
        assert src.shape == (50, 60) and np.array_equal(src.read(R, slice(7, 60)), arr[R, 7:])


def test_expand_inputs_stems_and_manifest(tmp_path: Path) -> None:
    for rel in ("a/x.tif", "b/x.tif", "b/deep/y.fits", "b/z.zarr/0/c/0", "b/readme.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "b" / "z.zarr" / "zarr.json").write_text("{}")
    found = expand_inputs([str(tmp_path / "**" / "*"), str(tmp_path / "a" / "x.tif")], exclude=tmp_path / "b" / "deep")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/x.tif", "b/x.tif", "b/z.zarr"]
    assert [p.relative_to(tmp_path).as_posix() for p in expand_inputs([str(tmp_path / "b")])] == [
        "b/deep/y.fits", "b/x.tif", "b/z.zarr"]  # a plain directory means everything below it
    assert reader_name("frame.fits.fz") == "fits" and reader_name("x.TIFF") == "tiff"
    stems = assign_stems(found)
    assert sorted(stems.values()) == ["a__x", "b__x", "z"]
    manifest = Manifest(tmp_path / "m.jsonl")
    manifest.append({"input": "1", "status": "failed"})
    with manifest.path.open("a") as f:
        f.write('{"input": "2", "sta')  # a killed writer's half line
    manifest.append({"input": "1", "status": "done"})
    assert {k: v["status"] for k, v in manifest.load().items()} == {"1": "done"}
