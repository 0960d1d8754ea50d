"""Lazy pixel access to huge images, one reader per file type, chosen by suffix.

``open_sources(path)`` returns one :class:`ImageSource` per image in the file (a FITS file
gives one per image HDU). A source knows its shape and dtype, reads any rectangle with
``read(rows, cols)`` without loading the rest, and gives a cheap, deterministic
``sample()`` for normalisation statistics. Pixels come back as ``(h, w)`` or ``(h, w, C)``
in the image's *logical* dtype (FITS: BZERO/BSCALE applied, native byte order).

Readers: TIFF/BigTIFF (tifffile's zarr interface), FITS (astropy, memory-mapped raw data,
tile-compressed HDUs through ``.section``), PNG/JPEG (Pillow, read whole: small images
only), zarr (a 2D/3D array or OME-Zarr level 0).
"""

from __future__ import annotations

from pathlib import Path

from segcore.data.errors import DataError
from segcore.readers import fits, simple, tiff  # noqa: F401  (each registers its reader on import)
from segcore.readers.base import (
    READERS,
    SAMPLE_BLOCK,
    SAMPLE_PIXELS,
    ImageSource,
    reader_name,
    register_reader,
    safe_name,
    supported_suffixes,
)


def open_sources(path: str | Path) -> list[ImageSource]:
    """All images in ``path``; raises :class:`DataError` naming the file for anything unreadable."""
    path = Path(path)
    name = reader_name(path)
    if name is None:
        raise DataError(path, "unsupported file type", f"use one of {', '.join(supported_suffixes())}")
    if not path.exists():
        raise DataError(path, "file not found", "check the path or glob")
    sources = READERS.get(name)(path)
    if not sources:
        raise DataError(path, "contains no 2D image", "check that the file holds image data")
    return sources


def open_source(path: str | Path, index: int) -> ImageSource:
    """The image with HDU ``index`` (FITS) or the only image (``index == -1``) of ``path``."""
    sources = open_sources(path)
    for s in sources:
        if s.index == index:
            return s
    raise DataError(path, f"has no image with index {index}", "rerun the planning stage")


__all__ = [
    "READERS",
    "SAMPLE_BLOCK",
    "SAMPLE_PIXELS",
    "ImageSource",
    "open_source",
    "open_sources",
    "reader_name",
    "register_reader",
    "safe_name",
    "supported_suffixes",
]
