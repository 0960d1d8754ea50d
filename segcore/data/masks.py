"""Reading masks as class ids (int64, 255 = ignore), validated against the dataset spec: ids
(with ``id_map``) or colours (``mask_mode: rgb``), one FITS HDU picked by EXTNAME or number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segcore.data.errors import DataError
from segcore.data.io import RawImage, read_image
from segcore.data.spec import IGNORE, DatasetSpec


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
