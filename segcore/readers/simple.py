"""Small-image formats (PNG/JPEG via Pillow, read whole on first access) and zarr arrays
(a 2D or channels-first 3D array, or level 0 of an OME-Zarr multiscale group)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image, ImageFile

from segcore.data.errors import DataError
from segcore.readers.base import ImageSource, register_reader

log = logging.getLogger(__name__)

BIG_PIL_PIXELS = 64 << 20
MAX_LISTED_CHUNKS = 200_000  # zarr chunk files listed to check the grid; bigger arrays skip the check
ZARR_METADATA = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})
REEXPORT = "re-export it as PNG or TIFF (the file may be truncated or corrupt)"
_STRICT_LOCK = threading.Lock()  # guards the process-wide ImageFile.LOAD_TRUNCATED_IMAGES switch
_PIL_MODES = {"L": "L", "I;16": "I;16", "I;16B": "I;16", "I": "I", "F": "F", "RGB": "RGB", "RGBA": "RGB", "P": "RGB",
              "LA": "L", "1": "L", "CMYK": "RGB", "YCbCr": "RGB"}


class PilSource(ImageSource):
    """PNG/JPEG: decoded whole on the first read (they cannot be read by region).

    A PNG opened in mode ``I`` holds 16-bit grey levels (PNG has no 32-bit grey), so it reads as
    uint16 whatever the Pillow version calls it. ``palette_indices`` keeps a palette PNG as its
    indices (class-id masks) instead of converting it to RGB.
    """

    def __init__(self, path: Path, palette_indices: bool = False) -> None:
        super().__init__(path)
        try:
            with Image.open(path) as im:
                self._mode = "P" if (im.mode == "P" and palette_indices) else _PIL_MODES.get(im.mode, "RGB")
                width, height = im.size
                fmt = im.format
            if fmt == "PNG":  # walks every chunk up to IEND checking CRCs (no decoding): fast
                with Image.open(path) as im:
                    im.verify()
        except (OSError, ValueError, SyntaxError) as err:  # PIL reports a broken PNG as SyntaxError
            raise DataError(path, f"cannot read the image: not a readable PNG/JPEG, or truncated ({err})", REEXPORT) from None
        self.shape = (height, width)
        self.channels = 3 if self._mode == "RGB" else 1
        dtypes = {"L": np.uint8, "P": np.uint8, "RGB": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}
        self.dtype = np.dtype(np.uint16 if (self._mode == "I" and fmt == "PNG") else dtypes[self._mode])
        self._pixels: np.ndarray | None = None
        if height * width > BIG_PIL_PIXELS:
            log.warning("%s: %d x %d PNG/JPEG is decoded whole in every worker; use a tiled TIFF for big images",
                        path, height, width)

    def _read(self, rows: slice, cols: slice) -> np.ndarray:
        if self._pixels is None:
            try:
                pixels = _decode_strict(self.path, self._mode).astype(self.dtype, copy=False)
            except (OSError, ValueError, SyntaxError) as err:
                raise DataError(self.path, f"cannot decode image ({err})", REEXPORT) from None
            if pixels.shape[:2] != self.shape:
                raise DataError(self.path, f"header declares {self.shape[1]} x {self.shape[0]} px but "
                                f"{pixels.shape[1]} x {pixels.shape[0]} were decoded", REEXPORT)
            self._pixels = pixels
        return self._pixels[rows, cols]


def _decode_strict(path: Path, mode: str) -> np.ndarray:
    """Decode a whole PNG/JPEG; a truncated file raises (OSError) instead of being padded, whatever
    another library set ``ImageFile.LOAD_TRUNCATED_IMAGES`` to in this process."""
    with _STRICT_LOCK:
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            with Image.open(path) as im:
                im.load()
                return np.asarray(im if im.mode == mode else im.convert(mode))
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


class ZarrSource(ImageSource):
    """A zarr array: (H, W), (C, H, W) with C <= 4, or leading singleton axes (OME-Zarr t, c, z)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            node = zarr.open(str(path), mode="r")
            self._array = _level0(node, path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(path, f"not a readable zarr array or OME-Zarr group ({err})", "check the path") from None
        shape = self._array.shape
        lead = [n for n in shape[:-2]]
        non_one = [n for n in lead if n != 1]
        if len(shape) < 2 or len(non_one) > 1 or (non_one and non_one[0] > 4):
            raise DataError(path, f"array of shape {shape} is not one 2D image (+ up to 4 channels)",
                            "store a (H, W) or (C, H, W) array")
        check_chunk_grid(self._array, path)
        self.shape = (int(shape[-2]), int(shape[-1]))
        self.channels = non_one[0] if non_one else 1
        self._channel_axis = next((i for i, n in enumerate(lead) if n != 1), None)
        self.dtype = np.dtype(self._array.dtype)

    def _read(self, rows: slice, cols: slice) -> np.ndarray:
        index: list[Any] = [0] * (self._array.ndim - 2) + [rows, cols]
        if self._channel_axis is not None:
            index[self._channel_axis] = slice(None)
            return np.moveaxis(np.asarray(self._array[tuple(index)]), 0, -1)
        return np.asarray(self._array[tuple(index)])


def _decode_key(key: str, prefix: str, separator: str) -> tuple[int, ...]:
    """Chunk index of a key such as ``c/1/2`` (zarr 3 default) or ``1.2`` (zarr 2); ValueError if not one."""
    if prefix:
        if not key.startswith(prefix):
            raise ValueError(key)
        key = key[len(prefix):].lstrip(separator)
    return tuple(int(i) for i in key.split(separator)) if key else ()


def _chunk_keys(array: Any) -> tuple[tuple[str, str], list[str]] | None:
    """((key prefix, separator), stored chunk keys) of an array in a local directory store; None
    elsewhere (remote stores) or past MAX_LISTED_CHUNKS files (the check stays well under a second)."""
    root = getattr(array.store_path.store, "root", None)
    if root is None or getattr(array, "shards", None) is not None:  # keys of sharded arrays name shards
        return None
    meta = array.metadata
    v3 = getattr(meta, "chunk_key_encoding", None)
    encoding = ("c" if getattr(v3, "name", "v2") == "default" else "",
                getattr(v3, "separator", None) or getattr(meta, "dimension_separator", None) or ".")
    base = Path(root) / array.store_path.path
    keys: list[str] = []
    for folder, _, names in os.walk(base):
        for name in names:
            if name not in ZARR_METADATA:
                keys.append(str((Path(folder) / name).relative_to(base).as_posix()))
        if len(keys) > MAX_LISTED_CHUNKS:
            return None
    return encoding, keys


def check_chunk_grid(array: Any, path: Path) -> None:
    """No stored chunk may lie outside the grid of the declared shape and chunk shape (a shape
    edited down, or chunks of another array). Missing chunks are fine: zarr leaves empty ones out."""
    listed = _chunk_keys(array)
    if listed is None:
        return
    encoding, keys = listed
    grid = tuple(int(n) for n in array.cdata_shape)
    for key in keys:
        try:
            index = _decode_key(key, *encoding)
        except ValueError:
            continue  # not a chunk key (a stray file)
        if len(index) != len(grid) or any(i >= n for i, n in zip(index, grid, strict=True)):
            raise DataError(path, f"stored chunk {key!r} lies outside the chunk grid {grid} of the declared "
                            f"shape {tuple(array.shape)} and chunks {tuple(array.chunks)}",
                            "rewrite the array (its metadata and chunks disagree)")


def _level0(node: Any, path: Path) -> Any:
    if isinstance(node, zarr.Array):
        return node
    attrs = dict(node.attrs)
    multiscales = attrs.get("ome", attrs).get("multiscales")
    if not multiscales:
        raise ValueError("a zarr group without OME-Zarr multiscales metadata")
    return node[multiscales[0]["datasets"][0]["path"]]


@register_reader("pillow", (".png", ".jpg", ".jpeg"))
def open_pil(path: Path) -> list[ImageSource]:
    return [PilSource(path)]


@register_reader("zarr", (".zarr",))
def open_zarr(path: Path) -> list[ImageSource]:
    return [ZarrSource(path)]
