"""Training (segcore.data.io.read_image) and segment (segcore.readers) read the
same arrays, in the same dtypes, from the same real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from PIL import Image

from segcore.data import DataError, read_image
from segcore.readers import open_sources
from segcore.readers import open_sources as pipeline_open_sources


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


def test_scaled_source_reads_block_means(tmp_path):
    from segcore.readers.scaled import ScaledSource, upsample_write

    image = _ramp(100, 130, np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", image, tile=(32, 32))
    (source,) = open_sources(tmp_path / "s.tif")
    view = ScaledSource(source, 4)
    assert view.shape == (25, 32) and view.dtype == np.uint16  # dtype and sample stay the input's
    expected = image[:100, :128].astype(np.float64).reshape(25, 4, 32, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(view.read(slice(3, 20), slice(5, 32)), expected[3:20, 5:32])
    np.testing.assert_array_equal(view.sample(), source.sample())
    labels = np.arange(6, dtype=np.uint8).reshape(2, 3)
    where, values = upsample_write((slice(23, 25), slice(29, 32)), labels, 4, (25, 32), (100, 130))
    assert where == (slice(92, 100), slice(116, 130)) and values.shape == (8, 14)
    assert (values[:, 12:] == values[:, 11:12]).all()  # px beyond the last whole model px: nearest


@pytest.mark.ray
def test_segment_at_model_scale_writes_input_resolution(tmp_path, ray_local):
    import torch
    import zarr
    from pipelines_helpers import HALO, TILE, make_model, reference_labels

    from pipelines.runner import RunConfig, segment_archive
    from segcore.data.normalize import compute_norm_stats
    from segcore.modelio.card import CONFIG_FILE

    image = (np.add.outer(np.arange(256) // 9 % 5, np.arange(322) // 13 % 3) * 40
             + np.random.default_rng(0).integers(0, 30, (256, 322))).astype(np.uint8)
    tifffile.imwrite(tmp_path / "scan.tif", image, tile=(64, 64))
    model = make_model(tmp_path / "model")
    card = json.loads((model / CONFIG_FILE).read_text())
    card["train"]["data"]["scale"] = 4
    (model / CONFIG_FILE).write_text(json.dumps(card))
    torch.set_num_threads(1)
    segment_archive(str(model), [str(tmp_path / "scan.tif")], tmp_path / "out", RunConfig(progress_bars=False),
                    tile=TILE, halo=HALO, batch_size=4)
    group = zarr.open_group(str(tmp_path / "out" / "scan.zarr"), mode="r")
    labels = group["0"][:]
    assert labels.shape == (256, 322)  # the input's grid, though the model saw 64 x 80 px
    coarse = image[:256, :320].astype(np.float64).reshape(64, 4, 80, 4).mean(axis=(1, 3))
    from segcore.config import NormalizeConfig

    stats = compute_norm_stats(image, NormalizeConfig(mode="percentile", low_percentile=1, high_percentile=99))
    expected = np.repeat(np.repeat(reference_labels(model, coarse, stats), 4, 0), 4, 1)
    np.testing.assert_array_equal(labels[:, :320], expected)
    np.testing.assert_array_equal(labels[:, 320:], np.repeat(expected[:, -1:], 2, 1))
    ome = dict(group.attrs)["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert ome[0]["scale"] == [1.0, 1.0]
    assert dict(group.attrs)["gigaseg"]["model_scale"] == 4
    segment_archive(str(model), [str(tmp_path / "scan.tif")], tmp_path / "out-model", RunConfig(progress_bars=False),
                    tile=TILE, halo=HALO, batch_size=4, labels_at="model")
    group = zarr.open_group(str(tmp_path / "out-model" / "scan.zarr"), mode="r")
    np.testing.assert_array_equal(group["0"][:], expected[::4, ::4])  # --labels-at model: one px per model px
    ome = dict(group.attrs)["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert ome[0]["scale"] == [4.0, 4.0]


def _block_mean(image: np.ndarray, f: int) -> np.ndarray:
    h, w = image.shape[0] // f * f, image.shape[1] // f * f
    return image[:h, :w].astype(np.float64).reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _pyramid_tiff(path, image: np.ndarray, factors=(2, 4), tile=(32, 32)) -> list[np.ndarray]:
    """``image`` with SubIFD levels of ``factors`` holding its rounded block means (floor sizes)."""
    levels = [np.round(_block_mean(image, f)).astype(image.dtype) for f in factors]
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=tile, subifds=len(factors), photometric="minisblack")
        for level in levels:
            tif.write(level, tile=tile, subfiletype=1, photometric="minisblack")
    return levels


@pytest.mark.parametrize("kind", ["tiled", "striped", "zlib", "rgb", "sparse"])
def test_tiff_chunk_reads_equal_tifffile(tmp_path, kind):
    """TIFFs are read chunk by chunk (no zarr): every window equals tifffile's whole-image read."""
    image = _ramp(150, 170, np.uint16)
    opts = {"tiled": {"tile": (32, 48)}, "striped": {"rowsperstrip": 7}, "rgb": {"tile": (32, 32)},
            "zlib": {"tile": (64, 64), "compression": "zlib"}, "sparse": {"tile": (32, 32)}}[kind]
    if kind == "rgb":
        image = np.stack([image % 256, image // 256, image % 97], -1).astype(np.uint8)
        opts["photometric"] = "rgb"
    if kind == "sparse":
        image[:64] = 0  # tifffile writes empty tiles as zero-byte chunks
        opts["photometric"] = "minisblack"
    tifffile.imwrite(tmp_path / "s.tif", image, **opts)
    (source,) = open_sources(tmp_path / "s.tif")
    assert source.dtype == image.dtype
    rng = np.random.default_rng(0)
    for _ in range(20):
        r0, c0 = int(rng.integers(0, 149)), int(rng.integers(0, 169))
        r1, c1 = int(rng.integers(r0 + 1, 151)), int(rng.integers(c0 + 1, 171))
        np.testing.assert_array_equal(source.read(slice(r0, r1), slice(c0, c1)), image[r0:r1, c0:c1])


def test_chunk_cache_stays_within_its_byte_budget():
    from segcore.readers.cache import ChunkCache

    cache = ChunkCache(10_000)
    for i in range(50):
        chunk = cache.get(("f", i), lambda i=i: np.full(1000, i, np.uint8))
        assert chunk[0] == i and not chunk.flags.writeable
        assert cache.nbytes <= 10_000
    assert cache.get(("f", 49), lambda: np.zeros(1, np.uint8))[0] == 49 and cache.hits == 1
    assert cache.get(("f", 0), lambda: np.zeros(1000, np.uint8))[0] == 0  # evicted: loaded again


def test_scaled_reads_use_the_matching_pyramid_level(tmp_path):
    """At scale >= 2 a pyramid TIFF is read from its level of that factor: a patch equals the
    stored level (so the block mean of level 0 within the level's rounding), from scale^2 fewer px."""
    from segcore.readers.scaled import pick_level, read_scaled

    image = _ramp(200, 260, np.uint16)
    level2, level4 = _pyramid_tiff(tmp_path / "p.tif", image)
    (source,) = open_sources(tmp_path / "p.tif")
    assert source.level_factors == (2, 4) and source.level_shape(4) == (50, 65)
    rows, cols = slice(3, 40), slice(5, 60)
    for scale, level in [(4, level4), (2, level2)]:
        before = source.pixels_read
        patch = read_scaled(source, rows, cols, scale)
        np.testing.assert_array_equal(patch, level[rows, cols])  # exactly the stored level
        np.testing.assert_allclose(patch, _block_mean(image, scale)[rows, cols], atol=0.5)
        assert source.pixels_read - before == 37 * 55  # one level px per model px
    before = source.pixels_read
    patch8 = read_scaled(source, slice(2, 20), slice(4, 30), 8)  # level 4, then 2 x 2 means
    np.testing.assert_allclose(patch8, _block_mean(level4, 2)[2:20, 4:30])
    assert source.pixels_read - before == 36 * 52
    assert pick_level(source, slice(1, 4), slice(2, 5), 12) == 4 and pick_level(source, slice(1, 4), slice(2, 5), 6) == 2
    # a level whose px straddle model px edges would blur them: scales it does not divide read level 0
    assert pick_level(source, rows, cols, 3) == 1 and pick_level(source, rows, cols, 5.5) == 1
    np.testing.assert_allclose(read_scaled(source, slice(0, 10), slice(0, 10), 5.5), _area_mean(image, 5.5, 10))


def _area_mean(image: np.ndarray, scale: float, n: int) -> np.ndarray:
    from segcore.readers.scaled import _area_weights

    wy = _area_weights(0.0, n, scale, 0, image.shape[0])
    wx = _area_weights(0.0, n, scale, 0, image.shape[1])
    return wy @ image.astype(np.float64) @ wx.T


def test_levels_of_no_whole_factor_are_not_used(tmp_path):
    """A SubIFD that is no f-times-smaller copy of level 0 (here 70 x 90 of 200 x 260) is ignored."""
    from segcore.readers.scaled import read_scaled

    image = _ramp(200, 260, np.uint16)
    with tifffile.TiffWriter(tmp_path / "p.tif") as tif:
        tif.write(image, tile=(32, 32), subifds=1, photometric="minisblack")
        tif.write(image[:70, :90], tile=(32, 32), subfiletype=1, photometric="minisblack")
    (source,) = open_sources(tmp_path / "p.tif")
    assert source.level_factors == ()
    np.testing.assert_allclose(read_scaled(source, slice(0, 20), slice(0, 30), 3), _block_mean(image, 3)[:20, :30])
