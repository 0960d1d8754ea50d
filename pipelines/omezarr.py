"""The label store: an OME-Zarr 0.5 image group (zarr format 3) per segmented image.

Why 0.5: napari opens OME-Zarr through napari-ome-zarr, which reads with ome-zarr-py; the
releases that run with zarr 3 (ome-zarr-py >= 0.11) read 0.5 (zarr v3, metadata under the
``ome`` attribute) as well as 0.4, so 0.5 is the native choice for zarr 3.

Layout of one image group::

    <group>/zarr.json          attributes: ome.multiscales (levels 0..L, scale 2**l),
                               ome.image-label (class colours and names), gigaseg (run facts)
    <group>/0                  uint8 (H, W) class ids (or a 0/1 mask), chunks == tiles
    <group>/1 .. <group>/L     2x2 mode-downsampled levels, built chunk by chunk afterwards
    <group>/probabilities      optional float16 (K, H, W)
    <group>/uncertainty        optional float16 (H, W): softmax entropy / log(K), in [0, 1]

Arrays are unsharded and chunk-aligned with the windows' write regions, so every window
writes whole chunks of its own and parallel workers never touch the same chunk.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

OME_VERSION = "0.5"
NODATA = 255  # label value of pixels whose input was NaN/inf (see pipelines.predictor)
LEVEL0 = "0"
PROBABILITIES = "probabilities"
UNCERTAINTY = "uncertainty"


def create_image_group(
    path: Path, shape: tuple[int, int], tile: int, n_classes: int, probabilities: bool, uncertainty: bool
) -> None:
    """Create (replacing anything there) the group with its level-0 and optional arrays."""
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs["gigaseg"] = {"status": "writing"}
    group.create_array(LEVEL0, shape=shape, chunks=(tile, tile), dtype="uint8", fill_value=0,
                       dimension_names=["y", "x"])
    if probabilities:
        group.create_array(PROBABILITIES, shape=(n_classes, *shape), chunks=(n_classes, tile, tile),
                           dtype="float16", fill_value=0, dimension_names=["c", "y", "x"])
    if uncertainty:
        group.create_array(UNCERTAINTY, shape=shape, chunks=(tile, tile), dtype="float16", fill_value=0,
                           dimension_names=["y", "x"])


def ensure_root_group(path: Path, images: list[str]) -> None:
    """The plain group holding one image group per FITS HDU (``<stem>.zarr``)."""
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    group.attrs["gigaseg"] = {"images": images}


def open_arrays(path: Path) -> dict[str, Any]:
    """Writable handles on the arrays the workers fill (level 0 and the optional ones)."""
    group = zarr.open_group(str(path), mode="r+")
    names = {k for k, _ in group.arrays()}
    return {k: group[k] for k in (LEVEL0, PROBABILITIES, UNCERTAINTY) if k in names}


def remove_partial_files(path: Path) -> int:
    """Delete ``*.partial`` files a killed writer left (zarr writes chunks to a temp file, then renames)."""
    removed = 0
    for p in path.rglob("*.partial"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def level_shapes(shape: tuple[int, int], tile: int) -> list[tuple[int, int]]:
    """Level 0 then halved shapes until the long side fits in one ``tile``."""
    shapes = [shape]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def mode_downsample(block: np.ndarray) -> np.ndarray:
    """2x2 mode of a label block (odd edges repeated); ties go to the top-left-most candidate."""
    h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2)), mode="edge")
    a, b, c, d = block[0::2, 0::2], block[0::2, 1::2], block[1::2, 0::2], block[1::2, 1::2]
    ab, ac, ad, bc, bd, cd = a == b, a == c, a == d, b == c, b == d, c == d
    votes = [ab.astype(np.uint8) + ac + ad, ab.astype(np.uint8) + bc + bd,
             ac.astype(np.uint8) + bc + cd, ad.astype(np.uint8) + bd + cd]
    out, best = a.copy(), votes[0]
    for cand, vote in zip((b, c, d), votes[1:], strict=True):
        better = vote > best
        out[better] = cand[better]
        best = np.maximum(best, vote)
    return out


def _chunks(shape: tuple[int, int], tile: int) -> Iterator[tuple[slice, slice]]:
    for r in range(0, shape[0], tile):
        for c in range(0, shape[1], tile):
            yield slice(r, min(r + tile, shape[0])), slice(c, min(c + tile, shape[1]))


def build_pyramid(path: Path, tile: int, n_values: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Write levels 1..L chunk by chunk from the level below; return level shapes and the
    pixel counts of level 0 (counted while it is read for level 1): one per value 0..n_values-1,
    then the no-data count (value :data:`NODATA`) last."""
    group = zarr.open_group(str(path), mode="r+")
    src = group[LEVEL0]
    shapes = level_shapes(tuple(src.shape), tile)
    counts = np.zeros(256, dtype=np.int64)
    if len(shapes) == 1:
        for rows, cols in _chunks(shapes[0], tile):
            counts += np.bincount(src[rows, cols].ravel(), minlength=256)
    for level, shape in enumerate(shapes[1:], 1):
        dst = group.create_array(str(level), shape=shape, chunks=(tile, tile), dtype="uint8", fill_value=0,
                                 dimension_names=["y", "x"], overwrite=True)
        for rows, cols in _chunks(shape, tile):
            block = src[2 * rows.start : 2 * rows.stop, 2 * cols.start : 2 * cols.stop]
            if level == 1:
                counts += np.bincount(block.ravel(), minlength=256)
            dst[rows, cols] = mode_downsample(block)[: rows.stop - rows.start, : cols.stop - cols.start]
        src = dst
    return shapes, np.append(counts[: max(n_values, 1)], counts[NODATA])


def write_metadata(path: Path, name: str, n_levels: int, labels: list[str],
                   colors: list[tuple[int, int, int]], extra: dict[str, Any], base_scale: float = 1.0) -> None:
    """OME-Zarr 0.5 ``multiscales`` + ``image-label`` attributes, and gigaseg's own facts.
    ``base_scale``: input px per level-0 px (1 when labels are on the input's grid; a model's
    ``data.scale`` when they were written on its grid), so coordinates are the input's."""
    datasets = []
    for level in range(n_levels):
        s = float(base_scale) * 2**level
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [s, s]}, {"type": "translation", "translation": [(s - 1) / 2] * 2}]})
    ome = {
        "version": OME_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": datasets,
            "type": "mode",
            "metadata": {"description": "2x2 mode downsampling of labels, ties to the top-left pixel"},
        }],
        "image-label": {
            "colors": [{"label-value": i, "rgba": [*map(int, c), 255]} for i, c in enumerate(colors)],
            "properties": [{"label-value": i, "class": n} for i, n in enumerate(labels)]
            + [{"label-value": NODATA, "class": "no data (NaN/inf input)"}],
        },
    }
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.update({"ome": ome, "gigaseg": {**extra, "status": "complete"}})


def preview_level(path: Path, max_side: int) -> np.ndarray:
    """The largest pyramid level whose long side is at most ``max_side`` (never level 0 of a
    big image), read whole; strided if even the smallest level is larger."""
    group = zarr.open_group(str(path), mode="r")
    levels = sorted((int(k) for k, _ in group.arrays() if k.isdigit()))
    for level in levels:
        arr = group[str(level)]
        if max(arr.shape) <= max_side:
            return np.asarray(arr[:])
    arr = group[str(levels[-1])]
    step = math.ceil(max(arr.shape) / max_side)
    return np.asarray(arr[::step, ::step])
