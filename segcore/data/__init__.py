"""Data layer: dataset folders (images/ + masks/ + dataset.yaml), reading, normalisation,
patch sampling and augmentation. See docs/DESIGN.md for the contracts.

Reading, specs and normalisation import without torch or albumentations (cheap for inference
workers and the generators); the dataset and augmentation names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from segcore.data.errors import DataError
from segcore.data.io import RawImage, read_image
from segcore.data.masks import mask_to_ids, read_mask
from segcore.data.normalize import NormStats, apply_norm, compute_norm_stats, strided_sample
from segcore.data.spec import IGNORE, DatasetSpec, load_spec, parse_spec

_LAZY = {
    "PatchDataset": "segcore.data.dataset",
    "Sample": "segcore.data.shared",
    "load_samples": "segcore.data.dataset",
    "make_sample": "segcore.data.dataset",
    "build_augmentation": "segcore.data.augment",
}

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


def __getattr__(name: str) -> Any:
    """Import torch-/albumentations-backed names on first access."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segcore.data' has no attribute {name!r}")
