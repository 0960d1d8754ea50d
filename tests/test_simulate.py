"""The synthetic generators through ``gigaseg simulate`` and their big-image writers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from PIL import Image

from segcore.cli import main
from segcore.data import load_samples, load_spec
from segcore.errors import ConfigError
from segcore.simulate import ccd, lines, render_sem, sem, shapes, write_ccd_fits, write_sem_bigtiff


@pytest.mark.parametrize(("kind", "classes", "size", "n_samples"), [
    ("shapes", shapes.CLASSES, 64, 2),
    ("sem", sem.CLASSES, 128, 2),
    ("ccd", ccd.CLASSES, 96, 4),  # 2 files x 2 amplifier HDUs
])
def test_cli_writes_a_loadable_dataset_with_every_class(tmp_path, kind, classes, size, n_samples):
    out = tmp_path / kind
    assert main(["simulate", kind, "--out", str(out), "--n", "2", "--size", str(size), "--seed", "3"]) == 0
    assert load_spec(out).class_names == classes
    samples = load_samples(out)
    assert len(samples) == n_samples
    assert all(s.image.shape == (1, size, size) and s.mask.shape == (size, size) for s in samples)
    present = set(np.unique(np.concatenate([s.mask.ravel() for s in samples])).tolist())
    assert present == set(range(len(classes)))


def test_sem_dataset_is_16_bit_with_several_colours_per_class(tmp_path):
    main(["simulate", "sem", "--out", str(tmp_path), "--n", "1", "--size", "160", "--seed", "1"])
    image = tifffile.imread(tmp_path / "images" / "sem_0000.tif")
    assert image.dtype == np.uint16 and image.max() > 255
    rgb = np.array(Image.open(tmp_path / "masks" / "sem_0000.png"))
    colours = {tuple(c) for c in rgb.reshape(-1, 3).tolist()}
    assert len(colours) > len(sem.CLASSES)  # sub-minerals merged by dataset.yaml
    (sample,) = load_samples(tmp_path)
    pore = sample.mask == 0
    quartz = sample.mask == 1
    assert sample.image[0][pore].mean() < sample.image[0][quartz].mean()  # pores are dark


def test_ccd_file_has_bzero_amplifier_hdus_and_returns_masks(tmp_path):
    path = tmp_path / "frame.fits"
    masks = write_ccd_fits(path, n_hdus=3, height=64, width=80, seed=2)
    assert [m.shape for m in masks] == [(64, 80)] * 3
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        assert [h.name for h in hdul[1:]] == ["AMP1", "AMP2", "AMP3"]
        assert all(h.header["BZERO"] == 32768 and h.data.dtype.kind == "i" for h in hdul[1:])
        assert all("PEDESTAL" in h.header and "GAIN" in h.header for h in hdul[1:])
    with fits.open(path) as hdul:
        amp = hdul[1].data.astype(np.float64)
        pedestal = hdul[1].header["PEDESTAL"]
    background = masks[0] == 0
    assert abs(np.median(amp[background]) - pedestal) < 5
    assert amp[masks[0] == 3].mean() > pedestal + 100  # clusters are hundreds of ADU up


def test_render_sem_windows_agree_with_the_big_render():
    big, big_labels = render_sem((200, 260), seed=7, offset=(-70, 3000))
    for r, c, h, w in [(33, 101, 50, 70), (0, 0, 41, 39), (150, 200, 50, 60)]:
        win, labels = render_sem((h, w), seed=7, offset=(-70 + r, 3000 + c))
        np.testing.assert_array_equal(win, big[r:r + h, c:c + w])
        np.testing.assert_array_equal(labels, big_labels[r:r + h, c:c + w])
    assert set(np.unique(big_labels).tolist()) == {0, 1, 2, 3}
    other, _ = render_sem((200, 260), seed=8, offset=(-70, 3000))
    assert not np.array_equal(other, big)


def test_write_sem_bigtiff_is_tiled_and_matches_render(tmp_path):
    path, mask_path = tmp_path / "big.tif", tmp_path / "big_labels.tif"
    write_sem_bigtiff(path, 300, 520, tile=128, seed=4, mask_path=mask_path, workers=2)
    expected, labels = render_sem((300, 520), seed=4)
    for p, dtype, want in [(path, np.uint16, expected), (mask_path, np.uint8, labels)]:
        with tifffile.TiffFile(p) as tif:
            page = tif.pages[0]
            assert tif.is_bigtiff and page.is_tiled
            assert (page.tilelength, page.tilewidth) == (128, 128)
            assert page.shape == (300, 520) and page.dtype == dtype
            np.testing.assert_array_equal(page.asarray(), want)


def test_write_sem_bigtiff_rejects_bad_tile(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        write_sem_bigtiff(tmp_path / "x.tif", 64, 64, tile=100)


def test_lines_cli_writes_seed_003_like_rgb_data(tmp_path):
    """400 x 200 RGB, classes background/line/ellipse, lines 1.5-4 % of pixels, same seed same bytes."""
    out = tmp_path / "lines"
    assert main(["simulate", "lines", "--out", str(out), "--n", "6", "--seed", "2"]) == 0
    assert load_spec(out).class_names == lines.CLASSES == ["background", "line", "ellipse"]
    samples = load_samples(out)
    assert len(samples) == 6
    assert all(s.image.shape == (3, 200, 400) and s.mask.shape == (200, 400) for s in samples)
    masks = np.stack([s.mask for s in samples])
    assert set(np.unique(masks).tolist()) == {0, 1, 2}
    assert 0.015 <= (masks == 1).mean() <= 0.04
    rgb = np.array(Image.open(out / "images" / "lines_0000.png"))
    assert rgb.shape == (200, 400, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - rgb.mean(axis=2, keepdims=True)).max() > 10  # colour, not grey
    again = tmp_path / "again"
    main(["simulate", "lines", "--out", str(again), "--n", "2", "--seed", "2"])
    other = tmp_path / "other"
    main(["simulate", "lines", "--out", str(other), "--n", "1", "--seed", "3"])
    for name in ("images/lines_0001.png", "masks/lines_0001.png"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    assert (out / "images/lines_0000.png").read_bytes() != (other / "images/lines_0000.png").read_bytes()


def test_lines_seed003_style_is_grey_with_flat_shapes_on_noise(tmp_path):
    """seed 003's own recipe: equal channels, background noise in [0.6, 1] x 255, every shape one
    grey level (so within a shape the pixels do not vary), lines 1-4 % of pixels."""
    out = tmp_path / "seed003"
    assert main(["simulate", "lines", "--style", "seed003", "--out", str(out), "--n", "6", "--seed", "1"]) == 0
    samples = load_samples(out)
    assert all(s.image.shape == (3, 200, 400) for s in samples)
    masks = np.stack([s.mask for s in samples])
    assert set(np.unique(masks).tolist()) == {0, 1, 2} and 0.01 <= (masks == 1).mean() <= 0.04
    rgb = np.array(Image.open(out / "images" / "lines_0000.png")).astype(int)
    assert (rgb == rgb[..., :1]).all()  # grey
    grey, mask = rgb[..., 0], samples[0].mask
    assert grey[mask == 0].min() >= 152 and grey[mask == 0].std() > 10  # truncated noise, 0.6-1.0
    from scipy.ndimage import label

    parts, n = label(mask == 1)
    assert n >= 1 and all(np.unique(grey[parts == k]).size <= 2 for k in range(1, n + 1))  # flat (+ crossings)
    with pytest.raises(ConfigError, match="unknown lines style"):
        lines.generate_lines(tmp_path / "x", 1, style="fancy")


def test_lines_seed003_hard_takes_the_flat_shape_shortcut_away():
    """seed003-hard: the same shapes and classes, but every shape is shaded and textured (its pixels
    vary, as the background's do) and edges are soft (grey levels between a line and the background)."""
    image, mask = lines.render_seed003_hard(np.random.default_rng(3))
    assert image.shape == (200, 400, 3) and (image == image[..., :1]).all()
    assert set(np.unique(mask).tolist()) >= {0, 1}
    grey = image[..., 0].astype(float)
    from scipy.ndimage import binary_dilation, label

    parts, n = label(mask == 1)
    assert all(grey[parts == k].std() > 2 for k in range(1, n + 1) if (parts == k).sum() > 30)  # not flat
    rim = binary_dilation(mask == 1, iterations=1) & (mask == 0)
    inner, outer = np.median(grey[mask == 1]), np.median(grey[mask == 0])
    between = (grey[rim] > min(inner, outer) + 5) & (grey[rim] < max(inner, outer) - 5)
    assert between.mean() > 0.2  # blurred edges


def test_lines_are_3_to_5_px_wide_with_anti_aliased_edges():
    from segcore.plan.fingerprints import object_sizes

    image, mask = lines.render_lines(np.random.default_rng(7))
    line = mask == 1
    _, thickness, _ = object_sizes(line)  # what `gigaseg plan` measures
    assert thickness is not None and 2.5 <= thickness <= 5.5
    grey = image.astype(np.float32).mean(axis=2)
    assert len(np.unique(grey[line])) > 20  # blended and noisy, not flat fills
