"""The base of the reader layer: :class:`ImageSource` and the reader registry that the readers
(:mod:`.tiff`, :mod:`.fits`, :mod:`.simple`) register into. ``segcore.readers`` imports them and
chooses one by suffix (:func:`segcore.readers.open_sources`); nothing here imports a reader.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segcore.registry import Registry

log = logging.getLogger(__name__)

SAMPLE_PIXELS = 1 << 20  # pixels in the normalisation sample
SAMPLE_BLOCK = 128  # edge of the sample blocks read from chunked files


class ImageSource:
    """One 2D image (possibly multi-channel) inside a file, read lazily.

    Subclasses set ``shape``, ``channels``, ``dtype`` and implement ``_read``.
    ``slow_random_access`` marks files whose natural read unit spans the full width
    (striped TIFF, row-compressed FITS): the pipeline then reads them band by band.
    """

    def __init__(self, path: Path, name: str = "", index: int = -1, header: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.name = name  # "" for single-image files, else the FITS HDU name
        self.index = index  # FITS HDU index, -1 for other files
        self.header = header
        self.shape: tuple[int, int] = (0, 0)
        self.channels = 1
        self.dtype = np.dtype(np.uint8)
        self.slow_random_access = False
        self.block_rows = 0  # native read granularity along rows (0: none)
        self.level_factors: tuple[int, ...] = ()  # downsampling factors of stored pyramid levels
        self.pixels_read = 0  # pixels returned by read / read_level (to check reads stay minimal)
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        """``file`` or ``file[HDU]`` for messages."""
        return f"{self.path}[{self.name}]" if self.name else str(self.path)

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels of ``[rows, cols]`` as (h, w) or (h, w, C); never touches the rest of the image."""
        height, width = self.shape
        if not (0 <= rows.start < rows.stop <= height and 0 <= cols.start < cols.stop <= width):
            raise IndexError(f"{self.label}: region {rows}, {cols} outside image of shape {self.shape}")
        with self._lock:  # file handles of tifffile/astropy are not safe for concurrent reads
            self.pixels_read += (rows.stop - rows.start) * (cols.stop - cols.start)
            return self._read(rows, cols)

    def _read(self, rows: slice, cols: slice) -> np.ndarray:
        raise NotImplementedError

    def level_shape(self, factor: int) -> tuple[int, int]:
        """Shape of the stored pyramid level ``factor`` times smaller (one of ``level_factors``)."""
        raise KeyError(factor)

    def read_level(self, factor: int, rows: slice, cols: slice) -> np.ndarray:
        """Pixels ``[rows, cols]`` of the stored pyramid level ``factor`` (in that level's px)."""
        height, width = self.level_shape(factor)
        if not (0 <= rows.start < rows.stop <= height and 0 <= cols.start < cols.stop <= width):
            raise IndexError(f"{self.label}: region {rows}, {cols} outside level {factor} of shape {(height, width)}")
        with self._lock:
            self.pixels_read += (rows.stop - rows.start) * (cols.stop - cols.start)
            return self._read_level(factor, rows, cols)

    def _read_level(self, factor: int, rows: slice, cols: slice) -> np.ndarray:
        raise KeyError(factor)

    def sample(self, max_pixels: int = SAMPLE_PIXELS) -> np.ndarray:
        """A deterministic subsample of about ``max_pixels`` pixels spread over the image:
        a grid of small blocks (each a cheap read in a chunked file), flattened to (n,) or (n, C)."""
        height, width = self.shape
        if height * width <= max_pixels:
            return self._flat(self.read(slice(0, height), slice(0, width)))
        edge = SAMPLE_BLOCK
        per_axis = max(1, int(math.sqrt(max_pixels) // edge))
        blocks = []
        for r in _spread(height, edge, per_axis):
            for c in _spread(width, edge, per_axis):
                blocks.append(self._flat(self.read(slice(r, min(r + edge, height)), slice(c, min(c + edge, width)))))
        return np.concatenate(blocks)

    def _flat(self, block: np.ndarray) -> np.ndarray:
        return block.reshape(-1, self.channels) if self.channels > 1 else block.reshape(-1)

    def close(self) -> None:
        """Release file handles (sources are cheap to reopen)."""


def _spread(size: int, edge: int, count: int) -> list[int]:
    """``count`` evenly spread block starts along an axis of ``size``."""
    if size <= edge * count:
        return list(range(0, size, edge))
    step = (size - edge) / max(count - 1, 1)
    return sorted({int(round(i * step)) for i in range(count)})


OpenFn = Callable[[Path], list[ImageSource]]
READERS: Registry[OpenFn] = Registry("image reader")
_SUFFIXES: dict[str, str] = {}


def register_reader(name: str, suffixes: tuple[str, ...]) -> Callable[[OpenFn], OpenFn]:
    """Decorator: register an ``open(path) -> list[ImageSource]`` for these (lower-case) suffixes."""

    def deco(fn: OpenFn) -> OpenFn:
        READERS.add(name, fn)
        for s in suffixes:
            _SUFFIXES[s] = name
        return fn

    return deco


def reader_name(path: str | Path) -> str | None:
    """The registered reader for ``path`` by its (longest matching) suffix, or None."""
    name = Path(path).name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def supported_suffixes() -> list[str]:
    return sorted(_SUFFIXES)


def safe_name(text: str) -> str:
    """Letters, digits, '.', '_' and '-' only (file and zarr-group names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"
