"""Training (segcore.data.io.read_image) and segment (segcore.readers / pipelines.readers) read the
same arrays, in the same dtypes, from the same real files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from PIL import Image

from pipelines.readers import open_sources as pipeline_open_sources
from segcore.data import DataError, read_image
from segcore.readers import open_sources


def _segment_arrays(path) -> list[np.ndarray]:
    sources = pipeline_open_sources(path)
    try:
        return [s.read(slice(0, s.shape[0]), slice(0, s.shape[1])) for s in sources]
    finally:
        for s in sources:
            s.close()


def _assert_same(path, expected_dtype) -> None:
    train = [raw.array for raw in read_image(path)]
    segment = _segment_arrays(path)
    assert len(train) == len(segment)
    for a, b in zip(train, segment):
        assert a.dtype == b.dtype == np.dtype(expected_dtype)
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def _ramp(h: int, w: int, dtype) -> np.ndarray:
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) * 37 % 60000).astype(dtype)


def test_png_8_and_16_bit_and_rgb(tmp_path):
    Image.fromarray(_ramp(40, 50, np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray(_ramp(40, 50, np.uint16)).save(tmp_path / "g16.png")
    rgb = np.stack([_ramp(40, 50, np.uint8)] * 3, -1)
    rgb[..., 1] //= 2
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    _assert_same(tmp_path / "g8.png", np.uint8)
    _assert_same(tmp_path / "g16.png", np.uint16)  # uint16 on both paths, never int32
    _assert_same(tmp_path / "rgb.png", np.uint8)
    assert read_image(tmp_path / "rgb.png")[0].array.shape == (40, 50, 3)


def test_tiff_tiled_striped_rgb(tmp_path):
    image = _ramp(70, 90, np.uint16)
    tifffile.imwrite(tmp_path / "tiled.tif", image, tile=(32, 32))
    tifffile.imwrite(tmp_path / "striped.tif", image)
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([_ramp(70, 90, np.uint8)] * 3, -1), photometric="rgb")
    _assert_same(tmp_path / "tiled.tif", np.uint16)
    _assert_same(tmp_path / "striped.tif", np.uint16)
    _assert_same(tmp_path / "rgb.tif", np.uint8)


def test_fits_unsigned_multi_hdu_and_cube(tmp_path):
    raw = _ramp(30, 40, np.uint16)
    primary = fits.PrimaryHDU()
    amp1 = fits.ImageHDU((raw.astype(np.int32) - 32768).astype(np.int16), name="AMP1")
    amp1.header["BZERO"] = 32768
    amp2 = fits.ImageHDU(raw.astype(np.float32) / 7, name="AMP2")
    fits.HDUList([primary, amp1, amp2]).writeto(tmp_path / "mef.fits")
    train = read_image(tmp_path / "mef.fits")
    assert [r.name for r in train] == ["mef_AMP1", "mef_AMP2"]
    np.testing.assert_array_equal(train[0].array, raw)
    _assert_same_fits(tmp_path / "mef.fits", [np.uint16, np.float32])

    cube = np.stack([_ramp(30, 40, np.int16), _ramp(30, 40, np.int16) // 3, _ramp(30, 40, np.int16) // 5])
    fits.PrimaryHDU(cube).writeto(tmp_path / "cube.fits")
    _assert_same(tmp_path / "cube.fits", np.int16)  # (C, H, W) cube -> (H, W, C) on both paths
    assert read_image(tmp_path / "cube.fits")[0].array.shape == (30, 40, 3)


def _assert_same_fits(path, dtypes) -> None:
    train = [raw.array for raw in read_image(path)]
    segment = _segment_arrays(path)
    for a, b, dtype in zip(train, segment, dtypes, strict=True):
        assert a.dtype == b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a, b)


def test_fits_stack_refused_on_both_paths(tmp_path):
    fits.PrimaryHDU(np.zeros((6, 20, 20), np.int16)).writeto(tmp_path / "stack.fits")
    with pytest.raises(DataError, match="cube of 6 planes"):
        read_image(tmp_path / "stack.fits")
    with pytest.raises(DataError, match="cube of 6 planes"):
        open_sources(tmp_path / "stack.fits")


def test_palette_mask_keeps_indices(tmp_path):
    ids = (np.arange(20 * 30).reshape(20, 30) % 4).astype(np.uint8)
    im = Image.fromarray(ids, mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    im.save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_image(tmp_path / "m.png", palette_indices=True)[0].array, ids)
    assert read_image(tmp_path / "m.png")[0].array.shape == (20, 30, 3)
