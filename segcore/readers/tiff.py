"""TIFF / BigTIFF, read tile by tile (or strip by strip) with tifffile's decoders: only the chunks
a read touches are decoded, and decoded chunks are kept in a bounded per-process cache
(:mod:`segcore.readers.cache`). Pyramid levels (SubIFDs or series levels) are read for scaled
views (:meth:`ImageSource.read_level`). Striped files decode whole strips per read, so they are
flagged ``slow_random_access`` and the pipeline reads them band by band. Layouts the chunk
reader does not handle (planar samples, volumes, multi-page series) go through tifffile's zarr
interface."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from segcore.data.errors import DataError
from segcore.readers.base import ImageSource, register_reader
from segcore.readers.cache import chunk_cache

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


class TiffLevel:
    """One resolution level (a TIFF page) read chunk by chunk, without zarr.

    Only the tiles or strips a read touches are read and decoded (tifffile's own decoders),
    through the process's :func:`~segcore.readers.cache.chunk_cache`; going through zarr 3's
    event loop cost ~3 ms per read, 80 % of a training patch.
    """

    def __init__(self, tif: tifffile.TiffFile, page: tifffile.TiffPage, key: tuple[Any, ...]) -> None:
        self._tif, self._page, self.key = tif, page, key
        self.shape = (int(page.imagelength), int(page.imagewidth))
        self.samples = int(page.samplesperpixel)
        if page.is_tiled:
            self.chunk = (int(page.tilelength), int(page.tilewidth))
        else:
            self.chunk = (int(page.rowsperstrip or self.shape[0]), self.shape[1])
        self.grid = (-(-self.shape[0] // self.chunk[0]), -(-self.shape[1] // self.chunk[1]))
        self._offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self._counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.dtype = np.dtype(page.dtype)
        self._raw = self._raw_dtype(page)
        self._buffer = np.empty(0, np.uint8)

    def _raw_dtype(self, page: tifffile.TiffPage) -> np.dtype | None:
        """The on-disk dtype when chunks are stored as plain pixels (no codec, predictor or bit
        packing): they are then read row-range by row-range straight from the file, uncached."""
        plain = (page.compression == 1 and page.predictor == 1 and page.fillorder == 1
                 and page.bitspersample == self.dtype.itemsize * 8 and self.dtype.kind in "uif")
        return self.dtype.newbyteorder(self._tif.byteorder) if plain else None

    @staticmethod
    def supports(page: tifffile.TiffPage) -> bool:
        """Whether chunks of ``page`` map to 2D regions (one plane, interleaved samples)."""
        chunks = int(np.prod(page.chunked))
        return (page.dtype is not None and int(page.imagedepth) == 1 and len(page.dataoffsets) == chunks
                and (page.planarconfig == 1 or page.samplesperpixel == 1) and not page.is_subsampled)

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels ``[rows, cols]`` as (h, w) or (h, w, S), copied out of the chunks under them."""
        (r0, r1), (c0, c1), (th, tw) = (rows.start, rows.stop), (cols.start, cols.stop), self.chunk
        extra = (self.samples,) if self.samples > 1 else ()
        out = np.empty((r1 - r0, c1 - c0, *extra), self.dtype)
        for ty in range(r0 // th, (r1 - 1) // th + 1):
            y0 = ty * th
            a0, a1 = max(r0, y0), min(r1, y0 + th, self.shape[0])
            for tx in range(c0 // tw, (c1 - 1) // tw + 1):
                x0, index = tx * tw, ty * self.grid[1] + tx
                b0, b1 = max(c0, x0), min(c1, x0 + tw)
                if self._raw is not None:
                    rows_ = self._raw_rows(index, a0 - y0, a1 - y0)
                else:
                    rows_ = self._chunk(index)[a0 - y0:a1 - y0]
                out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = rows_[:, b0 - x0:b1 - x0]
        return out

    def _raw_rows(self, index: int, a0: int, a1: int) -> np.ndarray:
        """Rows ``a0:a1`` of plain chunk ``index``, read into a reused buffer (valid until the next
        read; the page cache is the cache). A chunk too short for them is corrupt."""
        count, row = int(self._counts[index]), self.chunk[1] * self.samples * self._raw.itemsize
        shape = (a1 - a0, self.chunk[1], *((self.samples,) if self.samples > 1 else ()))
        if count == 0:
            return np.zeros(shape, self.dtype)
        if count < a1 * row:
            raise ValueError(f"chunk {index} holds {count} bytes, too few for {a1} rows of {row} bytes")
        nbytes = (a1 - a0) * row
        if self._buffer.size < nbytes:
            self._buffer = np.empty(self.chunk[0] * row, np.uint8)
        view = self._buffer[:nbytes]
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(int(self._offsets[index]) + a0 * row)
            if fh.readinto(view) != nbytes:
                raise ValueError(f"chunk {index} is cut short by the end of the file")
        return view.view(self._raw).reshape(shape)

    def _chunk(self, index: int) -> np.ndarray:
        return chunk_cache().get((*self.key, index), lambda: self._decode(index))

    def _decode(self, index: int) -> np.ndarray:
        """Chunk ``index`` as (rows, cols[, S]); an empty (zero-byte) chunk reads as zeros."""
        page, count = self._page, int(self._counts[index])
        data = None
        if count:
            fh = self._tif.filehandle
            with fh.lock:
                fh.seek(int(self._offsets[index]))
                data = fh.read(count)
        segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        if segment is None:
            segment = np.zeros(shape, self.dtype)
        segment = np.asarray(segment).reshape(shape[-3:])
        return segment if self.samples > 1 else segment[..., 0]


class TiffSource(ImageSource):
    """Level 0 of the first series of a TIFF file, plus its pyramid levels (SubIFDs or series
    levels) when it has them: :meth:`read_level` reads those for scaled views."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._array: Any = None
        self._levels: list[TiffLevel] = []
        try:
            self._tif = tifffile.TiffFile(path)
            if not self._tif.series:
                raise ValueError("no readable image pages (corrupt header or first-page offset)")
            series = self._tif.series[0]
            page = series.pages[0]
            check_chunks(page, self._tif.filehandle.size, path)
            self._squeeze = self._layout(series.axes, series.shape)
            if len(series.pages) == 1 and TiffLevel.supports(page):
                self._levels = self._open_levels(series)
            else:
                self._array = zarr.open_array(self._tif.aszarr(series=0, level=0), mode="r")
            self.dtype = np.dtype(page.dtype if self._array is None else self._array.dtype)
        except DataError:
            self.close()
            raise
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, TypeError) as err:
            self.close()
            raise DataError(path, f"not a readable TIFF ({type(err).__name__}: {err})", FIX) from None
        self.slow_random_access = not page.is_tiled
        self.block_rows = int(page.rowsperstrip or 0) if not page.is_tiled else int(page.tilelength)
        self.compression = str(getattr(page.compression, "name", page.compression))
        self.level_factors = tuple(f for f, _ in self._factors())

    def _open_levels(self, series: Any) -> list[TiffLevel]:
        """Level 0 and every further level that is one page, readable by chunks and whole."""
        st = self.path.stat()
        key = (str(self.path), st.st_size, st.st_mtime_ns)
        levels = [TiffLevel(self._tif, series.pages[0], (*key, 0))]
        for n, level in enumerate(series.levels[1:], 1):
            page = level.pages[0] if len(level.pages) == 1 else None
            if page is None or not TiffLevel.supports(page) or int(page.samplesperpixel) != levels[0].samples:
                break
            try:
                check_chunks(page, self._tif.filehandle.size, self.path)
            except DataError as err:
                log.warning("%s: ignoring pyramid level %d (%s)", self.path, n, err.problem)
                break
            levels.append(TiffLevel(self._tif, page, (*key, n)))
        return levels

    def _factors(self) -> list[tuple[int, TiffLevel]]:
        """(integer downsampling factor, level) of the pyramid levels below level 0 whose size is
        level 0's divided by the factor (rounded either way) on both axes."""
        out = []
        h, w = self.shape
        for level in self._levels[1:]:
            f = round(h / level.shape[0])
            if f >= 2 and all(abs(n / f - m) < 1 for n, m in zip((h, w), level.shape, strict=True)):
                out.append((f, level))
        return out

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
        return self._read_from(self._levels[0] if self._levels else None, rows, cols)

    def _read_from(self, level: TiffLevel | None, rows: slice, cols: slice) -> np.ndarray:
        try:
            if level is not None:
                return level.read(rows, cols)
            return np.asarray(self._array[(0,) * len(self._squeeze) + (rows, cols)])
        except DataError:
            raise
        except Exception as err:  # codec errors from corrupt tiles surface here
            raise DataError(self.path, f"cannot decode pixels {rows.start}:{rows.stop}, "
                            f"{cols.start}:{cols.stop} ({type(err).__name__}: {err})", FIX) from None

    def level_shape(self, factor: int) -> tuple[int, int]:
        return next(level.shape for f, level in self._factors() if f == factor)

    def _read_level(self, factor: int, rows: slice, cols: slice) -> np.ndarray:
        level = next(level for f, level in self._factors() if f == factor)
        return self._read_from(level, rows, cols)

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()


@register_reader("tiff", (".tif", ".tiff", ".btf", ".tf8", ".tf2"))
def open_tiff(path: Path) -> list[ImageSource]:
    return [TiffSource(path)]
