"""Data layer: dataset folders (images/ + masks/ + dataset.yaml), reading, normalisation,
patch sampling and augmentation. See docs/DESIGN.md for the contracts."""

from typing import Any

from segcore.data.dataset import PatchDataset, Sample, load_samples, make_sample
from segcore.data.errors import DataError
from segcore.data.io import RawImage, mask_to_ids, read_image, read_mask
from segcore.data.normalize import NormStats, apply_norm, compute_norm_stats, strided_sample
from segcore.data.spec import IGNORE, DatasetSpec, load_spec, parse_spec

__all__ = [
    "IGNORE",
    "DataError",
    "DatasetSpec",
    "NormStats",
    "PatchDataset",
    "RawImage",
    "Sample",
    "apply_norm",
    "build_augmentation",
    "compute_norm_stats",
    "load_samples",
    "load_spec",
    "make_sample",
    "mask_to_ids",
    "parse_spec",
    "read_image",
    "read_mask",
    "strided_sample",
]


def __getattr__(name: str) -> Any:  # albumentations/cv2 load only when augmentation is used
    if name == "build_augmentation":
        from segcore.data.augment import build_augmentation

        return build_augmentation
    raise AttributeError(name)
