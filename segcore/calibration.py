"""Temperature scaling (Guo et al. 2017) fitted on validation, and the tiled probabilities it needs.

A single temperature T divides a model's logits (``LoadedModel.predict_tensor``) or, for an
ensemble, the log of its averaged probabilities (``softmax(log p / T)``: the same thing for one
model). T is chosen by minimising the validation NLL with a 1-D search over log T; argmax labels
do not change, only how confident the probabilities (and ``segment``'s entropy) are. 1-channel
(binary) heads are not calibrated: their labels come from a probability threshold, which a
temperature would move.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segcore.modelio.card import CONFIG_FILE, TEMPERATURE_KEY
from segcore.modelio.folder import LoadedModel
from segcore.tiling import flip_tta, pad_to_multiple, predict_tiled

log = logging.getLogger(__name__)

IGNORE = 255
LOG_T_RANGE = (math.log(0.01), math.log(1000.0))


@dataclass
class CalibrationResult:
    """The fitted temperature (relative to the probabilities it was fitted on) and the ECE/NLL
    before and after."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float


def tiled_proba(loaded: LoadedModel, image: np.ndarray, tile: int, halo: int, batch_size: int = 8,
                tta: bool = False, log: bool = False) -> np.ndarray:
    """(K, H, W) probabilities (``log``: log-probabilities, exact where probabilities round to 0 or 1)
    of a normalised (C, H, W) image, tiled as ``segment`` tiles it (padded to the model's size
    multiple outside the flips, as ``pipelines.predictor`` does)."""
    if log and tta:
        raise ValueError("tiled_proba: log-probabilities of a flip-averaged prediction are not supported")
    predict = (lambda b: loaded.predict_log_tensor(b).cpu().numpy()) if log else loaded.predict_proba
    if tta:
        predict = flip_tta(predict)
    predict = pad_to_multiple(predict, loaded.size_multiple)
    return predict_tiled(image, predict, tile=tile, halo=halo, batch_size=batch_size)


def _flat(logp: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, ...) log-probabilities and (...) labels -> (P, K) and (P,), ignored px dropped."""
    k = logp.shape[0]
    p = torch.from_numpy(np.ascontiguousarray(logp.reshape(k, -1).T, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels).reshape(-1).astype(np.int64))
    keep = y != IGNORE
    return p[keep], y[keep]


def log_of(proba: np.ndarray) -> np.ndarray:
    """Log-probabilities from probabilities (clamped at 1e-30), for inputs only known as probabilities."""
    return np.log(np.maximum(proba, 1e-30, dtype=np.float32))


def expected_calibration_error(logp: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of (K, ...) log-probabilities: the pixel-weighted mean |accuracy - confidence| over
    ``n_bins`` equal confidence bins."""
    t, y = _flat(logp, labels)
    return _ece(t, y, n_bins)


def _ece(logp: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    if y.numel() == 0:
        return float("nan")
    conf, pred = logp.exp().max(dim=1)
    correct = (pred == y).float()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    acc = torch.bincount(bins, weights=correct, minlength=n_bins)
    cf = torch.bincount(bins, weights=conf, minlength=n_bins)
    return float(((acc - cf).abs().sum() / y.numel()).item())


def _nll(logp: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logp / temperature, y).item())


def fit_temperature(logp_in: np.ndarray, labels: np.ndarray, max_pixels: int = 2_000_000,
                    seed: int = 0) -> CalibrationResult:
    """The T minimising NLL of ``softmax(log p / T)`` on (K, ...) log-probabilities against ``labels``: a
    coarse grid over log T in [log 0.01, log 1000], then golden-section refinement. At most
    ``max_pixels`` labelled pixels are used (a fixed random subset)."""
    logp, y = _flat(logp_in, labels)
    if y.numel() > max_pixels:
        idx = torch.from_numpy(np.random.default_rng(seed).choice(y.numel(), max_pixels, replace=False))
        logp, y = logp[idx], y[idx]
    if y.numel() == 0:
        raise ValueError("fit_temperature: no labelled pixels")

    def loss(log_t: float) -> float:
        return _nll(logp, y, math.exp(log_t))

    grid = np.linspace(*LOG_T_RANGE, 41)
    values = [loss(t) for t in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = _golden(loss, lo, hi)
    if loss(best) > loss(0.0):  # never worse than T = 1 on the data it was fitted on
        best = 0.0
    t = math.exp(best)
    return CalibrationResult(temperature=t, ece_before=_ece(logp, y), ece_after=_ece(torch.log_softmax(logp / t, dim=1), y),
                             nll_before=loss(0.0), nll_after=loss(best))


def _golden(f, lo: float, hi: float, iters: int = 30) -> float:  # noqa: ANN001 (a 1-D function)
    """Golden-section minimum of a unimodal ``f`` on [lo, hi]."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def calibrate_log_probas(log_probas: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                         **kwargs) -> CalibrationResult:
    """:func:`fit_temperature` over several images' (K, H, W) log-probabilities and (H, W) labels."""
    k = log_probas[0].shape[0]
    flat = np.concatenate([p.reshape(k, -1) for p in log_probas], axis=1)
    return fit_temperature(flat, np.concatenate([np.asarray(m).reshape(-1) for m in labels]), **kwargs)


def set_card_extra(model_dir: str | Path, key: str, value: object) -> None:
    """Set ``extra[key]`` in a model (or ensemble) directory's config.json."""
    cfg = Path(model_dir) / CONFIG_FILE
    data = json.loads(cfg.read_text())
    data.setdefault("extra", {})[key] = value
    cfg.write_text(json.dumps(data, indent=2))


def calibrate_model(loaded: LoadedModel, model_dir: str | Path, log_probas: Sequence[np.ndarray],
                    labels: Sequence[np.ndarray]) -> CalibrationResult | None:
    """Fit T on ``log_probas`` (the model's current validation log-probabilities) and store the composed
    temperature (card's T x fitted T) in ``model_dir``; None (and nothing stored) for a binary head."""
    if loaded.binary:
        log.info("calibration skipped: %s has a 1-channel head (its labels come from a probability threshold, "
                 "which a temperature would move)", loaded.source or model_dir)
        return None
    result = calibrate_log_probas(log_probas, labels)
    composed = loaded.temperature * result.temperature
    set_card_extra(model_dir, TEMPERATURE_KEY, composed)
    log.info("calibration: temperature %.3f (card %.3f); ECE %.4f -> %.4f, NLL %.4f -> %.4f on validation",
             composed, loaded.temperature, result.ece_before, result.ece_after, result.nll_before, result.nll_after)
    return result
