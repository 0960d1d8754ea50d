"""Lines and ellipses on noise (the synthetic benchmark of patch-trained U-Nets, mIoU ~0.97).

Classes: 0 background, 1 line, 2 ellipse. Shapes are visible (lines 3-5 px wide and brighter
than the grey ellipses) and the noise moderate, so a small U-Net learns them in CPU-minutes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from segcore.data.spec import DatasetSpec
from segcore.errors import ConfigError
from segcore.simulate.common import prepare_dataset_dir, rng_for, write_spec

log = logging.getLogger(__name__)

CLASSES = ["background", "line", "ellipse"]


def _ellipse(yy: np.ndarray, xx: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    a, b = rng.uniform(0.05, 0.16, 2) * size
    a, b = max(a, 5.0), max(b, 4.0)
    t = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _line(yy: np.ndarray, xx: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    p0 = rng.uniform(0.05, 0.95, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.3, 0.9) * size
    p1 = p0 + length * np.array([np.sin(angle), np.cos(angle)])
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / float(d @ d), 0.0, 1.0)
    dist2 = (yy - p0[0] - t * d[0]) ** 2 + (xx - p0[1] - t * d[1]) ** 2
    return dist2 <= (rng.uniform(3.0, 5.0) / 2) ** 2


def render_shapes(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``size`` x ``size`` uint8 image and its uint8 mask (0 background, 1 line, 2 ellipse)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    clean = np.full((size, size), rng.uniform(70, 100), np.float32)
    clean += rng.uniform(-15, 15) * (xx / size - 0.5)  # gentle illumination gradient
    for _ in range(int(rng.integers(2, 6))):
        inside = _ellipse(yy, xx, size, rng)
        clean[inside] = rng.uniform(140, 165)
        mask[inside] = 2
    for _ in range(int(rng.integers(2, 6))):
        inside = _line(yy, xx, size, rng)
        clean[inside] = rng.uniform(205, 230)
        mask[inside] = 1
    image = gaussian_filter(clean, 0.7) + rng.normal(0, 10, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def generate_shapes(out: str | Path, n: int, size: int = 128, seed: int = 0) -> Path:
    """Write ``n`` 8-bit PNG images + class-id PNG masks + dataset.yaml into ``out``."""
    if n < 1 or size < 16:
        raise ConfigError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    images, masks = prepare_dataset_dir(out)
    for i in range(n):
        image, mask = render_shapes(size, rng_for(seed, i))
        Image.fromarray(image).save(images / f"shapes_{i:04d}.png")
        Image.fromarray(mask).save(masks / f"shapes_{i:04d}.png")
    spec = DatasetSpec(class_names=CLASSES, normalize={"mode": "dtype_range"},
                       description=f"gigaseg simulate shapes: {n} images of {size} px, seed {seed}")
    write_spec(out, spec)
    log.info("wrote %d shapes images (%d px) to %s", n, size, out)
    return Path(out)
