"""The exact halo, measured: the smallest halo at which tiled prediction's labels equal the
whole-image prediction's labels, found at the end of training and stored on the model card.

Why measured: a U-Net's receptive field reaches hundreds of pixels, but how far context really
changes a *label* depends on the trained weights. Too small a halo leaves seams; too large a one
costs forward pixels on every window. ``gigaseg segment`` reads ``card.extra["halo"]``
(:data:`HALO_KEY`) and picks its tile from it.

The reference is :func:`segcore.tiling.predict_whole`: the image padded only to the model's size
multiple, in one call; candidate halos are multiples of that size multiple, so every window
meets the encoder at the whole image's stride phase.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from segcore.tiling import PredictFn, pad_to_multiple, predict_whole, round_up, shape_batches, split_windows

log = logging.getLogger(__name__)

HALO_KEY = "halo"  # == pipelines.options.HALO_CARD_KEY
MEASURED_ON_KEY = "halo_measured_on"
HALO_CAP = 256  # px: the largest halo tried
MIN_TILE = 64  # the measuring tile: the smallest multiple of the size multiple >= this
MAX_IMAGES = 2  # validation images measured on (each cropped, see measuring_images)
Labels = Callable[[np.ndarray], np.ndarray]  # (K, h, w) probabilities -> (h, w) class ids


def argmax_labels(proba: np.ndarray) -> np.ndarray:
    return proba.argmax(axis=0)


def measuring_tile(multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= :data:`MIN_TILE`: small, so crops have many interior
    seams (at tile 128 a resnet18 U-Net measured 160 px, at 64 px 192 px, which left no label
    differing at segment's chosen tile on a 2560 px scan)."""
    return round_up(MIN_TILE, multiple)


def measuring_images(images: Sequence[np.ndarray], tile: int, cap: int, max_images: int = MAX_IMAGES) -> list[np.ndarray]:
    """Up to ``max_images`` of the largest (C, H, W) images, centre-cropped to ``2 * tile + cap``
    a side: large enough to test every halo up to ``cap`` (the first window's far side is then
    inside the image), small enough to bound the cost (one full tiled pass at halo 192 and
    tile 64 is 3.7 MP of forward per 384 px crop)."""
    side = 2 * tile + cap
    chosen = sorted(images, key=lambda im: -min(im.shape[-2:]))[:max_images]
    out = []
    for im in chosen:
        h, w = im.shape[-2:]
        r, c = max(0, (h - side) // 2), max(0, (w - side) // 2)
        out.append(np.ascontiguousarray(im[:, r : r + side, c : c + side], dtype=np.float32))
    return out


def _tiled_equals(image: np.ndarray, reference: np.ndarray, predict: PredictFn, tile: int, halo: int,
                  labels: Labels, batch_size: int) -> bool:
    """Whether every window's labels equal ``reference`` over its write region (stops at the first that differs)."""
    windows = list(split_windows(image.shape[-2:], tile, halo))
    for chunk in shape_batches(windows, batch_size):
        batch = np.stack([image[(slice(None), *w.read)] for w in chunk])
        for w, p in zip(chunk, np.asarray(predict(batch)), strict=True):
            if not np.array_equal(labels(p[(slice(None), *w.crop)]), reference[w.write]):
                return False
    return True


def measure_exact_halo(predict: PredictFn, images: Sequence[np.ndarray], tile: int, multiple: int,
                       cap: int = HALO_CAP, labels: Labels = argmax_labels, batch_size: int = 4) -> int | None:
    """The smallest halo (a multiple of ``multiple``, at most ``cap``) at which tiling the
    normalised (C, H, W) ``images`` with ``tile`` gives the labels of the whole-image prediction
    on every image; None if none does. Halos the images are too small to test (``tile + halo``
    reaching across the image) are not tried."""
    if tile % multiple:
        raise ValueError(f"measure_exact_halo: tile {tile} is not a multiple of {multiple}")
    predict = pad_to_multiple(predict, multiple)
    references = [labels(predict_whole(im, predict)) for im in images]
    testable = max(min(im.shape[-2:]) for im in images) - tile - 1
    for halo in range(0, min(cap, testable) + 1, multiple):
        if all(_tiled_equals(im, ref, predict, tile, halo, labels, batch_size)
               for im, ref in zip(images, references, strict=True)):
            return halo
    return None


def model_predictor(model: torch.nn.Module, device: torch.device) -> PredictFn:
    """(N, C, h, w) numpy -> (N, K>=2, h, w) numpy probabilities of ``model`` in eval mode."""
    from segcore.modeldir import logits_to_proba

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        logits = model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
        return logits_to_proba(logits.float()).cpu().numpy()

    return predict


def card_halo(model: torch.nn.Module, card: Any, images: Sequence[np.ndarray], device: torch.device,
              cap: int = HALO_CAP) -> dict[str, Any]:
    """``card.extra`` entries for a trained model (a :class:`segcore.modeldir.ModelCard`): the
    measured exact halo (the cap when none is found) and what it was measured on; ``{}`` when
    ``card.train.data.measure_halo`` is off or there is no validation image."""
    from segcore.models.validity import input_multiple

    cfg = card.train
    if not cfg.data.measure_halo or not images:
        log.info("halo: not measured (%s)", "data.measure_halo is off" if images else "no validation image")
        return {}
    multiple = input_multiple(cfg.model.arch, cfg.model.encoder, cfg.model.arch_kwargs)
    threshold = cfg.binary_threshold if cfg.model.classes == 1 else None
    was_training = model.training
    model.eval()
    try:
        return halo_entries(model_predictor(model, device), images, multiple, threshold, cap)
    finally:
        model.train(was_training)


def loaded_halo(loaded: Any, images: Sequence[np.ndarray], cap: int = HALO_CAP) -> dict[str, Any]:
    """:func:`card_halo` for a loaded model (a single model or an ensemble, with its temperature):
    how a search measures its champion once instead of every trial."""
    threshold = loaded.card.train.binary_threshold if loaded.binary else None
    return halo_entries(loaded.predict_proba, images, loaded.size_multiple, threshold, cap) if images else {}


def halo_entries(predict: PredictFn, images: Sequence[np.ndarray], multiple: int, threshold: float | None,
                 cap: int = HALO_CAP) -> dict[str, Any]:
    """Measure on crops of ``images`` and return the card entries (see :func:`card_halo`)."""
    tile = measuring_tile(multiple)
    crops = measuring_images(images, tile, cap)
    labels = argmax_labels if threshold is None else (lambda p: (p[1] >= threshold).astype(np.int64))
    t0 = time.perf_counter()
    halo = measure_exact_halo(predict, crops, tile, multiple, cap, labels)
    seconds = time.perf_counter() - t0
    shapes = [list(c.shape[-2:]) for c in crops]
    if halo is None:
        log.warning("halo: tiled labels still differ from the whole image at %d px on %d validation crops %s "
                    "(tile %d); storing the cap %d", cap, len(crops), shapes, tile, cap)
    else:
        log.info("halo: %d px is exact (tiled labels == whole image) on %d validation crops %s, tile %d "
                 "(measured in %.1f s)", halo, len(crops), shapes, tile, seconds)
    return {HALO_KEY: cap if halo is None else halo,
            MEASURED_ON_KEY: {"images": len(crops), "shapes": shapes, "tile": tile, "multiple": multiple,
                              "cap": cap, "exact": halo is not None, "seconds": round(seconds, 1)}}
