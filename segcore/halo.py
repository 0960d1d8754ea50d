"""The exact halo, measured: the smallest halo at which a window's predicted probabilities equal
the whole image's (to float tolerance), found at the end of training and stored on the model card.

Why measured: a U-Net's receptive field reaches hundreds of pixels, but how far context really
changes the output depends on the trained weights. Too small a halo leaves seams; too large a one
costs forward pixels on every window. ``gigaseg segment`` reads ``card.extra["halo"]``
(:data:`HALO_KEY`) and picks its tile from it.

How: on up to :data:`MAX_IMAGES` validation crops, the whole crop is predicted once (the
reference, :func:`segcore.tiling.predict_whole`) and then its central ``tile`` square alone, with
halo 0, m, 2m, ... (m: the model's size multiple, so the window meets the encoder at the whole
image's stride phase). The first halo at which every crop's window differs from the reference by
at most :data:`HALO_TOL` in every probability is exact: a label can then only change where two
classes are within ``2 * HALO_TOL`` of each other. Probabilities, not labels, because a label test
on a few crops passes by luck: labels of small crops agreed at 256 px for a resnet34 U-Net
whose windows still moved probabilities by 2.4e-3 there (5 labels differed on a 2560 px scan);
at 320 px the largest change was 2.4e-5 and no label moved but a float tie (margin 1.8e-7).
The reference sees at least 1.5x the largest halo tried, so a halo cannot pass merely by
spanning the crop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from segcore.tiling import PredictFn, pad_to_multiple, predict_whole, round_up

log = logging.getLogger(__name__)

HALO_KEY = "halo"  # == pipelines.options.HALO_CARD_KEY
MEASURED_ON_KEY = "halo_measured_on"
HALO_CAP = 512  # px: the largest halo tried
# Largest probability change that counts as equal. 1e-4 left one label of a 4096² scan flipped 227 px
# from its window's edge (top-two margin 1.1e-5, bench/segment_vs_monai.py); at 2e-5 that model's halo
# grew from 192 to 224 px (largest change 5.6e-6), x1.23 instead of x1.20 forward px on that scan.
HALO_TOL = 2e-5
MIN_TILE = 128  # the measured window's write square: the smallest multiple of the size multiple >= this
MAX_IMAGES = 2  # validation images measured on (each cropped, see measuring_images)
CONTEXT = 1.5  # the reference's context over the crop's central square, in units of the largest halo tried


def measuring_tile(multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= :data:`MIN_TILE`."""
    return round_up(MIN_TILE, multiple)


def stage_caps(cap: int, multiple: int) -> list[int]:
    """Largest halos tried per stage: 128, 256, ... up to ``cap`` (multiples of ``multiple``), so
    a model with a short reach is measured against a small reference (the reference costs most)."""
    stages, c = [], round_up(128, multiple)
    while c < cap:
        stages.append(c)
        c *= 2
    return [*stages, round_up(cap, multiple)]


def largest_images(images: Sequence[np.ndarray], n: int = MAX_IMAGES) -> list[np.ndarray]:
    """The ``n`` (C, H, W) images with the largest short side: the ones measured on."""
    return sorted(images, key=lambda im: -min(im.shape[-2:]))[:n]


def measuring_images(images: Sequence[np.ndarray], tile: int, cap: int, multiple: int = 1,
                     max_images: int = MAX_IMAGES) -> list[np.ndarray]:
    """Up to ``max_images`` of the largest (C, H, W) images as squares of ``tile + 2 * context``
    (context: :data:`CONTEXT` x ``cap`` and more than ``cap``, a multiple of ``multiple``): centre crops, mirrored out
    (symmetric padding) where an image is smaller, so any validation set can test halos up to ``cap``."""
    context = round_up(max(math.ceil(CONTEXT * cap), cap + multiple), multiple)  # always beyond the cap
    side = tile + 2 * context
    out = []
    for im in largest_images(images, max_images):
        h, w = im.shape[-2:]
        r, c = max(0, (h - side) // 2), max(0, (w - side) // 2)
        crop = np.asarray(im[:, r : r + side, c : c + side], dtype=np.float32)
        ph, pw = side - crop.shape[-2], side - crop.shape[-1]
        if ph or pw:
            crop = np.pad(crop, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="symmetric")
        out.append(np.ascontiguousarray(crop))
    return out


def window_change(crop: np.ndarray, reference: np.ndarray, predict: PredictFn, tile: int, halo: int) -> float:
    """Largest probability change over the crop's central ``tile`` square when it is predicted
    from a window with ``halo`` px of context instead of the whole crop."""
    c = (crop.shape[-1] - tile) // 2
    window = crop[None, :, c - halo : c + tile + halo, c - halo : c + tile + halo]
    proba = np.asarray(predict(np.ascontiguousarray(window)))[0, :, halo : halo + tile, halo : halo + tile]
    return float(np.abs(proba - reference[:, c : c + tile, c : c + tile]).max())


def measure_exact_halo(predict: PredictFn, images: Sequence[np.ndarray], tile: int, multiple: int,
                       cap: int = HALO_CAP, tol: float = HALO_TOL) -> tuple[int | None, float]:
    """The smallest halo (a multiple of ``multiple``, at most ``cap``) at which the central
    ``tile`` square of each validation image (a (C, H, W) array, see :func:`measuring_images`)
    predicted from a window equals the whole crop's prediction within ``tol``, and the largest
    change there; (None, the change at ``cap``) if none does. Stages of :func:`stage_caps`."""
    if tile % multiple:
        raise ValueError(f"measure_exact_halo: tile {tile} is not a multiple of {multiple}")
    predict = pad_to_multiple(predict, multiple)
    start, change = 0, float("inf")
    for stage in stage_caps(cap, multiple):
        crops = measuring_images(images, tile, stage, multiple)
        references = [predict_whole(crop, predict) for crop in crops]
        for halo in range(start, stage + 1, multiple):
            change = max(window_change(c, ref, predict, tile, halo) for c, ref in zip(crops, references, strict=True))
            if change <= tol:
                return halo, change
        start = stage + multiple
    return None, change


def model_predictor(model: torch.nn.Module, device: torch.device) -> PredictFn:
    """(N, C, h, w) numpy -> (N, K>=2, h, w) numpy probabilities of ``model`` in eval mode."""
    from segcore.modelio.folder import logits_to_proba

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        logits = model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
        return logits_to_proba(logits.float()).cpu().numpy()

    return predict


def window_norms(model: Any) -> list[str]:
    """Layers whose statistics span each whole input (GroupNorm, InstanceNorm without running
    stats): with them no halo makes a window's output equal the whole image's (smp's FPN has
    GroupNorm in its segmentation blocks). LayerNorm normalises each pixel's channels: local."""
    if not isinstance(model, torch.nn.Module):
        return []
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.GroupNorm)
                   or (isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats)})


def not_tileable(norms: list[str], multiple: int) -> dict[str, Any]:
    """Card entries for a model with :func:`window_norms`: the default halo, 4 x the size multiple."""
    halo = 4 * multiple
    log.warning("halo: not measured: %s layers normalise over each whole window, so tiled output never equals the "
                "whole image's; storing %d px (4 x the size multiple). Large tiles keep the difference small",
                ", ".join(norms), halo)
    return {HALO_KEY: halo, MEASURED_ON_KEY: {"exact": False, "window_norms": norms, "multiple": multiple}}


def card_halo(model: torch.nn.Module, card: Any, images: Sequence[np.ndarray], device: torch.device,
              cap: int = HALO_CAP) -> dict[str, Any]:
    """``card.extra`` entries for a trained model (a :class:`segcore.modelio.card.ModelCard`): the
    measured exact halo (the cap when none is found) and what it was measured on; ``{}`` when
    ``card.train.data.measure_halo`` is off or there is no validation image."""
    from segcore.models.validity import input_multiple

    cfg = card.train
    if not cfg.data.measure_halo or not images:
        log.info("halo: not measured (%s)", "data.measure_halo is off" if images else "no validation image")
        return {}
    multiple = input_multiple(cfg.model.arch, cfg.model.encoder, cfg.model.arch_kwargs)
    if norms := window_norms(model):
        return not_tileable(norms, multiple)
    was_training = model.training
    model.eval()
    try:
        return halo_entries(model_predictor(model, device), images, multiple, cap)
    finally:
        model.train(was_training)


def loaded_halo(loaded: Any, images: Sequence[np.ndarray], cap: int = HALO_CAP) -> dict[str, Any]:
    """:func:`card_halo` for a loaded model (a single model or an ensemble, with its temperature):
    how a search measures its champion once instead of every trial."""
    if not images:
        return {}
    members = getattr(loaded, "members", None) or [loaded]  # an ensemble: any member's norms count
    norms = sorted({n for m in members for n in window_norms(getattr(m, "model", None))})
    if norms:
        return not_tileable(norms, loaded.size_multiple)
    return halo_entries(loaded.predict_proba, images, loaded.size_multiple, cap)


def halo_entries(predict: PredictFn, images: Sequence[np.ndarray], multiple: int, cap: int = HALO_CAP,
                 tol: float = HALO_TOL) -> dict[str, Any]:
    """Measure on crops of ``images`` and return the card entries (see :func:`card_halo`)."""
    tile = measuring_tile(multiple)
    t0 = time.perf_counter()
    halo, change = measure_exact_halo(predict, images, tile, multiple, cap, tol)
    seconds = time.perf_counter() - t0
    shapes = [list(im.shape[-2:]) for im in largest_images(images)]
    if halo is None:
        log.warning("halo: a window's probabilities still change by %.1e at the cap, %d px, on %d validation "
                    "images; storing the cap", change, cap, len(shapes))
    else:
        log.info("halo: %d px is exact (window probabilities within %.0e of the whole image's, largest change "
                 "%.1e) on %d validation images %s, window %d (measured in %.1f s)", halo, tol, change,
                 len(shapes), shapes, tile, seconds)
    return {HALO_KEY: cap if halo is None else halo,
            MEASURED_ON_KEY: {"images": len(shapes), "shapes": shapes, "tile": tile, "multiple": multiple,
                              "cap": cap, "tol": tol, "change": change,
                              "exact": halo is not None, "seconds": round(seconds, 1)}}
