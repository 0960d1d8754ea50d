"""What both training loaders share (the in-memory :mod:`.dataset` and the lazy :mod:`.lazy`):
finding a dataset's files and pairing each image with its mask, resampling a coarse mask onto a
grid, :class:`Sample` and :class:`EpochPatches`, the base of both patch datasets.

Images pair with masks by file stem (``images/a.tif`` -> ``masks/a.png``; any supported
suffix), or through ``pairing`` in dataset.yaml. FITS images give one sample per image HDU,
named ``<stem>_<EXTNAME>`` (``<stem>_<hdu number>`` without EXTNAME; just ``<stem>`` for a
single image HDU). The mask of HDU number ``i`` with EXTNAME ``E`` is the first that exists of:

1. ``masks/<mask stem>_<E>.<png|tif|...>`` (what ``gigaseg simulate ccd`` writes),
2. ``masks/<mask stem>_<i>.<...>``,
3. ``masks/<mask stem>.<...>`` (only for a FITS with a single image HDU),
4. a mask FITS ``masks/<mask stem>.fits``: its HDU with EXTNAME ``E``, else HDU number ``i``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from segcore.data.errors import DataError
from segcore.data.io import RawImage, file_stem, is_fits, is_supported, read_image
from segcore.data.masks import mask_to_ids, read_mask
from segcore.data.spec import IGNORE, DatasetSpec

# ----------------------------------------------------------------------------- files and pairing


def index_files(folder: Path) -> dict[str, list[Path]]:
    """The readable image files of ``folder`` by file stem (a DataError if the folder is missing)."""
    if not folder.is_dir():
        raise DataError(folder, "folder not found", f"a dataset needs {folder.name}/ next to the other folder")
    index: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if is_supported(p):
            index.setdefault(file_stem(p), []).append(p)
    return index


def mask_stem(image: Path, spec: DatasetSpec, masks: dict[str, list[Path]]) -> str:
    """The mask stem for ``image`` under ``spec.pairing``."""
    pairing = spec.pairing
    groups = pairing.match_image(file_stem(image))
    if groups is None:
        raise DataError(image, f"name does not match pairing.image_regex {pairing.image_regex!r}",
                        "rename the file or fix pairing.image_regex in dataset.yaml")
    if pairing.mask_template is not None:
        return pairing.mask_template.format(**groups)
    if pairing.mask_regex is not None:
        hits = [s for s in masks if (m := re.fullmatch(pairing.mask_regex, s)) and m.groupdict() == groups]
        if len(hits) > 1:
            raise DataError(image, f"several masks match: {hits}", "keep one mask per image")
        return hits[0] if hits else pairing.mask_regex
    return groups["stem"]


def _unique(stem: str, masks: dict[str, list[Path]]) -> Path | None:
    paths = masks.get(stem, [])
    if len(paths) > 1:
        raise DataError(paths[0].parent / stem, f"several mask files share this name: {[p.name for p in paths]}",
                        "keep one mask file per image")
    return paths[0] if paths else None


def find_mask(image: Path, raw: RawImage, n_raw: int, stem: str,
              masks: dict[str, list[Path]]) -> tuple[Path, bool]:
    """The mask file of one raw image and whether it is a per-HDU mask FITS (see module doc)."""
    candidates = [stem] if n_raw == 1 else []
    if is_fits(image):
        candidates = [f"{stem}_{raw.extname}"] * bool(raw.extname) + [f"{stem}_{raw.index}"] + candidates
    for cand in candidates:
        path = _unique(cand, masks)
        if path is not None:
            return path, is_fits(path) and is_fits(image)
    path = _unique(stem, masks)
    if path is not None and is_fits(path) and is_fits(image):
        return path, True
    looked = ", ".join(f"{c}.*" for c in dict.fromkeys(candidates + [stem]))
    raise DataError(image, f"no mask for {raw.name} in masks/ (looked for {looked})",
                    "add the mask, or fix pairing in dataset.yaml")


def read_mask_for(raw: RawImage, path: Path, from_fits: bool, spec: DatasetSpec) -> np.ndarray:
    """Read the mask of ``raw``; in a mask FITS pick the HDU with its EXTNAME, else its number."""
    if not from_fits:
        return read_mask(path, spec)
    hdus = read_image(path, palette_indices=True)
    pick = [m for m in hdus if raw.extname and m.extname == raw.extname] or [m for m in hdus if m.index == raw.index]
    if len(hdus) == 1:
        pick = hdus
    if not pick:
        have = ", ".join(f"{m.index}:{m.extname or ''}" for m in hdus)
        raise DataError(path, f"no HDU for image HDU {raw.index} (EXTNAME {raw.extname}); mask HDUs are {have}",
                        "give the mask FITS the image's EXTNAMEs or HDU layout")
    return mask_to_ids(pick[0].array, spec, f"{path}[{pick[0].extname or pick[0].index}]")


def dataset_files(data_dir: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """The image files of ``<data_dir>/images`` and the mask index of ``<data_dir>/masks``."""
    images = [p for paths in index_files(data_dir / "images").values() for p in paths]
    if not images:
        raise DataError(data_dir / "images", "no images (PNG, JPEG, TIFF or FITS) found", "add images")
    return images, index_files(data_dir / "masks")


# ----------------------------------------------------------------------------- masks on a grid


def mask_indices(start: int, n: int, scale: float, mask_scale: float, size: int) -> np.ndarray:
    """Mask px under the centres of model px ``start .. start + n - 1`` (nearest, clipped)."""
    centres = (start + np.arange(n) + 0.5) * scale / mask_scale
    return np.clip(np.floor(centres).astype(np.int64), 0, size - 1)


def ignore_boundaries(mask: np.ndarray, k: int) -> np.ndarray:
    """``mask`` with pixels within ``k`` px (chessboard) of a label boundary set to 255."""
    if k <= 0:
        return mask
    from scipy import ndimage

    edge = np.zeros(mask.shape, bool)
    dy, dx = mask[1:, :] != mask[:-1, :], mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    if k > 1:
        edge = ndimage.binary_dilation(edge, np.ones((3, 3), bool), iterations=k - 1)
    out = mask.copy()
    out[edge] = IGNORE
    return out


# ----------------------------------------------------------------------------- samples and patches


@dataclass
class Sample:
    """One training/validation image: normalised (C, H, W) float32 and int64 (H, W) class ids."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    source: Path


class EpochPatches(Dataset):
    """``patches_per_epoch`` random patches whose stream depends on ``(seed, epoch, index)``; the
    epoch lives in shared memory, so persistent DataLoader workers see :meth:`set_epoch`."""

    patches_per_epoch: int
    _epoch: torch.Tensor

    def _init_epoch(self) -> None:
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.patches_per_epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch`` (call before each epoch, like DistributedSampler)."""
        self._epoch.fill_(int(epoch))
