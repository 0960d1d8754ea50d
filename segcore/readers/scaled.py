"""Images seen at a model's resolution: ``scale`` image px per model px.

A model trained at ``data.scale`` S sees S x S area means of the scan (exact block means for
integer S, area-weighted for others). :class:`ScaledSource` gives that view of any
:class:`~segcore.readers.ImageSource`, so ``gigaseg segment`` reads windows exactly as training
read patches (:mod:`segcore.data.lazy` uses the same :func:`area_resample`). Labels predicted
on the model grid go back to the input's grid with :func:`upsample_write` (nearest).
"""

from __future__ import annotations

import math

import numpy as np

from segcore.readers.base import ImageSource


def _area_weights(start: float, n_out: int, scale: float, first: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights: output ``u`` averages input px ``first + i`` over the interval
    ``[start + u * scale, start + (u + 1) * scale)`` (exact area weighting)."""
    lo = start + np.arange(n_out)[:, None] * scale
    px = first + np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(px + 1, lo + scale) - np.maximum(px, lo), 0, None)
    return overlap / scale


def block_mean(region: np.ndarray, k: int) -> np.ndarray:
    """(h/k, w/k, C) float64 means of k x k blocks of ``region`` (h, w, C). 8/16-bit pixels are
    summed as 32-bit integers (exact, ~9x faster than converting the region to float64)."""
    h, w, c = region.shape
    if region.dtype.kind in "ui" and region.dtype.itemsize <= 2 and k <= 256:
        acc = np.uint32 if region.dtype.kind == "u" else np.int32
        rows = region.reshape(h // k, k, w, c).sum(axis=1, dtype=acc)
        return rows.reshape(h // k, w // k, k, c).sum(axis=2, dtype=acc) / float(k * k)
    return region.astype(np.float64, copy=False).reshape(h // k, k, w // k, k, c).mean(axis=(1, 3))


def area_resample(region: np.ndarray, scale: float, origin: tuple[float, float], first: tuple[int, int],
                  out: tuple[int, int]) -> np.ndarray:
    """Area-average ``region`` (h, w, C) whose pixel (0, 0) is image px ``first`` onto ``out``
    model px starting at image coordinate ``origin`` (float64 result, (out_h, out_w, C))."""
    s = float(scale)
    if s == int(s) and origin == first and region.shape[0] == out[0] * s and region.shape[1] == out[1] * s:
        return block_mean(region, int(s))  # the common case
    region = region.astype(np.float64, copy=False)
    wy = _area_weights(origin[0], out[0], s, first[0], region.shape[0])
    wx = _area_weights(origin[1], out[1], s, first[1], region.shape[1])
    return np.einsum("ui,ijc,vj->uvc", wy, region, wx, optimize=True)


def model_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """An image's size on the model grid (whole model px only, at least 1)."""
    return max(1, int(shape[0] // scale)), max(1, int(shape[1] // scale))


EPS = 1e-9  # float slack when mapping model px to image px


def pick_level(source: ImageSource, rows: slice, cols: slice, scale: float) -> int:
    """The largest stored pyramid level factor ``f`` dividing ``scale`` of ``source`` that holds
    all the pixels under model px ``[rows, cols]`` (1: level 0). A level ``f`` times smaller is
    taken to hold ``f x f`` block means of level 0, so (model px edges falling on level px edges)
    means over it equal those over level 0 up to the level's own rounding, from ``f**2`` times
    fewer pixels. Non-integer ratios would blur model px edges, so they read level 0."""
    for f in sorted(source.level_factors, reverse=True):
        if f <= scale + EPS and abs(scale / f - round(scale / f)) < EPS:
            height, width = source.level_shape(f)
            s = scale / f
            if math.ceil(rows.stop * s - EPS) <= height and math.ceil(cols.stop * s - EPS) <= width:
                return f
    return 1


def read_scaled(source: ImageSource, rows: slice, cols: slice, scale: float) -> np.ndarray:
    """Model px ``[rows, cols]`` of ``source`` at ``scale``: (h, w) or (h, w, C) float64 area means
    of the image px under them, read from the best stored pyramid level (:func:`pick_level`);
    only that region is read."""
    f = pick_level(source, rows, cols, scale)
    s = scale / f
    height, width = source.shape if f == 1 else source.level_shape(f)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    y0, x0 = rows.start * s, cols.start * s
    r0, c0 = int(math.floor(y0 + EPS)), int(math.floor(x0 + EPS))
    r1 = min(int(math.ceil(rows.stop * s - EPS)), height)
    c1 = min(int(math.ceil(cols.stop * s - EPS)), width)
    if f == 1:
        region = source.read(slice(r0, r1), slice(c0, c1))
    else:
        region = source.read_level(f, slice(r0, r1), slice(c0, c1))
    flat = region.ndim == 2
    out = area_resample(region[..., None] if flat else region, s, (y0, x0), (r0, c0), (h, w))
    return out[..., 0] if flat else out


class ScaledSource(ImageSource):
    """The model-grid view of ``base`` at ``scale`` image px per model px.

    ``read`` returns float64 area means; ``sample`` and ``dtype`` stay the base image's, so
    normalisation statistics are computed exactly as in training (on the full-resolution sample).
    """

    def __init__(self, base: ImageSource, scale: float) -> None:
        super().__init__(base.path, name=base.name, index=base.index, header=base.header)
        self.base, self.scale = base, float(scale)
        self.shape = model_shape(base.shape, self.scale)
        self.channels, self.dtype = base.channels, base.dtype
        self.slow_random_access = base.slow_random_access
        self.block_rows = max(1, int(base.block_rows / self.scale)) if base.block_rows else 0

    def _read(self, rows: slice, cols: slice) -> np.ndarray:
        return read_scaled(self.base, rows, cols, self.scale)

    def sample(self, max_pixels: int = 1 << 20) -> np.ndarray:
        return self.base.sample(max_pixels)

    def close(self) -> None:
        self.base.close()


def scaled(source: ImageSource, scale: float) -> ImageSource:
    """``source`` itself at scale 1, else its :class:`ScaledSource`."""
    return source if float(scale) == 1.0 else ScaledSource(source, scale)


def output_factor(scale: float) -> int:
    """Full-resolution label writes need a whole number of input px per model px: the factor to
    upsample by (1 when ``scale`` is not an integer: labels then stay on the model grid)."""
    return int(scale) if float(scale) == int(scale) and scale >= 1 else 1


def upsample_write(write: tuple[slice, slice], values: np.ndarray, factor: int, grid: tuple[int, int],
                   full: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
    """Where and what to write at full resolution for model-grid ``values`` (..., h, w) at
    ``write``: each model px becomes ``factor`` x ``factor`` input px (nearest); windows at the
    grid's bottom/right edge also cover the input px beyond the last whole model px."""
    if factor == 1:
        return write, values
    (rows, cols), out = write, np.repeat(np.repeat(values, factor, -2), factor, -1)
    r0, c0 = rows.start * factor, cols.start * factor
    r1 = full[0] if rows.stop == grid[0] else rows.stop * factor
    c1 = full[1] if cols.stop == grid[1] else cols.stop * factor
    pad = [(0, 0)] * (out.ndim - 2) + [(0, r1 - r0 - out.shape[-2]), (0, c1 - c0 - out.shape[-1])]
    if any(p[1] for p in pad):
        out = np.pad(out, pad, mode="edge")
    return (slice(r0, r1), slice(c0, c1)), out
