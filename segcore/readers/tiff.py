"""TIFF / BigTIFF through tifffile's zarr interface: only the tiles or strips a read touches
are decoded. Striped files (compressed or not) decode whole strips per read, so they are
flagged ``slow_random_access`` and the pipeline reads them band by band."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile
import zarr

from segcore.data.errors import DataError
from segcore.readers import ImageSource, register_reader

log = logging.getLogger(__name__)

FIX = "re-export or re-copy the file (it may be truncated or corrupt)"


def check_chunks(page: tifffile.TiffPage, file_size: int, path: Path) -> None:
    """The header's image size must agree with the tiles/strips actually listed, and every one
    of them must lie inside the file. Else a patched or truncated header would be believed:
    missing tiles read as zeros, and a 64 KB file planned as gigapixels of work."""
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    expected = int(np.prod(page.chunked))
    kind = "tiles" if page.is_tiled else "strips"
    if len(offsets) != expected or len(counts) != expected:
        raise DataError(path,
                        f"header declares a {page.imagelength} x {page.imagewidth} image, which needs "
                        f"{expected} {kind} of {page.chunks[0]} x {page.chunks[1]} px, but the file lists "
                        f"{len(offsets)}", FIX)
    ends = offsets + counts
    outside = np.flatnonzero((counts > 0) & ((offsets < 0) | (ends > file_size)))
    if outside.size:
        i = int(outside[0])
        raise DataError(path,
                        f"{outside.size} of {expected} {kind} lie beyond the end of the file ({file_size} bytes; "
                        f"{kind[:-1]} {i} spans bytes {offsets[i]}-{ends[i]})", FIX)


class TiffSource(ImageSource):
    """Level 0 of the first series of a TIFF file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._tif = tifffile.TiffFile(path)
            if not self._tif.series:
                raise ValueError("no readable image pages (corrupt header or first-page offset)")
            series = self._tif.series[0]
            page = series.pages[0]
            axes = series.axes
            self._array = zarr.open_array(self._tif.aszarr(series=0, level=0), mode="r")
            check_chunks(page, self._tif.filehandle.size, path)
        except DataError:
            self.close()
            raise
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as err:
            self.close()
            raise DataError(path, f"not a readable TIFF ({type(err).__name__}: {err})", FIX) from None
        self._squeeze = self._layout(axes, self._array.shape)
        self.dtype = np.dtype(self._array.dtype)
        self.slow_random_access = not page.is_tiled
        self.block_rows = int(page.rowsperstrip or 0) if not page.is_tiled else int(page.tilelength)
        self.compression = str(getattr(page.compression, "name", page.compression))

    def _layout(self, axes: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Indices of the axes to drop, after checking the image is 2D (+ samples)."""
        keep = "YXS" if axes.endswith("S") else "YX"
        if not axes.endswith(keep):
            raise DataError(self.path, f"unsupported TIFF axes {axes!r} (want YX or YXS)", "export a 2D image")
        lead = shape[: len(shape) - len(keep)]
        if any(n != 1 for n in lead):
            raise DataError(
                self.path,
                f"holds a stack (axes {axes!r}, shape {shape}), not one 2D image",
                "split it into one file per image",
            )
        self.shape = (int(shape[len(lead)]), int(shape[len(lead) + 1]))
        self.channels = int(shape[-1]) if keep == "YXS" else 1
        return tuple(range(len(lead)))

    def _read(self, rows: slice, cols: slice) -> np.ndarray:
        index = (0,) * len(self._squeeze) + (rows, cols)
        try:
            return np.asarray(self._array[index])
        except Exception as err:  # codec errors from corrupt tiles surface here
            raise DataError(self.path, f"cannot decode pixels {rows.start}:{rows.stop}, "
                            f"{cols.start}:{cols.stop} ({type(err).__name__}: {err})", FIX) from None

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()


@register_reader("tiff", (".tif", ".tiff", ".btf", ".tf8", ".tf2"))
def open_tiff(path: Path) -> list[ImageSource]:
    return [TiffSource(path)]
