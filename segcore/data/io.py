"""Reading images: PNG, JPEG, TIFF (8/16 bit, 1-4 channels) and FITS (one sample per image HDU).
Every failure becomes a :class:`DataError` naming the file. Masks as class ids: :mod:`.masks`.

Arrays come back in their native dtype as (H, W) or (H, W, C). FITS values are physical
(astropy applies ``BZERO``/``BSCALE``, so int16 + ``BZERO=32768`` reads as uint16 ADU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcore.data.errors import DataError

log = logging.getLogger(__name__)

PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fits.fz", ".fz")


@dataclass
class RawImage:
    """One image as stored: ``name`` is the sample name (file stem, plus ``_<EXTNAME>`` or
    ``_<hdu number>`` for FITS files with several image HDUs)."""

    name: str
    array: np.ndarray
    header: dict[str, Any] | None = None
    index: int = 0
    extname: str | None = None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in sorted(FITS_SUFFIXES + PIL_SUFFIXES + TIFF_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def is_supported(path: Path) -> bool:
    """True for a visible file with an image suffix we can read."""
    return path.is_file() and not path.name.startswith(".") and _suffix(path) in (
        PIL_SUFFIXES + TIFF_SUFFIXES + FITS_SUFFIXES)


def is_fits(path: Path) -> bool:
    return _suffix(Path(path)) in FITS_SUFFIXES


def file_stem(path: Path) -> str:
    """The name without its (possibly double, ``.fits.gz``) suffix."""
    path = Path(path)
    return path.name[: len(path.name) - len(_suffix(path))]


def open_image_sources(path: str | Path, palette_indices: bool = False) -> list[Any]:
    """The lazy :class:`segcore.readers.ImageSource` objects of an image file: the same readers
    ``gigaseg segment`` uses, so both paths see the same pixels and dtypes."""
    from segcore.readers import open_sources
    from segcore.readers.simple import PilSource

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found", "check the path")
    suffix = _suffix(path)
    if suffix not in PIL_SUFFIXES + TIFF_SUFFIXES + FITS_SUFFIXES:
        raise DataError(path, f"unsupported file type {suffix!r}",
                        "use PNG, JPEG, TIFF or FITS (.fits/.fit/.fts, optionally .gz)")
    if suffix in PIL_SUFFIXES:
        return [PilSource(path, palette_indices=palette_indices)]
    return open_sources(path)


def read_image(path: str | Path, palette_indices: bool = False) -> list[RawImage]:
    """Read an image file whole: one :class:`RawImage`, or one per image HDU of a FITS file.

    Pixels come from :mod:`segcore.readers` (as in ``gigaseg segment``). ``palette_indices``
    keeps palette PNGs as their indices (for class-id masks) instead of converting them to RGB.
    """
    path = Path(path)
    sources = open_image_sources(path, palette_indices)
    try:
        arrays = [_read_whole(src) for src in sources]
    except DataError:
        raise
    except Exception as err:  # any decoder error means a corrupt or truncated file
        raise DataError(path, f"cannot read the file ({type(err).__name__}: {err})",
                        "check that it opens in an image viewer; re-export or remove it") from None
    finally:
        for src in sources:
            src.close()
    stem = file_stem(path)
    if not is_fits(path):
        return [RawImage(stem, arrays[0])]
    return [RawImage(stem if len(sources) == 1 else f"{stem}_{src.extname or src.index}", arr, src.header,
                     src.index, src.extname) for src, arr in zip(sources, arrays, strict=True)]


def _read_whole(src: Any) -> np.ndarray:
    """All pixels of one source as an owned array (never a view of a file memory map)."""
    height, width = src.shape
    return np.array(src.read(slice(0, height), slice(0, width)))
