"""Shared helpers for the synthetic generators: output folders, dataset.yaml, seeding, and a
counter-based hash so huge images can be rendered window by window, identically."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from segcore.data.spec import SPEC_FILE, DatasetSpec

log = logging.getLogger(__name__)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def prepare_dataset_dir(out: str | Path) -> tuple[Path, Path]:
    """Create ``out/images`` and ``out/masks``; returns both."""
    out = Path(out)
    images, masks = out / "images", out / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    return images, masks


def write_spec(out: str | Path, spec: DatasetSpec) -> Path:
    """Write ``out/dataset.yaml`` so :func:`segcore.data.load_samples` reads the folder as meant."""
    path = Path(out) / SPEC_FILE
    path.write_text(spec.to_yaml())
    return path


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator per (seed, keys...), e.g. per image index."""
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays: a fast, well-mixed integer hash."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash2d(seed: int, salt: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """uint64 hash of integer grid coordinates (broadcasting ``rows`` against ``cols``)."""
    with np.errstate(over="ignore"):
        key = mix64(np.uint64((int(seed) * 0x1000193 + int(salt) * 0x51ED27) & 0xFFFFFFFFFFFFFFFF))
        r = np.asarray(rows, dtype=np.int64).astype(np.uint64)
        c = np.asarray(cols, dtype=np.int64).astype(np.uint64)
        return mix64(mix64(r * _GOLD + key) ^ c)


def unit(h: np.ndarray) -> np.ndarray:
    """Top 24 bits of a hash as float32 uniform in [0, 1)."""
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def gauss(h: np.ndarray) -> np.ndarray:
    """Approximately standard normal float32 from one hash (sum of four 16-bit uniforms)."""
    mask = np.uint64(0xFFFF)
    s = sum(((h >> np.uint64(16 * i)) & mask).astype(np.float32) for i in range(4))
    # four U(0, 65536) have mean 131070 and std 4 * 65536 / sqrt(12) / 2 = 37837.2
    return (s - np.float32(131070.0)) * np.float32(1.0 / 37837.2)
