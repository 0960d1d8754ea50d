"""Small-image formats (PNG/JPEG via Pillow, read whole on first access) and zarr arrays
(a 2D or channels-first 3D array, or level 0 of an OME-Zarr multiscale group)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image

from pipelines.readers import ImageSource, register_reader
from segcore.data.errors import DataError

log = logging.getLogger(__name__)

BIG_PIL_PIXELS = 64 << 20
_PIL_MODES = {"L": "L", "I;16": "I;16", "I;16B": "I;16", "I": "I", "F": "F", "RGB": "RGB", "RGBA": "RGB", "P": "RGB",
              "LA": "L", "1": "L", "CMYK": "RGB", "YCbCr": "RGB"}


class PilSource(ImageSource):
    """PNG/JPEG: decoded whole on the first read (they cannot be read by region)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            with Image.open(path) as im:
                self._mode = _PIL_MODES.get(im.mode, "RGB")
                width, height = im.size
        except (OSError, ValueError) as err:
            raise DataError(path, f"not a readable image ({err})", "re-export it as PNG or TIFF") from None
        self.shape = (height, width)
        self.channels = 3 if self._mode == "RGB" else 1
        self.dtype = np.dtype({"L": np.uint8, "RGB": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}[self._mode])
        self._pixels: np.ndarray | None = None
        if height * width > BIG_PIL_PIXELS:
            log.warning("%s: %d x %d PNG/JPEG is decoded whole in every worker; use a tiled TIFF for big images",
                        path, height, width)

    def _read(self, rows: slice, cols: slice) -> np.ndarray:
        if self._pixels is None:
            try:
                with Image.open(self.path) as im:
                    im = im if im.mode == self._mode else im.convert(self._mode)
                    self._pixels = np.asarray(im).astype(self.dtype, copy=False)
            except (OSError, ValueError) as err:
                raise DataError(self.path, f"cannot decode image ({err})", "re-export it as PNG or TIFF") from None
        return self._pixels[rows, cols]


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
