"""Tiling: tiled prediction equals the whole image predicted in one call, padded only to the
model's size multiple (bit for bit for local predictors); border windows read no outer halo,
an image that fits in one tile is one window, every output pixel is written exactly once, and
the predictor wrappers (stride padding, flip TTA, Gaussian-blended sub-tiles) do what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.config import ModelConfig
from segcore.models import build_model
from segcore.tiling import (
    balanced_tile,
    blended_predictor,
    flip_tta,
    forward_pixels,
    forward_pixels_per_output,
    gaussian_weights,
    grid_shape,
    pad_to_multiple,
    predict_tiled,
    predict_whole,
    read_window,
    reflect_pad,
    round_up,
    shape_batches,
    split_windows,
    strip_cols,
    strip_groups,
    union_read,
    window_at,
    window_from_block,
)

REACH = 2  # the box filter below reads 2 pixels each side


def box5(batch: np.ndarray) -> np.ndarray:
    """A fixed 5x5 mean filter (zero outside the window) as two 'class' maps: the same
    arithmetic, in the same order, for every pixel wherever it sits in the window."""
    x = np.pad(batch.astype(np.float32), ((0, 0), (0, 0), (REACH, REACH), (REACH, REACH)))
    h, w = batch.shape[-2:]
    acc = np.zeros(batch.shape, dtype=np.float32)
    for dy in range(2 * REACH + 1):
        for dx in range(2 * REACH + 1):
            acc += x[..., dy : dy + h, dx : dx + w]
    acc /= np.float32(25)
    return np.concatenate([acc[:, :1], -acc[:, :1] * acc[:, :1]], axis=1)


def tiny_convnet(seed: int = 0) -> torch.nn.Module:
    """Two 3x3 convs: receptive-field reach 2, like ``box5``."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3, padding=1))
    return net.eval()


CASES = [  # (height, width, tile, halo)
    (37, 53, 16, 2),
    (37, 53, 16, 8),
    (64, 64, 16, 4),
    (33, 47, 7, 3),
    (20, 91, 64, 5),
    (5, 9, 4, 40),  # halo far bigger than the image: repeated reflection
    (1, 17, 4, 2),  # one-pixel-high image
    (100, 3, 32, 2),
]


@pytest.mark.parametrize(("height", "width", "tile", "halo"), CASES)
def test_tiled_equals_whole_bit_for_bit(height: int, width: int, tile: int, halo: int) -> None:
    img = np.random.default_rng(height * width).random((1, height, width), dtype=np.float32)
    tiled = predict_tiled(img, box5, tile=tile, halo=halo, batch_size=3)
    whole = predict_whole(img, box5)
    assert tiled.shape == (2, height, width)
    if halo >= REACH:
        assert np.array_equal(tiled, whole)


def test_halo_smaller_than_reach_shows_seams() -> None:
    """The negative control: with halo < reach the tiles' zero borders leak into the output."""
    img = np.random.default_rng(1).random((1, 48, 48), dtype=np.float32)
    tiled = predict_tiled(img, box5, tile=16, halo=1)
    assert not np.array_equal(tiled, predict_whole(img, box5))


@pytest.mark.parametrize(("height", "width", "tile", "halo"), [(37, 53, 16, 2), (33, 47, 8, 4), (64, 40, 32, 3)])
def test_tiled_equals_whole_tiny_convnet(height: int, width: int, tile: int, halo: int) -> None:
    net = tiny_convnet()

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        return torch.softmax(net(torch.from_numpy(batch)), dim=1).numpy()

    img = np.random.default_rng(2).random((1, height, width), dtype=np.float32)
    tiled = predict_tiled(img, predict, tile=tile, halo=halo, batch_size=4)
    whole = predict_whole(img, predict)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)
    assert np.array_equal(tiled.argmax(0), whole.argmax(0))


class CountingArray:
    """Records how often every pixel is assigned."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.writes = np.zeros(shape[-2:], dtype=np.int32)
        self.data = np.zeros(shape, dtype=np.float32)

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        self.writes[key[-2:]] += 1
        self.data[key] = value


@pytest.mark.parametrize(("height", "width", "tile", "halo"), CASES)
def test_every_pixel_written_exactly_once(height: int, width: int, tile: int, halo: int) -> None:
    img = np.random.default_rng(3).random((1, height, width), dtype=np.float32)
    out = CountingArray((2, height, width))
    predict_tiled(img, box5, tile=tile, halo=halo, out=out)  # type: ignore[arg-type]
    assert (out.writes == 1).all()
    windows = list(split_windows((height, width), tile, halo))
    assert len(windows) == np.prod(grid_shape((height, width), tile))
    for w in windows:  # write regions start on the chunk grid; halo only where there is image
        assert w.write[0].start % tile == 0 and w.write[1].start % tile == 0
        assert w.pad == ((0, 0), (0, 0))
        for ax, size in enumerate((height, width)):
            assert w.read[ax] == slice(max(w.write[ax].start - halo, 0), min(w.write[ax].stop + halo, size))
    for batch in shape_batches(windows, 3):  # every batch stacks
        assert len(batch) <= 3 and len({w.padded_shape for w in batch}) == 1


def test_window_at_and_band_reads_match_split_windows() -> None:
    shape, tile, halo = (70, 90), 16, 6
    img = np.random.default_rng(4).random((1, *shape), dtype=np.float32)
    windows = list(split_windows(shape, tile, halo))
    rows, cols = grid_shape(shape, tile)
    assert windows == [window_at(shape, tile, halo, i, j) for i in range(rows) for j in range(cols)]
    band = [window_at(shape, tile, halo, 2, j) for j in range(1, 5)]
    rs, cs = union_read(band)
    block = img[:, rs, cs]
    for w in band:  # cutting windows out of one band read == reading each window
        assert np.array_equal(window_from_block(block, (rs.start, cs.start), w), read_window(img, w))
    with pytest.raises(IndexError):
        window_at(shape, tile, halo, rows, 0)


def test_reflect_pad_matches_reflecting_the_whole_image() -> None:
    img = np.arange(15, dtype=np.float32).reshape(1, 3, 5)
    padded = reflect_pad(img, ((4, 6), (7, 2)))
    assert np.array_equal(padded, np.pad(img, ((0, 0), (4, 6), (7, 2)), mode="reflect"))
    assert reflect_pad(np.ones((1, 1, 4)), ((2, 2), (0, 0))).shape == (1, 5, 4)


def test_pad_to_multiple_feeds_stride_multiples_and_crops_back() -> None:
    seen = []

    def strict(batch: np.ndarray) -> np.ndarray:
        if batch.shape[-1] % 32 or batch.shape[-2] % 32:
            raise ValueError(f"shape {batch.shape} is not a multiple of 32")
        seen.append(batch.shape)
        return box5(batch)

    batch = np.random.default_rng(5).random((2, 1, 50, 70), dtype=np.float32)
    out = pad_to_multiple(strict, 32)(batch)
    assert out.shape == (2, 2, 50, 70) and seen == [(2, 1, 64, 96)]
    assert np.array_equal(out[..., 10:40, 10:60], box5(batch)[..., 10:40, 10:60])


def test_flip_tta_averages_flipped_predictions() -> None:
    def lopsided(batch: np.ndarray) -> np.ndarray:  # not flip-equivariant: depends on column index
        cols = np.arange(batch.shape[-1], dtype=np.float32)
        return np.concatenate([batch * cols, batch], axis=1)

    batch = np.random.default_rng(6).random((2, 1, 6, 8), dtype=np.float32)
    out = flip_tta(lopsided, flips=("none", "h"))(batch)
    expected = (lopsided(batch) + lopsided(batch[..., ::-1])[..., ::-1]) / 2
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert np.array_equal(flip_tta(box5)(batch).shape, box5(batch).shape)
    with pytest.raises(ValueError, match="unknown flips"):
        flip_tta(box5, flips=("diagonal",))


def test_blended_predictor_is_exact_for_pointwise_models_and_covers_everything() -> None:
    def pointwise(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([batch, 1 - batch], axis=1)

    batch = np.random.default_rng(7).random((3, 1, 45, 61), dtype=np.float32)
    out = blended_predictor(pointwise, sub_tile=16, overlap=0.5)(batch)
    np.testing.assert_allclose(out, pointwise(batch), rtol=1e-5, atol=1e-6)
    calls = []

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        return pointwise(batch)

    blended_predictor(counting, sub_tile=32, overlap=0.5)(batch)
    assert calls and all(s[-2:] == (32, 32) for s in calls) and len(calls) == 2 * 3
    w = gaussian_weights(16, 16)
    assert w.max() == 1.0 and w[0, 0] < w[8, 8]


def test_forward_pixels_per_output() -> None:
    assert forward_pixels_per_output(512, 0) == 1
    assert forward_pixels_per_output(512, 64, tta=4) == pytest.approx(4 * (640 / 512) ** 2)


def _sharp_unet(seed: int) -> torch.nn.Module:
    """Random-init Unet (resnet18, depth 3, receptive-field reach 65 px) with a scaled head,
    so classes vary across the image and argmax ties are rare."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18", classes=3,
                                    arch_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]}))
    with torch.no_grad():
        head = model.segmentation_head[0]
        head.weight.mul_(20)
        head.bias.zero_()
    return model.eval()


def test_unet_tiled_labels_equal_whole_with_large_halo() -> None:
    model = _sharp_unet(0)

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        return torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()

    predict8 = pad_to_multiple(predict, 8)
    img = np.random.default_rng(8).random((1, 100, 130), dtype=np.float32)
    img = (img + np.roll(img, 1, -1) + np.roll(img, 1, -2)) / 3  # a little spatial structure
    whole = predict_whole(img, predict8).argmax(0)
    assert len(np.unique(whole)) > 1
    tiled = predict_tiled(img, predict8, tile=64, halo=72, batch_size=4).argmax(0)
    assert np.array_equal(tiled, whole)
    seams = predict_tiled(img, predict8, tile=64, halo=0, batch_size=4).argmax(0)
    assert not np.array_equal(seams, whole)
    # flip TTA inside the stride padding keeps every pixel on the same stride phase: still exact
    tta8 = pad_to_multiple(flip_tta(predict), 8)
    whole_tta = predict_whole(img, tta8).argmax(0)
    assert np.array_equal(predict_tiled(img, tta8, tile=64, halo=72, batch_size=4).argmax(0), whole_tta)


def _unet_predict(model: torch.nn.Module, multiple: int = 8):  # noqa: ANN202
    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        return torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()

    return pad_to_multiple(predict, multiple)


def _structured(shape: tuple[int, int], seed: int) -> np.ndarray:
    img = np.random.default_rng(seed).random((1, *shape), dtype=np.float32)
    return (img + np.roll(img, 1, -1) + np.roll(img, 1, -2)) / 3


def test_one_window_image_is_predicted_whole_exactly() -> None:
    """An image that fits in one tile is one window holding exactly the image: the same call
    as the whole-image forward (padded only to the size multiple), x1.0 forward pixels."""
    predict8 = _unet_predict(_sharp_unet(1))
    img = _structured((100, 130), 9)
    (window,) = split_windows((100, 130), tile=136, halo=72)
    assert window.read == window.write == (slice(0, 100), slice(0, 130)) and window.pad == ((0, 0), (0, 0))
    tiled = predict_tiled(img, predict8, tile=136, halo=72)
    assert np.array_equal(tiled, predict_whole(img, predict8))
    assert forward_pixels((96, 128), 136, 72, multiple=8) == 1.0
    assert forward_pixels((100, 130), 136, 72, multiple=8) == pytest.approx(104 * 136 / (100 * 130))


def test_border_windows_carry_no_outer_halo_and_labels_are_unchanged() -> None:
    shape, tile, halo = (230, 250), 64, 40
    windows = list(split_windows(shape, tile, halo))
    top_left, bottom_right = windows[0], windows[-1]
    assert top_left.read == (slice(0, 104), slice(0, 104))  # no halo above or left of the image
    assert bottom_right.read == (slice(152, 230), slice(152, 250))  # none below or right either
    inner = window_at(shape, tile, halo, 1, 1)
    assert inner.padded_shape == (tile + 2 * halo, tile + 2 * halo)
    # fewer model pixels than the old scheme, which reflect-padded every window by the full halo
    assert forward_pixels(shape, tile, halo) < 16 * (tile + 2 * halo) ** 2 / (230 * 250)
    predict8 = _unet_predict(_sharp_unet(0))
    img = _structured(shape, 10)
    whole = predict_whole(img, predict8).argmax(0)
    assert len(np.unique(whole)) > 1
    for tile_, halo_ in [(64, 72), (48, 80)]:  # multiples of the size multiple 8: same stride phase
        assert np.array_equal(predict_tiled(img, predict8, tile=tile_, halo=halo_, batch_size=3).argmax(0), whole)


def test_shape_batches_keep_order_and_stack() -> None:
    windows = list(split_windows((70, 90), 16, 6))
    batches = list(shape_batches(windows, 4))
    assert [w for b in batches for w in b] == windows
    assert all(len(b) <= 4 and len({w.padded_shape for w in b}) == 1 for b in batches)
    assert round_up(0, 8) == 0 and round_up(9, 8) == 16 and round_up(5, 1) == 5


@pytest.mark.parametrize(("height", "width", "tile", "halo", "max_px"), [
    (37, 53, 16, 2, 20 * 57), (64, 64, 16, 4, 24 * 40), (64, 90, 8, 3, 10**6), (40, 40, 16, 4, 1)])
def test_strips_equal_whole_bit_for_bit(height: int, width: int, tile: int, halo: int, max_px: int) -> None:
    """A row's windows predicted as strips (their union read in one call) give the whole image's
    output bit for bit; each strip stays within ``max_px`` unless it is one window; strips never span rows."""
    image = np.random.default_rng(3).random((1, height, width), dtype=np.float32)
    whole, out = box5(image[None])[0], np.full((2, height, width), np.nan, np.float32)
    windows = list(split_windows((height, width), tile, halo))
    for strip in strip_groups(windows, max_px):
        rows, cols = union_read(strip)
        assert len({(w.read[0].start, w.read[0].stop) for w in strip}) == 1
        assert len(strip) == 1 or (rows.stop - rows.start) * (cols.stop - cols.start) <= max_px
        pred = box5(image[None, :, rows, cols])[0]
        for w in strip:
            out[:, w.write[0], w.write[1]] = pred[:, w.write[0].start - rows.start:w.write[0].stop - rows.start,
                                                  w.write[1].start - cols.start:w.write[1].stop - cols.start]
    assert np.array_equal(out, whole)


def test_strip_cols_fits_the_budget() -> None:
    assert strip_cols((4096, 4096), 2784, 224, 3232 * 4096) == 2  # whole rows (interior height): x1.11, not x1.23
    assert strip_cols((4096, 4096), 2784, 224, 3232 * 3232) == 1
    assert strip_cols((768, 10_000), 512, 128, 768 * (4 * 512 + 256)) == 4
    assert strip_cols((768, 10_000), 512, 128, 1) == 1


@pytest.mark.parametrize(("shape", "tile", "want"), [((4096, 4096), 2400, 2048), ((8192, 8192), 2400, 2048),
                                                    ((4096, 10_000), 2400, 2048), ((3000, 5000), 2400, 1696),
                                                    ((2400, 2400), 2400, 2400)])
def test_balanced_tile_keeps_the_windows_and_their_forward_px(shape, tile: int, want: int) -> None:
    """A balanced tile gives the same grid and reads no more pixels (the halo is paid once per window
    edge whatever the tile), while its largest window is no bigger: calls need less memory."""
    halo, multiple = 192, 32
    got = balanced_tile(shape, tile, multiple)
    assert got == want and got % multiple == 0 and grid_shape(shape, got) == grid_shape(shape, tile)

    def reads(t: int) -> list[int]:
        return [(w.read[0].stop - w.read[0].start) * (w.read[1].stop - w.read[1].start)
                for w in split_windows(shape, t, halo)]

    assert sum(reads(got)) <= sum(reads(tile)) and max(reads(got)) <= max(reads(tile))
