"""segcore.data on real files written to tmp_path: formats, pairing, errors, sampling, augmentation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from astropy.io import fits
from PIL import Image

from segcore.config import NormalizeConfig
from segcore.data import (
    DataError,
    PatchDataset,
    Sample,
    apply_norm,
    build_augmentation,
    compute_norm_stats,
    load_samples,
    load_spec,
    read_image,
    strided_sample,
)
from segcore.data.augment import seed_augmentation


def make_dirs(root: Path, spec: dict | None = None) -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    if spec is not None:
        (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return root / "images", root / "masks"


def save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def ids_mask(h: int, w: int, k: int = 3) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % k).astype(np.uint8)


# ---------------------------------------------------------------- formats


def test_tiff_16bit_one_and_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    rgb = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    for name, array in (("grey", grey), ("rgb", rgb)):
        images, masks = make_dirs(tmp_path / name)
        tifffile.imwrite(images / f"{name}.tif", array, photometric="rgb" if array.ndim == 3 else None)
        save_png(masks / f"{name}.png", ids_mask(20, 30))
    (g,) = load_samples(tmp_path / "grey")
    (c,) = load_samples(tmp_path / "rgb")
    assert g.image.shape == (1, 20, 30) and c.image.shape == (3, 20, 30)
    assert g.image.dtype == np.float32 and g.mask.dtype == np.int64
    np.testing.assert_allclose(g.image[0], grey / 65535.0, rtol=1e-6)
    np.testing.assert_allclose(c.image, rgb.transpose(2, 0, 1) / 65535.0, rtol=1e-6)
    assert (g.mask == ids_mask(20, 30)).all()
    assert load_spec(tmp_path / "grey").class_names == ["class_0", "class_1", "class_2"]


def test_rgb_mask_merges_several_colours_into_one_class(tmp_path):
    spec = {"classes": ["pore", "quartz", "clay"], "mask_mode": "rgb",
            "colors": {"pore": [0, 0, 0], "quartz": [[255, 0, 0], [250, 5, 0]], "clay": [[0, 0, 255]]},
            "ignore_colors": [[255, 255, 255]]}
    images, masks = make_dirs(tmp_path, spec)
    save_png(images / "a.png", np.full((4, 6), 100, np.uint8))
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0] = (255, 0, 0)
    rgb[1] = (250, 5, 0)
    rgb[2, :3] = (0, 0, 255)
    rgb[3] = (255, 255, 255)
    save_png(masks / "a.png", rgb)
    (sample,) = load_samples(tmp_path)
    assert sample.mask[0].tolist() == [1] * 6 and sample.mask[1].tolist() == [1] * 6
    assert sample.mask[2].tolist() == [2, 2, 2, 0, 0, 0]
    assert sample.mask[3].tolist() == [255] * 6
    assert load_spec(tmp_path).display_colors() == [(0, 0, 0), (255, 0, 0), (0, 0, 255)]


def write_amp_fits(path: Path, amps: list[np.ndarray], pedestals: list[float], gains: list[float] | None) -> None:
    hdus = [fits.PrimaryHDU()]
    for k, (data, ped) in enumerate(zip(amps, pedestals, strict=True)):
        hdu = fits.ImageHDU(data=data, name=f"AMP{k + 1}")
        hdu.header["PEDESTAL"] = ped
        if gains:
            hdu.header["GAIN"] = gains[k]
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path)


def test_multi_hdu_fits_with_bzero_and_header_normalisation(tmp_path):
    images, masks = make_dirs(tmp_path, {"classes": ["bg", "glow", "hot"], "normalize": {"mode": "fits_header"}})
    rng = np.random.default_rng(1)
    amps = [rng.integers(40000, 41000, (12, 16)).astype(np.uint16) for _ in range(2)]
    write_amp_fits(images / "run.fits", amps, [40100.0, 40200.0], [0.5, 0.25])
    with fits.open(images / "run.fits", do_not_scale_image_data=True) as raw:
        assert raw[1].header["BZERO"] == 32768 and raw[1].data.dtype.kind == "i"  # int16 on disk
    save_png(masks / "run_AMP1.png", ids_mask(12, 16))
    save_png(masks / "run_2.png", ids_mask(12, 16)[::-1].copy())  # HDU number works too
    samples = load_samples(tmp_path)
    assert [s.name for s in samples] == ["run_AMP1", "run_AMP2"]
    np.testing.assert_allclose(samples[0].image[0], (amps[0].astype(np.float64) - 40100) * 0.5, atol=1e-3)
    np.testing.assert_allclose(samples[1].image[0], (amps[1].astype(np.float64) - 40200) * 0.25, atol=1e-3)
    assert (samples[1].mask == ids_mask(12, 16)[::-1]).all()


def test_fits_masks_in_one_multi_hdu_fits(tmp_path):
    images, masks = make_dirs(tmp_path, {"classes": ["a", "b", "c"], "normalize": {"mode": "percentile"}})
    amps = [np.arange(12 * 16, dtype=np.float32).reshape(12, 16) * (k + 1) for k in range(3)]
    write_amp_fits(images / "run.fits", amps, [0.0] * 3, None)
    labels = [ids_mask(12, 16), 2 - ids_mask(12, 16), np.ones((12, 16), np.uint8)]
    write_amp_fits(masks / "run.fits", labels, [0.0] * 3, None)
    samples = load_samples(tmp_path)
    for s, lab in zip(samples, labels, strict=True):
        assert (s.mask == lab).all()
    assert samples[2].image.min() == pytest.approx(-0.005 / 0.99, abs=0.01)


def test_jpeg_rgb_image(tmp_path):
    images, masks = make_dirs(tmp_path)
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :8] = (200, 100, 50)
    Image.fromarray(img).save(images / "photo.jpg", quality=95)
    save_png(masks / "photo.png", ids_mask(16, 16, 2))
    (s,) = load_samples(tmp_path)
    assert s.image.shape == (3, 16, 16)
    assert abs(s.image[0, 4, 2] - 200 / 255) < 0.05 and abs(s.image[2, 4, 12]) < 0.05


@pytest.mark.parametrize("pairing", [
    {"image_regex": r"scan_(?P<key>\d+)", "mask_template": "label_{key}"},
    {"image_regex": r"scan_(?P<key>\d+)", "mask_regex": r"label_(?P<key>\d+)"},
])
def test_pairing_with_different_names(tmp_path, pairing):
    images, masks = make_dirs(tmp_path, {"classes": ["a", "b"], "pairing": pairing})
    for i in (17, 18):
        save_png(images / f"scan_{i:03d}.png", np.full((8, 8), i, np.uint8))
        save_png(masks / f"label_{i:03d}.png", np.full((8, 8), i % 2, np.uint8))
    samples = {s.name: s for s in load_samples(tmp_path)}
    assert (samples["scan_017"].mask == 1).all() and (samples["scan_018"].mask == 0).all()


# ---------------------------------------------------------------- bad input


def test_missing_mask_names_the_image(tmp_path):
    images, masks = make_dirs(tmp_path, {"classes": ["a", "b"]})
    save_png(images / "lonely.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"lonely\.png.*no mask"):
        load_samples(tmp_path)


def test_size_mismatch(tmp_path):
    images, masks = make_dirs(tmp_path, {"classes": ["a", "b"]})
    save_png(images / "a.png", np.zeros((8, 8), np.uint8))
    save_png(masks / "a.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(DataError, match=r"a\.png.*8x8.*8x9"):
        load_samples(tmp_path)


def test_unknown_colour_says_which_and_where(tmp_path):
    images, masks = make_dirs(tmp_path, {"mask_mode": "rgb", "colors": {"a": [0, 0, 0], "b": [255, 0, 0]}})
    save_png(images / "a.png", np.zeros((8, 8), np.uint8))
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[3, 5] = (12, 34, 56)
    save_png(masks / "a.png", rgb)
    with pytest.raises(DataError, match=r"masks/a\.png.*\[12, 34, 56\].*row 3, column 5"):
        load_samples(tmp_path)


def test_corrupt_file(tmp_path):
    images, masks = make_dirs(tmp_path, {"classes": ["a", "b"]})
    save_png(images / "a.png", np.zeros((64, 64), np.uint8))
    data = (images / "a.png").read_bytes()
    (images / "a.png").write_bytes(data[: len(data) // 2])
    save_png(masks / "a.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match=r"a\.png: cannot read"):
        load_samples(tmp_path)


def test_nan_pixels(tmp_path):
    images, masks = make_dirs(tmp_path, {"classes": ["a", "b"], "normalize": {"mode": "percentile"}})
    img = np.ones((8, 8), np.float32)
    img[2, 6] = np.nan
    tifffile.imwrite(images / "a.tif", img)
    save_png(masks / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"a\.tif.*1 NaN.*row 2, column 6"):
        load_samples(tmp_path)


def test_mask_values_beyond_classes(tmp_path):
    images, masks = make_dirs(tmp_path, {"classes": ["a", "b"]})
    save_png(images / "a.png", np.zeros((8, 8), np.uint8))
    save_png(masks / "a.png", np.full((8, 8), 7, np.uint8))
    with pytest.raises(DataError, match=r"masks/a\.png: mask values \[7\]"):
        load_samples(tmp_path)


def test_fits_header_mode_without_pedestal(tmp_path):
    images, masks = make_dirs(tmp_path, {"classes": ["a", "b"], "normalize": {"mode": "fits_header"}})
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(images / "a.fits")
    save_png(masks / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"a\.fits.*PEDESTAL"):
        load_samples(tmp_path)


def test_bad_dataset_yaml_names_the_key(tmp_path):
    make_dirs(tmp_path, {"classes": ["a"], "colours": {"a": [0, 0, 0]}})
    with pytest.raises(DataError, match=r"(?s)dataset\.yaml.*colours: unknown key 'colours'; did you mean 'class_colors'"):
        load_spec(tmp_path)


# ---------------------------------------------------------------- normalisation


def test_normalisation_modes_and_tiles_match_whole_image():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 4096, (300, 200), dtype=np.uint16)
    assert compute_norm_stats(img, NormalizeConfig(mode="dtype_range")).scale == pytest.approx(1 / 65535)
    assert compute_norm_stats(img.astype(np.uint8), NormalizeConfig()).scale == pytest.approx(1 / 255)
    cfg = NormalizeConfig(mode="percentile", low_percentile=1, high_percentile=99)
    stats = compute_norm_stats(strided_sample(img, max_pixels=5000), cfg)
    full = np.percentile(img, [1, 99])
    assert stats.offset == pytest.approx(full[0], abs=41) and 1 / stats.scale == pytest.approx(full[1] - full[0], abs=82)
    z = compute_norm_stats(img, NormalizeConfig(mode="zscore", mean=10.0, std=4.0))
    assert (z.offset, z.scale) == (10.0, 0.25)
    whole = apply_norm(img, stats)
    assert whole.dtype == np.float32
    np.testing.assert_array_equal(apply_norm(img[100:164, 50:114], stats), whole[100:164, 50:114])


# ---------------------------------------------------------------- patches


def sample(mask: np.ndarray, channels: int = 1) -> Sample:
    image = np.repeat(mask[None].astype(np.float32), channels, axis=0)
    return Sample("s", image, mask.astype(np.int64), Path("s.png"))


def rare_class_mask(size: int = 200) -> np.ndarray:
    mask = np.zeros((size, size), np.int64)
    mask[20:40, 150:170] = 1  # 400 px = 1 %
    return mask


def rare_fraction(ds: PatchDataset) -> float:
    return float(np.mean([(ds[i][1] == 1).float().mean().item() for i in range(len(ds))]))


def test_class_balanced_sampling_sees_rare_class_more():
    s = sample(rare_class_mask())
    balanced = PatchDataset([s], 32, 200, class_balanced=True, seed=1)
    uniform = PatchDataset([s], 32, 200, class_balanced=False, seed=1)
    # uniform patches hold ~1 % rare pixels; balanced ones pick class 1 for half the patches
    assert rare_fraction(balanced) > 5 * rare_fraction(uniform)
    assert rare_fraction(balanced) > 0.08


def test_patches_are_deterministic_per_seed_epoch_index():
    s = sample(np.random.default_rng(3).integers(0, 3, (100, 100)))
    aug = build_augmentation(0.8)
    a = PatchDataset([s], 24, 10, augment=aug, seed=5)
    b = PatchDataset([s], 24, 10, augment=build_augmentation(0.8), seed=5)
    img, mask = a[7]
    assert img.shape == (1, 24, 24) and mask.shape == (24, 24) and str(mask.dtype) == "torch.int64"
    assert all((a[i][0] == b[i][0]).all() and (a[i][1] == b[i][1]).all() for i in (7, 2, 7))
    a.set_epoch(1)
    assert not (a[7][0] == b[7][0]).all()


def test_set_epoch_reaches_persistent_workers():
    import torch

    s = sample(np.random.default_rng(3).integers(0, 3, (64, 64)))
    ds = PatchDataset([s], 16, 4, seed=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, persistent_workers=True)
    first = next(iter(loader))[0]
    ds.set_epoch(1)
    second = next(iter(loader))[0]
    expected = torch.stack([ds[i][0] for i in range(4)])
    assert torch.equal(second, expected) and not torch.equal(first, second)


def test_small_image_is_padded_with_warning(caplog):
    mask = np.ones((20, 24), np.int64)
    with caplog.at_level(logging.WARNING):
        ds = PatchDataset([sample(mask, channels=2)], 32, 4, seed=0)
    assert "smaller than the 32 px patch" in caplog.text
    img, m = ds[0]
    assert img.shape == (2, 32, 32) and m.shape == (32, 32)
    assert int((m == 255).sum()) == 32 * 32 - 20 * 24 and int((m == 1).sum()) == 20 * 24


# ---------------------------------------------------------------- augmentation


def test_augmentation_keeps_image_and_mask_aligned():
    """Augment an image equal to its mask: away from class borders and from the filled-in
    outside (found with a second, all-ones channel) both must still agree."""
    from scipy.ndimage import maximum_filter, minimum_filter

    rng = np.random.default_rng(4)
    mask = np.kron(rng.integers(0, 4, (6, 6)), np.ones((16, 16), np.int64)).astype(np.uint8)
    image = np.stack([mask, np.ones_like(mask)], axis=-1).astype(np.float32)
    aug = build_augmentation(1.0, photometric=False)
    changed = 0
    for seed in range(20):
        seed_augmentation(aug, seed)
        out = aug(image=image, mask=mask)
        img, ones, m = out["image"][..., 0], out["image"][..., 1], out["mask"]
        interior = (maximum_filter(m, 3) == minimum_filter(m, 3)) & (m != 255) & (ones > 0.999)
        assert interior.sum() > 500
        diff = np.abs(img[interior] - m[interior])
        assert (diff < 0.5).mean() > 0.99 and diff.max() < 1.0, seed
        changed += int(not np.array_equal(m, mask))
    assert changed >= 15


def test_full_augmentation_mask_values_and_dtype():
    mask = np.kron(np.arange(4).reshape(2, 2), np.ones((24, 24), np.int64)).astype(np.uint8)
    aug = build_augmentation(1.0)
    image = np.stack([mask * 10.0, -mask * 3.0], axis=-1).astype(np.float32)  # beyond [0, 1]
    seen = set()
    for seed in range(20):
        seed_augmentation(aug, seed)
        out = aug(image=image, mask=mask)
        assert out["image"].dtype == np.float32 and out["image"].shape == (48, 48, 2)
        seen |= set(np.unique(out["mask"]).tolist())
        assert out["image"].max() > 5  # photometric transforms do not clip to [0, 1]
    assert seen <= {0, 1, 2, 3, 255} and 255 in seen
    assert build_augmentation(0.0) is None


def test_read_image_reports_unsupported_type(tmp_path):
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(DataError, match=r"x\.bmp: unsupported"):
        read_image(tmp_path / "x.bmp")


def test_channel_count_must_agree(tmp_path):
    images, masks = make_dirs(tmp_path, {"classes": ["a", "b"]})
    save_png(images / "a.png", np.zeros((8, 8), np.uint8))
    save_png(images / "b.png", np.zeros((8, 8, 3), np.uint8))
    for name in ("a", "b"):
        save_png(masks / f"{name}.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"b\.png: b has 3 channels but a\.png has 1"):
        load_samples(tmp_path)
