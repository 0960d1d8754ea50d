"""Lazy, bounded-memory training data on real files: patches equal the in-memory image (block
means at scale > 1), coarse masks resample to the patch grid, bad mask sizes are named,
validation blocks stay clear of training patches, and a tiny train() at data.scale 4 runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from segcore.config import TrainConfig
from segcore.data import DataError, load_samples, load_spec
from segcore.data.lazy import (
    INDEX_DIR,
    LazyPatchDataset,
    PatchReader,
    choose_val_blocks,
    scan_dataset,
)
from segcore.data.shared import ignore_boundaries

CLASSES = ["a", "b", "c"]


def _dataset(tmp_path, size=(192, 256), mask_shape=None, spec_extra=None, channels=1):
    """A TIFF scan (uint16 ramp + noise) and an ids mask PNG of ``mask_shape`` (default: image size)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    h, w = size
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 4000, (h, w)) + np.arange(w)[None, :] * 50).astype(np.uint16)
    if channels > 1:
        image = np.stack([image, image // 2, image // 3][:channels], -1)
    tifffile.imwrite(tmp_path / "images" / "s.tif", image, tile=(64, 64),
                     photometric="rgb" if channels == 3 else "minisblack")
    mh, mw = mask_shape or size
    mask = ((np.arange(mh)[:, None] // 3 + np.arange(mw)[None, :] // 5) % 3).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "masks" / "s.png")
    spec = {"classes": CLASSES, "normalize": {"mode": "percentile"}, **(spec_extra or {})}
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return image, mask


def test_patch_equals_in_memory_at_scale_1(tmp_path):
    _dataset(tmp_path, channels=3)
    spec = load_spec(tmp_path)
    memory = load_samples(tmp_path, spec)[0]
    reader = PatchReader(scan_dataset(tmp_path, spec), scale=1)
    for top, left, p in [(0, 0, 64), (17, 101, 48), (128, 192, 64)]:
        image, mask = reader.patch(0, top, left, p)
        np.testing.assert_array_equal(image, memory.image[:, top:top + p, left:left + p])
        np.testing.assert_array_equal(mask, memory.mask[top:top + p, left:left + p])
    assert reader.pixels_read == 64 * 64 + 48 * 48 + 64 * 64  # only the patches were read


def test_patch_is_block_mean_at_scale_4(tmp_path):
    _dataset(tmp_path)
    spec = load_spec(tmp_path)
    memory = load_samples(tmp_path, spec)[0].image  # (1, 192, 256) normalised
    reader = PatchReader(scan_dataset(tmp_path, spec), scale=4)
    top, left, p = 5, 9, 24
    image, _ = reader.patch(0, top, left, p)
    region = memory[:, 4 * top:4 * (top + p), 4 * left:4 * (left + p)].astype(np.float64)
    expected = region.reshape(1, p, 4, p, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-6)
    assert reader.pixels_read == (4 * p) ** 2  # exactly the region under the patch


def test_non_integer_scale_preserves_area(tmp_path):
    _dataset(tmp_path)
    spec = load_spec(tmp_path)
    memory = load_samples(tmp_path, spec)[0].image.astype(np.float64)
    reader = PatchReader(scan_dataset(tmp_path, spec), scale=2.5)
    image = reader.image(0, 2, 4, 20, 30)  # image px rows 5..55, cols 10..85
    np.testing.assert_allclose(image.sum() * 2.5 ** 2, memory[:, 5:55, 10:85].sum(), rtol=1e-5)


def test_coarse_mask_resampled_to_patch_grid(tmp_path):
    _, coarse = _dataset(tmp_path, size=(256, 256), mask_shape=(32, 32), spec_extra={"mask_scale": 8})
    spec = load_spec(tmp_path)
    images = scan_dataset(tmp_path, spec)
    assert images[0].mask_scale == 8
    # model px u (scale 4) has its centre in image px 4u + 2, i.e. mask px (4u + 2) // 8 = u // 2
    reader = PatchReader(images, scale=4)
    expected = np.repeat(np.repeat(coarse, 2, 0), 2, 1)
    _, mask = reader.patch(0, 7, 13, 32)
    np.testing.assert_array_equal(mask, expected[7:39, 13:45])
    # at scale 1 every image px takes the mask px it lies in; the in-memory path agrees
    _, mask1 = PatchReader(images, scale=1).patch(0, 30, 50, 64)
    np.testing.assert_array_equal(mask1, np.repeat(np.repeat(coarse, 8, 0), 8, 1)[30:94, 50:114])
    np.testing.assert_array_equal(load_samples(tmp_path, spec)[0].mask[30:94, 50:114], mask1)
    assert list((tmp_path / INDEX_DIR).glob("*.npz"))  # the class index is cached beside the data


def test_non_integer_mask_scale_and_rounding(tmp_path):
    _, coarse = _dataset(tmp_path, size=(200, 300), mask_shape=(11, 16), spec_extra={"mask_scale": 18.72})
    images = scan_dataset(tmp_path, load_spec(tmp_path))  # 200 / 18.72 = 10.7 -> 11 rows: within rounding
    reader = PatchReader(images, scale=2)
    _, mask = reader.patch(0, 10, 20, 40)
    rows = np.minimum(((10 + np.arange(40) + 0.5) * 2 / 18.72).astype(int), 10)
    cols = np.minimum(((20 + np.arange(40) + 0.5) * 2 / 18.72).astype(int), 15)
    np.testing.assert_array_equal(mask, coarse[np.ix_(rows, cols)])


def test_boundary_ignore(tmp_path):
    mask = np.zeros((6, 8), np.int64)
    mask[:, 4:] = 1
    out = ignore_boundaries(mask, 1)
    assert (out[:, 3:5] == 255).all() and (out[:, :3] == 0).all() and (out[:, 5:] == 1).all()
    assert (ignore_boundaries(mask, 2)[:, 2:6] == 255).all()
    _dataset(tmp_path, size=(256, 256), mask_shape=(32, 32), spec_extra={"mask_scale": 8, "boundary_ignore": 1})
    reader = PatchReader(scan_dataset(tmp_path, load_spec(tmp_path)), scale=4, boundary_ignore=1)
    _, labels = reader.patch(0, 0, 0, 64)
    assert (labels == 255).any() and (labels != 255).any()


def test_mask_size_errors_name_both_sizes_and_key(tmp_path):
    _dataset(tmp_path, size=(256, 256), mask_shape=(30, 30))
    spec = load_spec(tmp_path)
    for load in (lambda: scan_dataset(tmp_path, spec), lambda: load_samples(tmp_path, spec)):
        with pytest.raises(DataError, match=r"256x256.*30x30.*mask_scale: 8\.53"):
            load()
    spec = spec.model_copy(update={"mask_scale": 4.0})
    with pytest.raises(DataError, match=r"256x256.*30x30.*does not fit mask_scale 4.*fix mask_scale"):
        scan_dataset(tmp_path, spec)


def test_validation_blocks_never_overlap_training(tmp_path):
    _dataset(tmp_path, size=(512, 640), mask_shape=(64, 80), spec_extra={"mask_scale": 8})
    images = scan_dataset(tmp_path, load_spec(tmp_path))
    p = 32
    blocks = choose_val_blocks(images, scale=2, patch=p, val_fraction=0.2, val_pixels=1 << 20, seed=3)
    assert blocks
    data = LazyPatchDataset(images, p, 400, scale=2, val_blocks=blocks, num_classes=3)
    for i in range(len(data)):
        k, top, left = data.corner(np.random.default_rng([0, 0, i]))
        for b in blocks:  # the patch and the block are at least a patch apart
            assert (top + p + p <= b.top or top >= b.top + b.size + p
                    or left + p + p <= b.left or left >= b.left + b.size + p)
    image, mask = data[0]
    assert image.shape == (1, p, p) and mask.shape == (p, p)


def test_train_scale_4_on_generated_scan(tmp_path):
    from segcore.modelio.ref import load_model_dir
    from segcore.simulate.sem import generate_sem_qemscan
    from segcore.train import train

    data = generate_sem_qemscan(tmp_path / "D", n=1, size=1024, seed=1, label_scale=8)
    assert Image.open(data / "masks" / "sem_0000.png").size == (128, 128)
    assert tifffile.TiffFile(data / "images" / "sem_0000.tif").pages[0].is_tiled
    cfg = TrainConfig.model_validate({
        "model": {"arch": "Unet", "encoder": "resnet18", "encoder_weights": None,
                  "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
        "data": {"patch_size": 32, "patches_per_epoch": 8, "batch_size": 4, "scale": 4, "val_pixels": 4096},
        "epochs": 1, "device": "cpu",
    })
    result = train(cfg, data, tmp_path / "M")
    card = json.loads((tmp_path / "M" / "config.json").read_text())
    assert card["train"]["data"]["scale"] == 4
    assert "val_miou" in result.metrics
    assert load_model_dir(tmp_path / "M")  # the saved model loads
    from segcore.evaluate import evaluate

    scored = evaluate(tmp_path / "M", data, tmp_path / "E", n_overlays=0, device="cpu")  # at the model's scale
    assert 0 <= scored.metrics["miou"] <= 1


def test_dataloader_workers_open_their_own_sources(tmp_path):
    import pickle

    from torch.utils.data import DataLoader

    _dataset(tmp_path, size=(256, 256), mask_shape=(32, 32), spec_extra={"mask_scale": 8})
    images = scan_dataset(tmp_path, load_spec(tmp_path))
    data = LazyPatchDataset(images, 32, 8, scale=2, num_classes=3)
    first = data[0]
    assert data.reader._open  # the parent opened a source ...
    assert pickle.loads(pickle.dumps(data)).reader._open == {}  # ... which is never pickled
    batches = list(DataLoader(data, batch_size=4, num_workers=2))
    assert sum(b[0].shape[0] for b in batches) == 8
    np.testing.assert_array_equal(batches[0][0][0].numpy(), first[0].numpy())  # same item, same pixels


def test_training_at_scale_4_reads_the_pyramid_level_only(tmp_path):
    """A scan with a stored level 4 trains at data.scale 4 from that level: one px read per model
    px (16x fewer than block-meaning level 0), and patches equal the block means within rounding."""
    image, _ = _dataset(tmp_path, size=(256, 320), mask_shape=(64, 80), spec_extra={"mask_scale": 4})
    level4 = np.round(image.astype(np.float64).reshape(64, 4, 80, 4).mean(axis=(1, 3))).astype(np.uint16)
    with tifffile.TiffWriter(tmp_path / "images" / "s.tif") as tif:
        tif.write(image, tile=(64, 64), subifds=1, photometric="minisblack")
        tif.write(level4, tile=(32, 32), subfiletype=1, photometric="minisblack")
    images = scan_dataset(tmp_path, load_spec(tmp_path))
    dataset = LazyPatchDataset(images, 32, 6, scale=4, num_classes=3)
    for i in range(6):
        dataset[i]
    assert dataset.reader.pixels_read == 6 * 32 * 32
    from segcore.data.normalize import apply_norm

    stats = images[0].stats
    patch = PatchReader(images, scale=4).image(0, 8, 16, 32, 32)[0]
    np.testing.assert_array_equal(patch, apply_norm(level4[8:40, 16:48], stats))  # the stored level
    block = image.astype(np.float64).reshape(64, 4, 80, 4).mean(axis=(1, 3))[8:40, 16:48]
    np.testing.assert_allclose(patch, apply_norm(block, stats), atol=0.5 * stats.scale + 1e-5)
