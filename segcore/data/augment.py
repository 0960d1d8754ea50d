"""Joint image/mask augmentation with one ``strength`` knob in [0, 1] that a search can tune.

At strength 1 the affine part matches the SEM study (rotate +-15 deg, shift 5 %, Keras shear
50, zoom 30 %); every range and probability scales linearly with strength, 0 disables augmentation.
Masks always use nearest-neighbour interpolation and pixels moved in from outside the patch
get 255 (ignore). Photometric changes are custom transforms that do not clip, because
normalised data (CCD clusters, percentile-scaled images) is not confined to [0, 1] the way
albumentations assumes for float32.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

from segcore.data.spec import IGNORE
from segcore.errors import ConfigError

# Keras' shear_range=50 (the SEM study) maps x -> x - sin(50 deg) y; albumentations uses
# tan(angle), so the same shear is atan(sin(50 deg)) ~ 37 deg here.
SHEAR = 37.5


class ScaleShift(A.ImageOnlyTransform):
    """Contrast and brightness without clipping: ``x * (1 + c) + b``, c, b uniform in +-limits."""

    def __init__(self, contrast_limit: float = 0.2, brightness_limit: float = 0.2, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.contrast_limit = contrast_limit
        self.brightness_limit = brightness_limit

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        return {
            "alpha": 1.0 + rng.uniform(-self.contrast_limit, self.contrast_limit),
            "beta": rng.uniform(-self.brightness_limit, self.brightness_limit),
        }

    def apply(self, img: np.ndarray, alpha: float = 1.0, beta: float = 0.0, **params: Any) -> np.ndarray:
        return (img * np.float32(alpha) + np.float32(beta)).astype(np.float32, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("contrast_limit", "brightness_limit")


class AddGaussianNoise(A.ImageOnlyTransform):
    """Additive Gaussian noise with std uniform in [0, ``max_std``] (normalised units), no clipping."""

    def __init__(self, max_std: float = 0.05, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.max_std = max_std

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        return {"std": rng.uniform(0.0, self.max_std), "noise_seed": int(rng.integers(2**31))}

    def apply(self, img: np.ndarray, std: float = 0.0, noise_seed: int = 0, **params: Any) -> np.ndarray:
        noise = np.random.default_rng(noise_seed).standard_normal(img.shape, dtype=np.float32)
        return (img + noise * np.float32(std)).astype(np.float32, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_std",)


def _geometric(s: float) -> list[A.BasicTransform]:
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0.0, "fill_mask": IGNORE,
              "interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST}
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(rotate=(-15 * s, 15 * s), translate_percent=(-0.05 * s, 0.05 * s),
                 shear={"x": (-SHEAR * s, SHEAR * s), "y": (0.0, 0.0)},
                 scale=(1 - 0.3 * s, 1 + 0.3 * s), keep_ratio=True, p=0.7 * s, **border),
        A.OneOf([
            A.OpticalDistortion(distort_limit=0.3 * s, **border),
            A.ElasticTransform(alpha=40 * s, sigma=6.0, **border),
        ], p=0.3 * s),
    ]


def build_augmentation(strength: float, photometric: bool = True) -> A.Compose | None:
    """Flips, rot90, affine, optical/elastic distortion, brightness/contrast and noise scaled by
    ``strength``; None for strength 0. Call as ``aug(image=hwc_float32, mask=hw_uint8)``.

    ``photometric=False`` keeps only the geometric part (useful to check alignment).
    """
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"augmentation strength must be in [0, 1], got {strength}")
    if strength == 0:
        return None
    transforms = _geometric(strength)
    if photometric:
        transforms += [
            ScaleShift(contrast_limit=0.2 * strength, brightness_limit=0.2 * strength, p=0.5),
            AddGaussianNoise(max_std=0.05 * strength, p=0.3),
        ]
    return A.Compose(transforms, seed=0)


def seed_augmentation(aug: A.BaseCompose | A.BasicTransform, seed: int) -> None:
    """Give every transform in ``aug`` its own generator derived from ``seed``.

    ``Compose.set_random_seed`` hands the *same* seed to every transform, which makes e.g. the
    horizontal and vertical flips always agree; this gives each one a distinct stream.
    """
    counter = 0

    def walk(t: Any) -> None:
        nonlocal counter
        t.set_random_seed(int(np.random.SeedSequence([seed, counter]).generate_state(1)[0]))
        counter += 1
        for child in getattr(t, "transforms", ()):
            walk(child)

    walk(aug)
