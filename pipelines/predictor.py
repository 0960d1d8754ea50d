"""The window predictor a worker runs: model probabilities, padded to the model's stride,
optionally averaged over flips and/or blended over Gaussian-weighted sub-tiles; plus the
per-pixel products (labels or a one-class mask, float16 probabilities, normalised entropy)."""

from __future__ import annotations

import numpy as np

from pipelines.options import SegmentOptions
from segcore.modeldir import LoadedModel
from segcore.tiling import PredictFn, blended_predictor, flip_tta, pad_to_multiple


def model_predictor(loaded: LoadedModel) -> PredictFn:
    """The bare model call: ``loaded.predict_proba`` on CPU; on a GPU always under bf16 autocast,
    with channels-last inputs copied from pinned memory."""
    if loaded.device.type != "cuda":
        return loaded.predict_proba
    import torch

    from segcore.modeldir import logits_to_proba

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).pin_memory()
        x = x.to(loaded.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = loaded.model(x)
        return logits_to_proba(logits.float()).cpu().numpy()

    return predict


def build_predictor(loaded: LoadedModel, opts: SegmentOptions, stride: int) -> PredictFn:
    """(N, C, h, w) normalised float32 -> (N, K, h, w) probabilities, with the run's TTA/blending.

    Padding to the stride comes *outside* the flips: a flipped input then keeps its pixels on
    the same stride phase in every window as in the whole image, so tiled TTA == whole-image TTA.
    """
    predict = model_predictor(loaded)
    if opts.tta:
        predict = flip_tta(predict)
    predict = pad_to_multiple(predict, stride)
    if opts.blend_tile:
        predict = pad_to_multiple(blended_predictor(predict, opts.blend_tile, opts.blend_overlap), stride)
    return predict


def forward_factor(opts: SegmentOptions) -> float:
    """Model pixels evaluated per window pixel from TTA and blending (halo overhead excluded)."""
    factor = 4.0 if opts.tta else 1.0
    if opts.blend_tile:
        side = opts.tile + 2 * opts.halo
        step = max(1, int(round(opts.blend_tile * (1 - opts.blend_overlap))))
        n = 1 if side <= opts.blend_tile else 1 + -(-(side - opts.blend_tile) // step)
        factor *= (n * min(opts.blend_tile, side)) ** 2 / side**2
    return factor


def labels_from(proba: np.ndarray, only_class: int | None) -> np.ndarray:
    """(K, h, w) probabilities -> uint8 class ids, or a 0/1 mask of ``only_class``."""
    labels = np.argmax(proba, axis=0)
    if only_class is not None:
        return (labels == only_class).astype(np.uint8)
    return labels.astype(np.uint8)


def entropy_from(proba: np.ndarray) -> np.ndarray:
    """Softmax entropy divided by log(K): 0 = certain, 1 = uniform; float16 (h, w)."""
    k = proba.shape[0]
    p = np.clip(proba, 1e-12, 1.0)
    ent = -(p * np.log(p)).sum(axis=0) / np.log(max(k, 2))
    return np.clip(ent, 0, 1).astype(np.float16)
