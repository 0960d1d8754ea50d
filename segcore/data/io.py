"""Reading images and masks: PNG, JPEG, TIFF (8/16 bit, 1-4 channels) and FITS (one sample per
image HDU). Every failure becomes a :class:`DataError` naming the file.

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
from segcore.data.spec import IGNORE, DatasetSpec

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


def read_mask(path: str | Path, spec: DatasetSpec, hdu: int | str | None = None) -> np.ndarray:
    """Read a mask file as int64 (H, W) class ids (255 = ignore) following ``spec``.

    For a FITS mask with several image HDUs, ``hdu`` picks one by EXTNAME (str) or HDU number.
    """
    path = Path(path)
    raws = read_image(path, palette_indices=spec.mask_mode == "ids")
    if len(raws) > 1 or hdu is not None:
        raws = [_pick_hdu(path, raws, hdu)]
    return mask_to_ids(raws[0].array, spec, path)


def _pick_hdu(path: Path, raws: list[RawImage], hdu: int | str | None) -> RawImage:
    for raw in raws:
        if (isinstance(hdu, str) and raw.extname == hdu) or (isinstance(hdu, int) and raw.index == hdu):
            return raw
    have = ", ".join(f"{r.index}:{r.extname or ''}" for r in raws)
    raise DataError(path, f"no image HDU {hdu!r} (has {have})" if hdu is not None
                    else f"mask FITS has {len(raws)} image HDUs; which one is meant is unclear",
                    "give the mask the image's HDUs (same EXTNAMEs or HDU numbers)")


def mask_to_ids(array: np.ndarray, spec: DatasetSpec, source: str | Path) -> np.ndarray:
    """Class ids (int64, 255 = ignore) from a stored mask array, validated against ``spec``."""
    if spec.mask_mode == "rgb":
        return _rgb_to_ids(np.asarray(array), spec, source)
    return _ids(np.asarray(array), spec, source)


def _ids(arr: np.ndarray, spec: DatasetSpec, source: str | Path) -> np.ndarray:
    if arr.ndim == 3:
        if arr.shape[2] == 1 or bool((arr == arr[..., :1]).all()):
            arr = arr[..., 0]
        else:
            raise DataError(source, f"mask has {arr.shape[2]} different channels but mask_mode is ids",
                            "set mask_mode: rgb and colors in dataset.yaml, or save class-id masks")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not (arr == np.round(arr)).all():
            raise DataError(source, "mask holds non-integer or NaN values", "save class ids as integers")
    ids = arr.astype(np.int64)
    if spec.id_map:
        uniq, inverse = np.unique(ids, return_inverse=True)
        ids = np.array([spec.id_map.get(int(v), int(v)) for v in uniq], dtype=np.int64)[inverse].reshape(ids.shape)
    k = spec.num_classes
    uniq = np.unique(ids)
    bad = uniq[(uniq < 0) | ((uniq >= k) & (uniq != IGNORE))] if k else uniq[uniq < 0]
    if bad.size:
        names = ", ".join(spec.class_names)
        raise DataError(source, f"mask values {bad[:10].tolist()} are not class ids 0..{k - 1} ({names}) or 255",
                        "fix the mask, add the classes to 'classes:' in dataset.yaml, or map them with id_map")
    return ids


def _rgb_to_ids(arr: np.ndarray, spec: DatasetSpec, source: str | Path) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(source, f"mask_mode is rgb but the mask has shape {arr.shape}",
                        "save colour-coded RGB masks, or set mask_mode: ids for class-id masks")
    if arr.dtype != np.uint8:
        raise DataError(source, f"RGB mask must be 8 bit, got {arr.dtype}", "save it as an 8-bit RGB PNG")
    rgb = arr[..., :3].astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniq, inverse = np.unique(codes, return_inverse=True)
    lut = spec.color_lut()
    ids = np.array([lut.get(int(c), -1) for c in uniq], dtype=np.int64)
    unknown = uniq[ids < 0]
    if unknown.size:
        c = int(unknown[0])
        row, col = (int(v) for v in np.argwhere(codes == c)[0])
        count = int((codes == c).sum())
        others = f" and {unknown.size - 1} more unknown colours" if unknown.size > 1 else ""
        raise DataError(source, f"colour {[c >> 16, (c >> 8) & 255, c & 255]} ({count} pixels, first at row {row}, "
                        f"column {col}) is not in the palette{others}",
                        "add it to colors (or ignore_colors) in dataset.yaml, or fix the mask")
    return ids[inverse].reshape(codes.shape)
