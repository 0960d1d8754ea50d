"""Colour previews of label maps: palettes, colourising, side-by-side overlays (PIL only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Distinct, colour-blind-friendly-ish defaults (Okabe-Ito first), extended by a hash palette.
_BASE = [(0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
         (0, 114, 178), (213, 94, 0), (204, 121, 167), (255, 255, 255)]


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(1234)
    extra = [tuple(int(v) for v in rng.integers(40, 255, 3)) for _ in range(max(0, num_classes - len(_BASE)))]
    return (_BASE + extra)[:num_classes]


def colorize(labels: np.ndarray, colors: Sequence[Sequence[int]] | None, num_classes: int | None = None) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ids outside the palette (e.g. 255 ignore) become grey."""
    k = num_classes or (len(colors) if colors else int(labels.max()) + 1)
    lut = np.full((256, 3), 128, dtype=np.uint8)
    lut[:k] = np.asarray(colors[:k] if colors else default_palette(k), dtype=np.uint8)
    return lut[labels.astype(np.uint8)]


def to_grey_uint8(image: np.ndarray) -> np.ndarray:
    """(C, H, W) or (H, W) float image -> (H, W) uint8 stretched to its 1-99 percentiles."""
    img = image[0] if image.ndim == 3 else image
    lo, hi = np.percentile(img, [1, 99])
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def legend_strip(class_names: Sequence[str], colors: Sequence[Sequence[int]], width: int) -> Image.Image:
    """A white strip with one colour swatch and name per class."""
    row = 18
    strip = Image.new("RGB", (max(width, 160), row * len(class_names) + 6), "white")
    draw = ImageDraw.Draw(strip)
    for i, (name, color) in enumerate(zip(class_names, colors)):
        y = 3 + i * row
        draw.rectangle([4, y, 18, y + 14], fill=tuple(int(c) for c in color), outline="black")
        draw.text((24, y + 1), str(name), fill="black")
    return strip


def save_prediction_panel(
    path: str | Path,
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray,
    class_names: Sequence[str],
    colors: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Write image | truth | prediction side by side with a legend, as PNG."""
    colors = list(colors) if colors else default_palette(len(class_names))
    panels = [np.repeat(to_grey_uint8(image)[..., None], 3, axis=2)]
    if truth is not None:
        panels.append(colorize(truth, colors, len(class_names)))
    panels.append(colorize(pred, colors, len(class_names)))
    top = Image.fromarray(np.concatenate(panels, axis=1))
    legend = legend_strip(class_names, colors, top.width)
    canvas = Image.new("RGB", (max(top.width, legend.width), top.height + legend.height), "white")
    canvas.paste(top, (0, 0))
    canvas.paste(legend, (0, top.height))
    path = Path(path)
    canvas.save(path)
    return path
