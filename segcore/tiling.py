"""Tiling in three parts: a splitter that yields windows, a predictor, and a merger.

A :class:`Window` keeps three regions apart (after MONAI's inferers and StarDist's ``big.py``):

* ``write``: the output pixels this window owns. Write regions tile the image exactly once
  and line up with output chunks, so parallel workers write without locks.
* ``read``: ``write`` grown by ``halo`` on every side and clipped to the image; the pixels read.
* ``pad``: how far the grown region sticks out of the image on each side; filled by reflection.

The predictor sees ``reflect_pad(image[read], pad)``, and only ``crop`` of its output
(the write region in window coordinates) is kept. With a halo at least the model's
receptive-field reach, tiled prediction equals whole-image prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

Slice2D = tuple[slice, slice]
Pad2D = tuple[tuple[int, int], tuple[int, int]]


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


def _axis(start: int, stop: int, halo: int, size: int) -> tuple[slice, tuple[int, int]]:
    lo, hi = start - halo, stop + halo
    return slice(max(lo, 0), min(hi, size)), (max(-lo, 0), max(hi - size, 0))


def split_windows(shape: tuple[int, int], tile: int, halo: int) -> Iterator[Window]:
    """Yield windows whose write regions are the ``tile`` x ``tile`` grid over ``shape``.

    Edge windows own smaller write regions; every window is padded to a common
    ``tile + 2 * halo`` square so batches stack (padding beyond the image is reflected).
    """
    if tile < 1 or halo < 0:
        raise ValueError(f"tile must be >= 1 and halo >= 0, got tile={tile}, halo={halo}")
    height, width = shape
    for r in range(0, height, tile):
        for c in range(0, width, tile):
            rs, rp = _axis(r, min(r + tile, height), halo, height)
            cs, cp = _axis(c, min(c + tile, width), halo, width)
            # grow padding at the far side so every window has the same padded shape
            rp = (rp[0], rp[1] + tile - (min(r + tile, height) - r))
            cp = (cp[0], cp[1] + tile - (min(c + tile, width) - c))
            yield Window(read=(rs, cs), pad=(rp, cp), write=(slice(r, min(r + tile, height)), slice(c, min(c + tile, width))))


def reflect_pad(block: np.ndarray, pad: Pad2D) -> np.ndarray:
    """Pad the last two axes by reflection; falls back to symmetric for pads wider than the block."""
    if pad == ((0, 0), (0, 0)):
        return block
    full = [(0, 0)] * (block.ndim - 2) + list(pad)
    h, w = block.shape[-2:]
    mode = "reflect" if max(pad[0]) < h and max(pad[1]) < w else "symmetric"
    if mode == "symmetric" and (max(pad[0]) >= 2 * h or max(pad[1]) >= 2 * w):
        mode = "edge"
    return np.pad(block, full, mode=mode)


def read_window(image: np.ndarray, window: Window) -> np.ndarray:
    """Cut ``window`` out of a (C, H, W) array (or anything sliceable the same way) and pad it."""
    return reflect_pad(np.asarray(image[(slice(None), *window.read)]), window.pad)


PredictFn = Callable[[np.ndarray], np.ndarray]  # (N, C, h, w) float32 -> (N, K, h, w) float32


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
    windows = list(split_windows(image.shape[-2:], tile, halo))
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        batch = np.stack([read_window(image, w) for w in chunk]).astype(np.float32, copy=False)
        pred = predict(batch)
        if out is None:
            out = np.zeros((pred.shape[1], *image.shape[-2:]), dtype=np.float32)
        for w, p in zip(chunk, pred):
            out[(slice(None), *w.write)] = p[(slice(None), *w.crop)]
    assert out is not None
    return out
