"""Tiling in three parts: a splitter that yields windows, a predictor, and a merger.

A :class:`Window` keeps three regions apart (after MONAI's inferers and StarDist's ``big.py``):

* ``write``: the output pixels this window owns. Write regions tile the image exactly once
  and line up with output chunks, so parallel workers write without locks.
* ``read``: ``write`` grown by ``halo`` on every side and clipped to the image; the pixels read.
  A side at the image border gets no halo: the model sees the image border there, as it does
  when the whole image is predicted at once, so an image that fits in one tile is one window
  holding exactly the image (x1.0 forward pixels).
* ``pad``: extra reflected pixels around ``read`` (zero for every window :func:`window_at` makes;
  kept for callers that build windows by hand).

The predictor sees ``reflect_pad(image[read], pad)``, padded by :func:`pad_to_multiple` to the
model's size multiple ``m`` at the bottom/right, and only ``crop`` of its output (the write
region in window coordinates) is kept. When ``tile`` and ``halo`` are multiples of ``m`` (every
read origin is then a multiple of ``m``: the same stride phase as the whole image) and the halo
covers the model's receptive-field reach, tiled prediction equals :func:`predict_whole`: the
whole image padded only to ``m`` and predicted in one call; bit for bit for a purely local
predictor. Border windows are smaller than interior ones; :func:`shape_batches` groups
consecutive windows of one shape so every batch stacks.

Predictor wrappers (each takes and returns a ``PredictFn``; they work on numpy arrays and on
torch tensors alike, so a GPU predictor keeps its probabilities on the device):

* :func:`pad_to_multiple`: reflect-pad a batch up to a multiple of the model's stride, crop back.
* :func:`flip_tta`: average the probabilities over horizontal/vertical flips.
* :func:`blended_predictor`: predict a window as overlapping sub-tiles blended with Gaussian
  weights (for models with global context, e.g. PSPNet or DeepLabV3 pooling). It works *inside*
  one window, so the window still writes only its own disjoint write region.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

Slice2D = tuple[slice, slice]
Pad2D = tuple[tuple[int, int], tuple[int, int]]
PredictFn = Callable[[np.ndarray], np.ndarray]  # (N, C, h, w) float32 -> (N, K, h, w) float32 (or tensors)


def _is_tensor(x: object) -> bool:
    return not isinstance(x, np.ndarray) and type(x).__module__.startswith("torch")


def _flip(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """A contiguous flipped copy (numpy or torch)."""
    if _is_tensor(x):
        import torch

        return torch.flip(x, axes)
    return np.ascontiguousarray(np.flip(x, axes))


@dataclass(frozen=True)
class Window:
    """One tile: where to read, how to pad, which output pixels it owns."""

    read: Slice2D
    pad: Pad2D
    write: Slice2D

    @property
    def crop(self) -> Slice2D:
        """The write region in the coordinates of the padded window."""
        (top, _), (left, _) = self.pad
        r0 = self.write[0].start - self.read[0].start + top
        c0 = self.write[1].start - self.read[1].start + left
        return (
            slice(r0, r0 + self.write[0].stop - self.write[0].start),
            slice(c0, c0 + self.write[1].stop - self.write[1].start),
        )

    @property
    def padded_shape(self) -> tuple[int, int]:
        (t, b), (lf, rt) = self.pad
        return (
            self.read[0].stop - self.read[0].start + t + b,
            self.read[1].stop - self.read[1].start + lf + rt,
        )


def _check(tile: int, halo: int) -> None:
    if tile < 1 or halo < 0:
        raise ValueError(f"tile must be >= 1 and halo >= 0, got tile={tile}, halo={halo}")


def _axis(start: int, stop: int, halo: int, size: int) -> slice:
    """Read slice along one axis: ``halo`` more on each side, none beyond the image border."""
    return slice(max(start - halo, 0), min(stop + halo, size))


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` (>= 1) that is >= ``value``."""
    multiple = max(int(multiple), 1)
    return -(-int(value) // multiple) * multiple


def grid_shape(shape: tuple[int, int], tile: int) -> tuple[int, int]:
    """Number of window rows and columns over ``shape`` for ``tile``."""
    return math.ceil(shape[0] / tile), math.ceil(shape[1] / tile)


def balanced_tile(shape: tuple[int, int], tile: int, multiple: int = 1) -> int:
    """The smallest multiple of ``multiple`` (at most ``tile``) that splits ``shape`` into as many
    windows as ``tile`` does. Every window then reads the same halo, so the image's forward pixels
    are the same (its rows read ``H + 2 halo (n - 1)`` px whatever the tile), but the largest window,
    and so one model call's memory, is smaller: no short last row or column of windows."""
    rows, cols = grid_shape(shape, tile)
    balanced = round_up(max(math.ceil(shape[0] / rows), math.ceil(shape[1] / cols)), max(multiple, 1))
    return balanced if grid_shape(shape, balanced) == (rows, cols) and balanced <= tile else tile


def window_at(shape: tuple[int, int], tile: int, halo: int, row: int, col: int) -> Window:
    """The window in grid position (``row``, ``col``): its write region starts at (row, col) * tile."""
    _check(tile, halo)
    height, width = shape
    r, c = row * tile, col * tile
    if not (0 <= r < height and 0 <= c < width):
        raise IndexError(f"window ({row}, {col}) is outside the {grid_shape(shape, tile)} grid of {shape}")
    write = (slice(r, min(r + tile, height)), slice(c, min(c + tile, width)))
    read = (_axis(r, write[0].stop, halo, height), _axis(c, write[1].stop, halo, width))
    return Window(read=read, pad=((0, 0), (0, 0)), write=write)


def split_windows(shape: tuple[int, int], tile: int, halo: int) -> Iterator[Window]:
    """Yield windows whose write regions are the ``tile`` x ``tile`` grid over ``shape``, row by row.

    Edge windows own smaller write regions and read no halo beyond the image border, so they
    are smaller than the ``tile + 2 * halo`` interior windows (see :func:`shape_batches`).
    """
    _check(tile, halo)
    rows, cols = grid_shape(shape, tile)
    for i in range(rows):
        for j in range(cols):
            yield window_at(shape, tile, halo, i, j)


def union_read(windows: Sequence[Window]) -> Slice2D:
    """The smallest region covering every window's read region (one read for a band of windows)."""
    return (
        slice(min(w.read[0].start for w in windows), max(w.read[0].stop for w in windows)),
        slice(min(w.read[1].start for w in windows), max(w.read[1].stop for w in windows)),
    )


def shape_batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Runs of consecutive windows with one padded shape, at most ``batch_size`` each, in order:
    each run stacks into one model call (a row of windows has at most three shapes)."""
    run: list[Window] = []
    for w in windows:
        if run and (len(run) == batch_size or w.padded_shape != run[0].padded_shape):
            yield run
            run = []
        run.append(w)
    if run:
        yield run


def strip_groups(windows: Sequence[Window], max_px: int, multiple: int = 1) -> Iterator[list[Window]]:
    """Runs of consecutive windows of one row whose union read region, padded to ``multiple``, has
    at most ``max_px`` pixels (a lone window is always a run): each run is one forward pass over
    that union, a strip. Neighbours in a strip share their halo instead of each reading it, so a
    4096² scan at tile 2784 and halo 224 evaluates x1.11 pixels in two strips instead of x1.23 in
    four windows; every written pixel still has ``halo`` px of context (or the image border)."""
    run: list[Window] = []
    for w in windows:
        if run:
            rows, cols = union_read([*run, w])
            px = round_up(rows.stop - rows.start, multiple) * round_up(cols.stop - cols.start, multiple)
            if w.read[0] != run[0].read[0] or px > max_px:
                yield run
                run = []
        run.append(w)
    if run:
        yield run


def strip_cols(shape: tuple[int, int], tile: int, halo: int, max_px: int, multiple: int = 1) -> int:
    """The most windows of a row whose strip (see :func:`strip_groups`) fits ``max_px`` (at least 1)."""
    height = round_up(min(shape[0], tile + 2 * halo), multiple)
    cols = grid_shape(shape, tile)[1]
    fits = [n for n in range(1, cols + 1) if height * round_up(min(shape[1], n * tile + 2 * halo), multiple) <= max_px]
    return max(fits, default=1)


def reflect_pad(block: np.ndarray, pad: Pad2D) -> np.ndarray:
    """Pad the last two axes by reflection about the edge pixels (numpy ``reflect``, repeated
    for pads wider than the block, so it matches reflecting the whole image); a one-pixel
    axis is repeated instead."""
    if pad == ((0, 0), (0, 0)):
        return block
    if _is_tensor(block):
        return _reflect_pad_tensor(block, pad)
    full = [(0, 0)] * (block.ndim - 2) + list(pad)
    if min(block.shape[-2:]) > 1:
        return np.pad(block, full, mode="reflect")
    return np.pad(block, full, mode="edge")


def _reflect_pad_tensor(block, pad: Pad2D):  # noqa: ANN001, ANN202 (torch is optional here)
    """:func:`reflect_pad` for a (N, C, h, w) or (C, h, w) tensor; torch's reflect mode needs pads
    smaller than the block, so larger ones (tiny images) go through numpy, with the same result."""
    import torch
    import torch.nn.functional as F

    (top, bottom), (left, right) = pad
    h, w = block.shape[-2:]
    if max(top, bottom) < h and max(left, right) < w and min(h, w) > 1 and block.dtype.is_floating_point:
        x = block if block.ndim == 4 else block[None]
        out = F.pad(x, (left, right, top, bottom), mode="reflect")
        return out if block.ndim == 4 else out[0]
    return torch.from_numpy(reflect_pad(block.cpu().numpy(), pad)).to(block.device)


def read_window(image: np.ndarray, window: Window) -> np.ndarray:
    """Cut ``window`` out of a (C, H, W) array (or anything sliceable the same way) and pad it."""
    return reflect_pad(np.asarray(image[(slice(None), *window.read)]), window.pad)


def region_in(array: np.ndarray, origin: tuple[int, int], region: Slice2D) -> np.ndarray:
    """The part of an in-memory (..., h, w) ``array`` whose top-left pixel is image pixel ``origin``
    (a band read with :func:`union_read`, a strip's probabilities) under the image ``region``."""
    rows, cols = region
    return array[..., rows.start - origin[0]:rows.stop - origin[0], cols.start - origin[1]:cols.stop - origin[1]]


def window_from_block(block: np.ndarray, origin: tuple[int, int], window: Window) -> np.ndarray:
    """Cut ``window`` out of an in-memory (C, h, w) ``block`` whose top-left pixel is image
    pixel ``origin`` (e.g. a band read with :func:`union_read`), and pad it."""
    return reflect_pad(region_in(block, origin, window.read), window.pad)


def predict_tiled(
    image: np.ndarray,
    predict: PredictFn,
    tile: int,
    halo: int,
    batch_size: int = 8,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Predict a (C, H, W) image window by window and merge write regions into ``out``.

    ``out`` may be any array-like supporting slice assignment (numpy, zarr); by default a
    float32 numpy array of shape (K, H, W) is created from the first batch.
    """
    for chunk in shape_batches(list(split_windows(image.shape[-2:], tile, halo)), batch_size):
        batch = np.stack([read_window(image, w) for w in chunk]).astype(np.float32, copy=False)
        pred = predict(batch)
        if out is None:
            out = np.zeros((pred.shape[1], *image.shape[-2:]), dtype=np.float32)
        for w, p in zip(chunk, pred, strict=True):
            out[(slice(None), *w.write)] = p[(slice(None), *w.crop)]
    if out is None:
        raise ValueError(f"predict_tiled: image of shape {image.shape} has no pixels")
    return out


def predict_whole(image: np.ndarray, predict: PredictFn, multiple: int = 1) -> np.ndarray:
    """The reference tiling must reproduce: the whole (C, H, W) image in one call, reflect-padded
    (bottom/right) only to ``multiple`` (a no-op when ``predict`` already pads), cropped back to (K, H, W)."""
    return pad_to_multiple(predict, multiple)(np.asarray(image, dtype=np.float32)[None])[0]


def pad_to_multiple(predict: PredictFn, multiple: int) -> PredictFn:
    """Wrap ``predict`` so inputs are reflect-padded (bottom/right) to a multiple of
    ``multiple`` (a U-Net's total stride) and outputs cropped back."""
    if multiple <= 1:
        return predict

    def wrapped(batch: np.ndarray) -> np.ndarray:
        h, w = batch.shape[-2:]
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph == 0 and pw == 0:
            return predict(batch)
        return predict(reflect_pad(batch, ((0, ph), (0, pw))))[..., :h, :w]

    return wrapped


FLIPS: dict[str, tuple[int, ...]] = {"none": (), "h": (-1,), "v": (-2,), "hv": (-2, -1)}


def flip_tta(predict: PredictFn, flips: Sequence[str] = ("none", "h", "v", "hv")) -> PredictFn:
    """Test-time augmentation: mean of the probabilities over ``flips`` (each undone on the output)."""
    unknown = [f for f in flips if f not in FLIPS]
    if unknown or not flips:
        raise ValueError(f"flip_tta: unknown flips {unknown}; choose from {sorted(FLIPS)}")

    def one(batch: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        if not axes:
            return predict(batch)
        return _flip(predict(_flip(batch, axes)), axes)

    def wrapped(batch: np.ndarray) -> np.ndarray:
        total = one(batch, FLIPS[flips[0]])
        total = total.float().clone() if _is_tensor(total) else total.astype(np.float32, copy=True)
        for name in flips[1:]:
            total += one(batch, FLIPS[name])
        return total / len(flips)

    return wrapped


@lru_cache(maxsize=8)
def gaussian_weights(height: int, width: int, sigma_scale: float = 0.125) -> np.ndarray:
    """A (height, width) Gaussian importance map (nnU-Net style: sigma = size / 8), min 1e-3, max 1."""

    def axis(n: int) -> np.ndarray:
        r = np.arange(n, dtype=np.float64) - (n - 1) / 2
        return np.exp(-(r**2) / (2 * (sigma_scale * n) ** 2))

    w = np.outer(axis(height), axis(width))
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def _starts(length: int, size: int, step: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def blended_predictor(predict: PredictFn, sub_tile: int, overlap: float = 0.5) -> PredictFn:
    """Predict each (N, C, h, w) window as overlapping ``sub_tile`` squares blended with
    Gaussian weights; ``overlap`` is the fraction of ``sub_tile`` shared by neighbours."""
    if sub_tile < 1 or not 0 <= overlap < 1:
        raise ValueError(f"blend: need sub_tile >= 1 and 0 <= overlap < 1, got {sub_tile}, {overlap}")
    step = max(1, int(round(sub_tile * (1 - overlap))))

    def wrapped(batch: np.ndarray) -> np.ndarray:
        h, w = batch.shape[-2:]
        sh, sw = min(sub_tile, h), min(sub_tile, w)
        weight = gaussian_weights(sh, sw)
        positions = [(r, c) for r in _starts(h, sh, step) for c in _starts(w, sw, step)]
        norm = np.zeros((h, w), dtype=np.float32)
        acc = None
        for r, c in positions:
            sub = batch[..., r : r + sh, c : c + sw]
            p = predict(sub.contiguous() if _is_tensor(sub) else np.ascontiguousarray(sub))
            if acc is None:
                acc = p.new_zeros((batch.shape[0], p.shape[1], h, w)) if _is_tensor(p) else \
                    np.zeros((batch.shape[0], p.shape[1], h, w), dtype=np.float32)
                wt = p.new_tensor(weight) if _is_tensor(p) else weight
            acc[..., r : r + sh, c : c + sw] += p * wt
            norm[r : r + sh, c : c + sw] += weight
        return acc / (acc.new_tensor(norm) if _is_tensor(acc) else norm)

    return wrapped


def forward_pixels_per_output(tile: int, halo: int, tta: int = 1, blend_factor: float = 1.0) -> float:
    """How many pixels the model evaluates per output pixel (halo, flips and blending overhead)."""
    return ((tile + 2 * halo) / tile) ** 2 * tta * blend_factor


def forward_pixels(shape: tuple[int, int], tile: int, halo: int, multiple: int = 1) -> float:
    """Model pixels evaluated per output pixel when tiling an image of ``shape`` (border windows
    read no outer halo; every window is padded to ``multiple``): the real cost, unlike the
    interior-window bound :func:`forward_pixels_per_output`."""
    total = 0
    for w in split_windows(shape, tile, halo):
        h, wd = w.padded_shape
        total += round_up(h, multiple) * round_up(wd, multiple)
    return total / (shape[0] * shape[1])
