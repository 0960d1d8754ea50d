"""The in-memory loader: whole normalised images + masks (:class:`Sample`) and the random-patch
training dataset. How images pair with masks: :mod:`segcore.data.shared`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcore.config import NormalizeConfig
from segcore.data.errors import DataError
from segcore.data.io import RawImage, read_image
from segcore.data.normalize import apply_norm, compute_norm_stats, strided_sample
from segcore.data.shared import (
    EpochPatches,
    Sample,
    dataset_files,
    find_mask,
    ignore_boundaries,
    mask_indices,
    mask_stem,
    read_mask_for,
)
from segcore.data.spec import IGNORE, DatasetSpec, load_spec

log = logging.getLogger(__name__)


def _fit_mask(raw: RawImage, image: Path, mask: np.ndarray, mask_path: Path, spec: DatasetSpec) -> np.ndarray:
    """The mask on the image's pixel grid: itself, or a coarser mask (``mask_scale``) resampled
    nearest; a size that fits no declared scale is a DataError naming both sizes."""
    h, w = raw.array.shape[:2]
    scale = spec.mask_scale_for((h, w), mask.shape, f"{image} ({raw.name}, mask {mask_path.name})")
    if scale != 1 or mask.shape != (h, w):
        mask = mask[np.ix_(mask_indices(0, h, 1.0, scale, mask.shape[0]), mask_indices(0, w, 1.0, scale, mask.shape[1]))]
    return ignore_boundaries(mask, spec.boundary_ignore)


def _check_pixels(raw: RawImage, image: Path) -> None:
    if np.issubdtype(raw.array.dtype, np.floating):
        bad = ~np.isfinite(raw.array)
        if bad.any():
            r, c = (int(v) for v in np.argwhere(bad)[0][:2])
            raise DataError(image, f"{raw.name} has {int(bad.sum())} NaN/inf values (first at row {r}, column {c})",
                            "replace them (e.g. with the background level) before training")


def make_sample(raw: RawImage, mask: np.ndarray, source: Path, cfg: NormalizeConfig) -> Sample:
    """Normalise ``raw`` to (C, H, W) float32 with stats from a strided sample of it."""
    stats = compute_norm_stats(strided_sample(raw.array), cfg, raw.header, source=source)
    arr = raw.array if raw.array.ndim == 3 else raw.array[..., None]
    image = np.ascontiguousarray(apply_norm(arr, stats).transpose(2, 0, 1))
    return Sample(raw.name, image, mask.astype(np.int64, copy=False), source)


def _check_channels(samples: list[Sample]) -> None:
    first = samples[0]
    for s in samples[1:]:
        if s.image.shape[0] != first.image.shape[0]:
            raise DataError(s.source, f"{s.name} has {s.image.shape[0]} channels but {first.source.name} has "
                            f"{first.image.shape[0]}", "convert all images of a dataset to the same channels")


def load_samples(data_dir: str | Path, spec: DatasetSpec | None = None,
                 normalize: NormalizeConfig | None = None) -> list[Sample]:
    """Read every image of ``<data_dir>/images`` with its mask from ``<data_dir>/masks``.

    ``normalize`` overrides ``spec.normalize`` (e.g. the TrainConfig's, so that the model card
    records what was applied). Raises :class:`DataError` naming the file for any bad input.
    """
    data_dir = Path(data_dir)
    spec = spec or load_spec(data_dir)
    cfg = normalize or spec.normalize
    images, masks = dataset_files(data_dir)
    samples: list[Sample] = []
    for image in images:
        stem = mask_stem(image, spec, masks)
        raws = read_image(image)
        for raw in raws:
            mask_path, from_fits = find_mask(image, raw, len(raws), stem, masks)
            mask = _fit_mask(raw, image, read_mask_for(raw, mask_path, from_fits, spec), mask_path, spec)
            _check_pixels(raw, image)
            samples.append(make_sample(raw, mask, image, cfg))
    _check_channels(samples)
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(data_dir / "images", f"several files give samples named {dup}",
                        "give each image a unique file name (e.g. not a.png and a.tif)")
    log.info("%s: %d samples, %d classes (%s)", data_dir, len(samples), spec.num_classes,
             ", ".join(spec.class_names))
    return samples


def _pad_small(sample: Sample, patch: int) -> Sample:
    """Pad an image smaller than the patch (reflect; mask with 255 = ignore) at bottom/right."""
    from segcore.tiling import reflect_pad

    h, w = sample.mask.shape
    ph, pw = max(patch - h, 0), max(patch - w, 0)
    if not (ph or pw):
        return sample
    log.warning("%s (%s): image %dx%d is smaller than the %d px patch; padded by reflection, "
                "padding ignored in the loss", sample.source, sample.name, h, w, patch)
    image = reflect_pad(sample.image, ((0, ph), (0, pw)))
    mask = np.pad(sample.mask, ((0, ph), (0, pw)), constant_values=IGNORE)
    return Sample(sample.name, np.ascontiguousarray(image), mask, sample.source)


class _ClassIndex:
    """Flat pixel indices of one mask grouped by class: ``order[start[c]:start[c] + count[c]]``.

    Built with one stable sort of a uint8 copy (numpy uses radix sort there: linear time).
    """

    def __init__(self, mask: np.ndarray, num_classes: int) -> None:
        small = np.uint8 if num_classes < 255 else np.uint16
        flat = np.where(mask.ravel() == IGNORE, num_classes, mask.ravel()).astype(small)
        dtype = np.int32 if flat.size < 2**31 else np.int64
        self.order = np.argsort(flat, kind="stable").astype(dtype, copy=False)
        self.count = np.bincount(flat, minlength=num_classes + 1)[:num_classes].astype(np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])

    def pixel(self, cls: int, u: float) -> int:
        return int(self.order[self.start[cls] + min(int(u * self.count[cls]), self.count[cls] - 1)])


class PatchDataset(EpochPatches):
    """``patches_per_epoch`` random ``patch_size`` patches drawn from ``samples``.

    With ``class_balanced`` each patch picks a class uniformly among the classes present, then
    a random pixel of that class (over all samples) as its centre, jittered by up to a quarter
    patch; otherwise a uniformly random position. Item ``i`` of epoch ``e`` depends only on
    ``(seed, e, i)``, so DDP ranks, dataloader workers and reruns agree; call :meth:`set_epoch`.
    ``augment`` is a callable like ``build_augmentation(...)``'s, called with HWC images.
    Returns ``(image float32 (C, p, p), mask int64 (p, p))`` tensors.
    """

    def __init__(self, samples: Sequence[Sample], patch_size: int, patches_per_epoch: int,
                 class_balanced: bool = True, augment: Callable[..., dict[str, Any]] | None = None,
                 seed: int = 0, num_classes: int | None = None) -> None:
        if not samples:
            raise ValueError("PatchDataset needs at least one sample")
        if patch_size < 1 or patches_per_epoch < 1:
            raise ValueError(f"patch_size and patches_per_epoch must be >= 1, got {patch_size}, {patches_per_epoch}")
        self.samples = [_pad_small(s, patch_size) for s in samples]
        self.patch_size = patch_size
        self.patches_per_epoch = patches_per_epoch
        self.class_balanced = class_balanced
        self.augment = augment
        self.seed = seed
        # shared memory, so set_epoch reaches persistent DataLoader workers too
        self._init_epoch()
        if num_classes is None:
            num_classes = 1 + max(int(m.max(initial=-1, where=m != IGNORE)) for m in (s.mask for s in self.samples))
        self.num_classes = max(num_classes, 1)
        self._index = [_ClassIndex(s.mask, self.num_classes) for s in self.samples] if class_balanced else []
        counts = np.array([ix.count for ix in self._index]) if class_balanced else None
        self._class_counts = counts
        self.present_classes = np.flatnonzero(counts.sum(0)) if counts is not None else np.arange(self.num_classes)
        areas = np.array([s.mask.size for s in self.samples], dtype=np.float64)
        self._area_cdf = np.cumsum(areas) / areas.sum()

    def _corner(self, rng: np.random.Generator) -> tuple[int, int, int]:
        p = self.patch_size
        if self.class_balanced and self.present_classes.size:
            cls = int(rng.choice(self.present_classes))
            cdf = np.cumsum(self._class_counts[:, cls]) / self._class_counts[:, cls].sum()
            k = int(np.searchsorted(cdf, rng.random(), side="right"))
            k = min(k, len(self.samples) - 1)
            h, w = self.samples[k].mask.shape
            y, x = divmod(self._index[k].pixel(cls, rng.random()), w)
            jy, jx = rng.integers(-(p // 4), p // 4 + 1, size=2)
            top = int(np.clip(y - p // 2 + jy, 0, h - p))
            left = int(np.clip(x - p // 2 + jx, 0, w - p))
            return k, top, left
        k = min(int(np.searchsorted(self._area_cdf, rng.random(), side="right")), len(self.samples) - 1)
        h, w = self.samples[k].mask.shape
        return k, int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.patches_per_epoch:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k, top, left = self._corner(rng)
        p = self.patch_size
        sample = self.samples[k]
        image = sample.image[:, top:top + p, left:left + p]
        mask = sample.mask[top:top + p, left:left + p]
        if self.augment is not None:
            image, mask = self._augment(image, mask, int(rng.integers(2**31)))
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), torch.from_numpy(
            np.ascontiguousarray(mask, dtype=np.int64))

    def _augment(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        from segcore.data.augment import seed_augmentation

        if hasattr(self.augment, "transforms"):
            seed_augmentation(self.augment, seed)
        out = self.augment(image=np.ascontiguousarray(image.transpose(1, 2, 0)), mask=mask.astype(np.uint8))
        aug_image = out["image"]
        if aug_image.ndim == 2:
            aug_image = aug_image[..., None]
        return aug_image.transpose(2, 0, 1), out["mask"].astype(np.int64)

    def class_pixel_counts(self) -> np.ndarray:
        """Labelled pixels per class over all samples (e.g. for inverse-frequency weights)."""
        total = np.zeros(self.num_classes, dtype=np.int64)
        for s in self.samples:
            valid = s.mask[s.mask != IGNORE]
            total += np.bincount(valid.ravel(), minlength=self.num_classes)[: self.num_classes]
        return total
