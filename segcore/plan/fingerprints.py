"""The plan's first job: a dataset's fingerprint (``gigaseg plan DATA`` prints it).

:func:`fingerprint` reads a bounded sample of a dataset (at most ``max_pixels`` image pixels
from at most ``max_images`` images, a centred window of each) and measures what a recipe
depends on: image sizes, channels, dtype and value range, class frequencies and, per class, the
size of its objects (thickness = 2 x the median of the distance transform on the ridge of its
connected components, extent = median of the components' larger bounding-box side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcore.data.errors import DataError
from segcore.data.spec import IGNORE, DatasetSpec, load_spec

MAX_PIXELS = 16 << 20  # image px read by a fingerprint
MAX_IMAGES = 32  # images opened by a fingerprint


@dataclass
class ClassStats:
    """One class in the sample: share of labelled px and the size of its connected components."""

    name: str
    fraction: float
    components: int = 0
    thickness_px: float | None = None
    extent_px: float | None = None


@dataclass
class Fingerprint:
    """What a dataset looks like, measured on a bounded sample (see the module doc)."""

    data_dir: str
    n_images: int
    sampled_images: int
    pixels_read: int
    median_size: tuple[int, int]
    min_side: int
    total_pixels: int
    channels: int
    dtype: str
    value_range: tuple[float, float]  # (0.5, 99.5) percentiles of the sampled pixels
    dtype_fraction: float  # share of an integer dtype's range the sample spans (1 for floats)
    has_pedestal: bool
    mask_scale: float
    classes: list[ClassStats] = field(default_factory=list)

    def summary(self) -> str:
        """One line per fact, for the CLI."""
        h, w = self.median_size
        lines = [f"{self.n_images} images ({self.sampled_images} sampled, {self.pixels_read:,} px read), "
                 f"median {h} x {w} px, {self.channels} channel(s), {self.dtype}, "
                 f"values {self.value_range[0]:g}..{self.value_range[1]:g}"]
        for c in self.classes:
            size = (f"thickness {c.thickness_px:.1f} px, extent {c.extent_px:.0f} px ({c.components} objects)"
                    if c.thickness_px is not None else "no objects in the sample")
            lines.append(f"class {c.name}: {100 * c.fraction:.2f} % of px, {size}")
        return "\n".join(lines)


def object_sizes(binary: np.ndarray) -> tuple[int, float | None, float | None]:
    """(components, thickness, extent) of the objects in a boolean mask.

    Thickness: 2 x the median distance-transform value on the ridge (local maxima) of the
    components, i.e. their typical width; extent: the median larger bounding-box side.
    """
    from scipy import ndimage

    labels, n = ndimage.label(binary)
    if n == 0:
        return 0, None, None
    dist = ndimage.distance_transform_edt(binary)
    ridge = binary & (dist >= ndimage.maximum_filter(dist, size=3))
    thickness = 2.0 * float(np.median(dist[ridge]))
    sides = [max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndimage.find_objects(labels)]
    return n, thickness, float(np.median(sides))


def _image_files(data_dir: Path) -> list[Path]:
    from segcore.data.shared import index_files

    return [p for paths in index_files(data_dir / "images").values() for p in paths]


def _spread_pick(items: list[Any], n: int) -> list[Any]:
    """``n`` items evenly spread over ``items`` (deterministic)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] if n > 1 else items[0] for i in range(n)]


def _window(shape: tuple[int, int], max_px: int) -> tuple[slice, slice]:
    """A centred window of at most ``max_px`` pixels."""
    h, w = shape
    side = max(16, int(math.sqrt(max_px)))
    wh, ww = min(h, side), min(w, side)
    if wh * ww > max_px and wh < side:  # a thin image: widen the other side
        ww = min(w, max_px // max(wh, 1))
    if ww * wh > max_px and ww < side:
        wh = min(h, max_px // max(ww, 1))
    top, left = (h - wh) // 2, (w - ww) // 2
    return slice(top, top + wh), slice(left, left + ww)


@dataclass
class _Reading:
    """Accumulated sample of several images."""

    values: list[np.ndarray] = field(default_factory=list)
    counts: np.ndarray | None = None
    masks: list[np.ndarray] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    pixels: int = 0
    channels: int = 1
    dtype: str = "uint8"
    pedestal: bool = False
    mask_scale: float = 1.0


def _read_one(image: Path, spec: DatasetSpec, masks: dict[str, list[Path]], budget: int, acc: _Reading) -> None:
    """Read a window of each image of ``image`` (FITS: each HDU) and its mask into ``acc``."""
    from segcore.data.io import RawImage, open_image_sources
    from segcore.data.shared import find_mask, mask_stem, read_mask_for

    stem = mask_stem(image, spec, masks)
    sources = open_image_sources(image)
    try:
        for src in sources:
            raw = RawImage(src.name, np.empty(0), src.header, max(src.index, 0), getattr(src, "extname", None))
            mask_path, from_fits = find_mask(image, raw, len(sources), stem, masks)
            mask = read_mask_for(raw, mask_path, from_fits, spec)
            scale = spec.mask_scale_for(src.shape, mask.shape, f"{image} (mask {mask_path.name})")
            rows, cols = _window(src.shape, max(256, budget // len(sources)))
            pixels = np.asarray(src.read(rows, cols))
            mrows = slice(int(rows.start / scale), max(int(rows.start / scale) + 1, int(rows.stop / scale)))
            mcols = slice(int(cols.start / scale), max(int(cols.start / scale) + 1, int(cols.stop / scale)))
            acc.values.append(pixels.reshape(-1, src.channels)[:: max(1, pixels.size // (1 << 18))])
            acc.masks.append(mask[mrows, mcols])
            acc.shapes.append(tuple(int(v) for v in src.shape))
            acc.pixels += int(pixels.shape[0] * pixels.shape[1])
            acc.channels, acc.dtype, acc.mask_scale = src.channels, str(src.dtype), scale
            acc.pedestal |= bool(src.header and "PEDESTAL" in src.header)
    finally:
        for src in sources:
            src.close()


def _class_stats(spec: DatasetSpec, masks: list[np.ndarray], scale: float) -> list[ClassStats]:
    """Per class: labelled share and object sizes (in image px: mask px x ``scale``)."""
    k = spec.num_classes
    counts = sum(np.bincount(m[m != IGNORE].ravel().astype(np.int64), minlength=k)[:k] for m in masks)
    total = max(int(np.sum(counts)), 1)
    out = []
    for cid, name in enumerate(spec.class_names):
        n, thick, extent = 0, [], []
        for m in masks:
            c, t, e = object_sizes(m == cid)
            if c:
                n, thick, extent = n + c, thick + [t], extent + [e]
        out.append(ClassStats(name, float(counts[cid]) / total, n,
                              float(np.median(thick)) * scale if thick else None,
                              float(np.median(extent)) * scale if extent else None))
    return out


def fingerprint(data_dir: str | Path, max_pixels: int = MAX_PIXELS, max_images: int = MAX_IMAGES) -> Fingerprint:
    """Measure a dataset on at most ``max_pixels`` image px of at most ``max_images`` images."""
    from segcore.data.shared import index_files

    data_dir = Path(data_dir)
    spec = load_spec(data_dir)
    files = _image_files(data_dir)
    if not files:
        raise DataError(data_dir / "images", "no images (PNG, JPEG, TIFF or FITS) found", "add images")
    picked = _spread_pick(files, max_images)
    masks, acc = index_files(data_dir / "masks"), _Reading()
    for image in picked:
        _read_one(image, spec, masks, max_pixels // len(picked), acc)
    values = np.concatenate(acc.values).astype(np.float64)
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    heights, widths = zip(*acc.shapes)
    per_image = float(np.mean([h * w for h, w in acc.shapes]))
    return Fingerprint(
        data_dir=str(data_dir), n_images=len(files), sampled_images=len(picked), pixels_read=acc.pixels,
        median_size=(int(np.median(heights)), int(np.median(widths))), min_side=int(min(min(heights), min(widths))),
        total_pixels=int(per_image * len(files) * len(acc.shapes) / len(picked)), channels=acc.channels,
        dtype=acc.dtype, value_range=(low, high), dtype_fraction=_dtype_fraction(acc.dtype, low, high),
        has_pedestal=acc.pedestal, mask_scale=acc.mask_scale, classes=_class_stats(spec, acc.masks, acc.mask_scale),
    )


def _dtype_fraction(dtype: str, low: float, high: float) -> float:
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.integer):
        return 1.0
    info = np.iinfo(dt)
    return (high - low) / (float(info.max) - float(info.min))
