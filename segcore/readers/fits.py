"""FITS through astropy: every image HDU (2-D, or a C x H x W cube with C <= 4) of a (multi-extension) file.

astropy cannot memory-map data it has to scale (BZERO/BSCALE), so files are opened with
``do_not_scale_image_data=True`` and ``memmap=True``: a read slices the raw big-endian
memory map and scaling happens here, on the slice only. Tile-compressed HDUs
(``CompImageHDU``) are read through ``.section``, which decompresses only the tiles touched.
The usual unsigned conventions (BZERO = 2**(BITPIX-1), BSCALE = 1) give exact unsigned ints.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from segcore.data.errors import DataError
from segcore.data.fitsheader import inherited_header
from segcore.readers.base import ImageSource, register_reader, safe_name

log = logging.getLogger(__name__)

FIX = "re-copy the file from its source (it is truncated or corrupt)"
_UNSIGNED = {8: (np.int8, -128), 16: (np.uint16, 1 << 15), 32: (np.uint32, 1 << 31), 64: (np.uint64, 1 << 63)}


def _logical_dtype(bitpix: int, bzero: float, bscale: float) -> np.dtype:
    """The dtype of physical values ``raw * BSCALE + BZERO``."""
    if bitpix < 0:
        return np.dtype(np.float32 if bitpix == -32 and bscale == 1 and bzero == 0 else np.float64)
    raw = {8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}[bitpix]
    if bscale == 1 and bzero == 0:
        return np.dtype(raw)
    if bscale == 1 and bzero == _UNSIGNED[bitpix][1]:
        return np.dtype(_UNSIGNED[bitpix][0])
    return np.dtype(np.float32 if bitpix <= 16 else np.float64)


class FitsSource(ImageSource):
    """One image HDU; ``read`` returns physical values (ADU) in native byte order."""

    def __init__(self, path: Path, hdul: fits.HDUList, index: int, name: str) -> None:
        hdu = hdul[index]
        header = hdu.header
        super().__init__(path, name=name, index=index, header=inherited_header(header, hdul[0].header))
        self._hdul = hdul
        self._compressed = isinstance(hdu, fits.CompImageHDU)
        self._raw = hdu.section if self._compressed else hdu.data
        self.shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        self.channels = int(header["NAXIS3"]) if int(header.get("NAXIS", 2)) == 3 else 1
        self.extname = (str(header["EXTNAME"]).strip() or None) if "EXTNAME" in header else None
        self.bitpix = int(header["BITPIX"])
        self.bzero = float(header.get("BZERO", 0.0))
        self.bscale = float(header.get("BSCALE", 1.0))
        self.dtype = _logical_dtype(self.bitpix, self.bzero, self.bscale)
        ztile = header.get("ZTILE1", self.shape[1]) if self._compressed else None
        self.slow_random_access = bool(self._compressed and int(ztile) >= self.shape[1])
        self.block_rows = int(header.get("ZTILE2", 1)) if self._compressed else 0

    def _read(self, rows: slice, cols: slice) -> np.ndarray:
        if self.channels > 1:  # a (C, H, W) cube: channels last, like every other source
            return np.moveaxis(self._scale(np.asarray(self._raw[:, rows, cols])), 0, -1)
        raw = np.asarray(self._raw[rows, cols])
        return self._scale(raw)

    def _scale(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
        if self.dtype == raw.dtype:
            return raw
        if self.bscale == 1 and self.bitpix > 0 and self.bzero == _UNSIGNED[self.bitpix][1]:
            # flipping the sign bit adds 2**(BITPIX-1) exactly
            bits = raw.view(np.dtype(f"u{raw.dtype.itemsize}"))
            return (bits ^ np.array(1 << (8 * raw.dtype.itemsize - 1), dtype=bits.dtype)).view(self.dtype)
        out = raw.astype(self.dtype)
        out *= self.dtype.type(self.bscale)
        out += self.dtype.type(self.bzero)
        return out

    def sample(self, max_pixels: int = 1 << 20) -> np.ndarray:
        if self._compressed or self.channels > 1:
            return super().sample(max_pixels)
        step = max(1, int(np.ceil(np.sqrt(self.shape[0] * self.shape[1] / max_pixels))))
        with self._lock:
            return self._scale(np.asarray(self._raw[::step, ::step])).reshape(-1)

    def close(self) -> None:
        self._hdul.close()


def _is_image(hdu: Any) -> bool:
    if not isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        return False
    header = hdu.header
    naxis = int(header.get("NAXIS", 0))
    if naxis not in (2, 3) or int(header.get("NAXIS1", 0)) <= 0 or int(header.get("NAXIS2", 0)) <= 0:
        return False
    return naxis == 2 or int(header.get("NAXIS3", 0)) > 0


def _check_cube(path: Path, hdul: fits.HDUList, index: int) -> None:
    """A 3-D HDU is a (C, H, W) image with up to 4 channels (as in TIFF and zarr); more is a stack."""
    header = hdul[index].header
    if int(header.get("NAXIS", 2)) == 3 and int(header["NAXIS3"]) > 4:
        raise DataError(path, f"HDU {index} is a cube of {header['NAXIS3']} planes, not one image with up to "
                        "4 channels", "store one 2-D image (or a C x H x W cube with C <= 4) per HDU")


def _hdu_names(hdul: fits.HDUList, indices: list[int]) -> list[str]:
    """EXTNAME (or PRIMARY / HDU<i>), made unique with EXTVER or the index."""
    base = [safe_name(str(hdul[i].header.get("EXTNAME", "PRIMARY" if i == 0 else f"HDU{i}"))) for i in indices]
    names = []
    for i, name in zip(indices, base, strict=True):
        if base.count(name) > 1:
            ver = hdul[i].header.get("EXTVER")
            name = f"{name}_{ver}" if ver is not None else f"{name}_{i}"
        names.append(name)
    if len(set(names)) < len(names):
        names = [f"{n}_{i}" for n, i in zip(names, indices, strict=True)]
    return names


def _check_complete(path: Path, hdul: fits.HDUList, caught: list[warnings.WarningMessage]) -> None:
    size = os.path.getsize(path)
    for i in range(len(hdul)):
        info = hdul.fileinfo(i)
        need = int(info["datLoc"]) + int(info["datSpan"])
        if need > size:
            raise DataError(path, f"truncated: HDU {i} ({hdul[i].name}) needs {need} bytes, the file has {size}", FIX)
    bad = [str(w.message) for w in caught if "truncat" in str(w.message) or "rror validating header" in str(w.message)]
    if bad:
        raise DataError(path, f"damaged FITS structure ({bad[0].splitlines()[0]})", FIX)


@register_reader("fits", (".fits", ".fit", ".fts", ".fits.fz", ".fz", ".fits.gz", ".fit.gz", ".fts.gz"))
def open_fits(path: Path) -> list[ImageSource]:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(path, memmap=True, do_not_scale_image_data=True, lazy_load_hdus=False)
    except (OSError, ValueError, TypeError) as err:
        raise DataError(path, f"not a readable FITS file ({type(err).__name__}: {err})", FIX) from None
    try:
        _check_complete(path, hdul, caught)
        indices = [i for i, hdu in enumerate(hdul) if _is_image(hdu)]
        for i in indices:
            _check_cube(path, hdul, i)
        names = _hdu_names(hdul, indices)
        return [FitsSource(path, hdul, i, n) for i, n in zip(indices, names, strict=True)]
    except DataError:
        hdul.close()
        raise
    except (OSError, ValueError, TypeError, KeyError) as err:
        hdul.close()
        raise DataError(path, f"cannot read FITS image HDUs ({type(err).__name__}: {err})", FIX) from None
