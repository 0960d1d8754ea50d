"""Raw pixels -> float32 model input, identically for training and tiled inference.

Statistics are computed once per image (``compute_norm_stats``, on a strided sample when the
image is huge) and then applied to every block of it (``apply_norm``), so a tile normalises
exactly like the same pixels inside the whole image.

Modes (``NormalizeConfig.mode``):

* ``dtype_range``: integers map their dtype's range to [0, 1] (uint8 / 255, uint16 / 65535,
  signed types from their minimum). Floats are taken as already scaled (offset 0, scale 1).
* ``percentile``: ``low_percentile`` -> 0 and ``high_percentile`` -> 1 (robust to hot pixels;
  values outside are *not* clipped, so bright clusters stay bright).
* ``zscore``: subtract ``mean`` and divide by ``std`` (from the config, else from the data).
* ``fits_header``: physical units from the FITS header of each HDU:
  ``x_norm = (x - PEDESTAL) * GAIN``. ``PEDESTAL`` (ADU, required) is the baseline;
  ``GAIN`` (electrons per ADU, optional, default 1) converts ADU to electrons. ``BZERO`` /
  ``BSCALE`` are already applied when astropy reads the file, so pixel values are ADU.
* ``none``: identity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcore.config import NormalizeConfig
from segcore.data.errors import DataError
from segcore.errors import ConfigError

log = logging.getLogger(__name__)

PEDESTAL_KEY = "PEDESTAL"
GAIN_KEY = "GAIN"


@dataclass(frozen=True)
class NormStats:
    """``x_norm = (x - offset) * scale``; two floats, cheap to ship to inference workers."""

    offset: float
    scale: float


def strided_sample(array: np.ndarray, max_pixels: int = 1 << 20, channels_last: bool = True) -> np.ndarray:
    """A regular subsample of at most ~``max_pixels`` spatial positions (every channel kept).

    Use it on huge images before :func:`compute_norm_stats`; ``array`` is (H, W) or (H, W, C)
    (``channels_last``) or (C, H, W). Works on memory maps and zarr arrays without loading them.
    """
    spatial = array.shape[:2] if (array.ndim == 2 or channels_last) else array.shape[-2:]
    step = max(1, math.ceil(math.sqrt(spatial[0] * spatial[1] / max_pixels)))
    if array.ndim == 2 or channels_last:
        return np.asarray(array[::step, ::step])
    return np.asarray(array[..., ::step, ::step])


def _dtype_range(dtype: np.dtype) -> NormStats:
    if dtype == np.bool_:
        return NormStats(0.0, 1.0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return NormStats(float(info.min), 1.0 / (float(info.max) - float(info.min)))
    log.warning("dtype_range normalisation of %s data: floats are used as they are; "
                "set normalize.mode to percentile or zscore if they are not already scaled", dtype)
    return NormStats(0.0, 1.0)


def _finite(array: np.ndarray) -> np.ndarray:
    values = np.asarray(array).ravel()
    if np.issubdtype(values.dtype, np.floating):
        values = values[np.isfinite(values)]
    return values


def _fits_header(header: dict[str, Any] | None, source: str) -> NormStats:
    fix = (f"add {PEDESTAL_KEY} (ADU) and optionally {GAIN_KEY} (electrons per ADU) to the image HDU "
           "or the primary header (read through the INHERIT convention), or set normalize.mode: percentile")
    if header is None:
        raise DataError(source, "normalize.mode fits_header needs a FITS header, and this image has none", fix)
    if PEDESTAL_KEY not in header:
        raise DataError(source, f"normalize.mode fits_header needs header key {PEDESTAL_KEY}, which is in neither "
                        "this HDU's header nor the primary header", fix)
    try:
        pedestal = float(header[PEDESTAL_KEY])
        gain = float(header.get(GAIN_KEY, 1.0))
    except (TypeError, ValueError):
        raise DataError(source, f"header keys {PEDESTAL_KEY}/{GAIN_KEY} are not numbers", fix) from None
    if not gain > 0:
        raise DataError(source, f"header {GAIN_KEY}={gain} must be positive", fix)
    return NormStats(pedestal, gain)


def compute_norm_stats(
    array: np.ndarray,
    cfg: NormalizeConfig,
    header: dict[str, Any] | None = None,
    source: str | Path | None = None,
) -> NormStats:
    """Offset and scale for one image under ``cfg``; ``array`` may be a strided sample of it.

    ``header`` (FITS cards as a dict) is needed for ``fits_header``; ``source`` names the file
    in error messages.
    """
    src = str(source) if source is not None else "<array>"
    mode = cfg.mode
    if mode == "none":
        return NormStats(0.0, 1.0)
    if mode == "dtype_range":
        return _dtype_range(np.asarray(array).dtype)
    if mode == "fits_header":
        return _fits_header(header, src)
    values = _finite(array)
    if values.size == 0:
        raise DataError(src, "no finite pixel values to compute normalisation from", "check the image")
    if mode == "percentile":
        if not 0 <= cfg.low_percentile < cfg.high_percentile <= 100:
            raise ConfigError(f"normalize: need 0 <= low_percentile < high_percentile <= 100, got "
                             f"{cfg.low_percentile}, {cfg.high_percentile}")
        lo, hi = np.percentile(values, [cfg.low_percentile, cfg.high_percentile])
        return NormStats(float(lo), 1.0 / float(hi - lo) if hi > lo else 1.0)
    if mode == "zscore":
        mean = cfg.mean if cfg.mean is not None else float(values.mean(dtype=np.float64))
        std = cfg.std if cfg.std is not None else float(values.std(dtype=np.float64))
        return NormStats(float(mean), 1.0 / std if std > 0 else 1.0)
    raise ValueError(f"unknown normalize.mode {mode!r}")


def apply_norm(block: np.ndarray, stats: NormStats) -> np.ndarray:
    """``(block - offset) * scale`` as float32 (any shape; a tile or a whole image)."""
    out = np.asarray(block).astype(np.float32, copy=True)
    out -= np.float32(stats.offset)
    out *= np.float32(stats.scale)
    return out


INPUT_RANGE_PERCENTILES = (0.5, 99.5)
RANGE_TOLERANCE = 0.5  # of the training range's span, on each side
RANGE_WARN_FRACTION = 0.05  # warn when more than this share of a sample falls outside


def input_range(normalised: list[np.ndarray], max_pixels: int = 1 << 20) -> tuple[float, float]:
    """The (0.5, 99.5) percentiles of normalised training pixels (saved on the model card)."""
    per_image = max(1, max_pixels // max(len(normalised), 1))
    values = np.concatenate([_finite(strided_sample(a, per_image, channels_last=False)) for a in normalised])
    lo, hi = np.percentile(values, INPUT_RANGE_PERCENTILES) if values.size else (0.0, 1.0)
    return float(lo), float(hi)


def range_warning(sample: np.ndarray, trained: tuple[float, float] | None, source: str) -> str | None:
    """A warning when a normalised ``sample`` of an input falls far outside the range the model
    was trained on (e.g. float data taken as pre-scaled, or another detector's units); else None."""
    values = _finite(sample)
    if trained is None or values.size == 0:
        return None
    lo, hi = trained
    margin = RANGE_TOLERANCE * max(hi - lo, 1e-6)
    outside = float(np.mean((values < lo - margin) | (values > hi + margin)))
    if outside <= RANGE_WARN_FRACTION:
        return None
    p_lo, p_hi = np.percentile(values, INPUT_RANGE_PERCENTILES)
    return (f"{source}: {100 * outside:.0f}% of its normalised pixels lie far outside the range the model was "
            f"trained on ([{lo:.3g}, {hi:.3g}]; this input spans [{p_lo:.3g}, {p_hi:.3g}]). The labels may be "
            "meaningless: check the input's units and the model's normalize setting")
