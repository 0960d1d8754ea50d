"""Evaluate a trained model on a labelled dataset folder: report, metrics.json, overlay PNGs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcore.data import load_samples, load_spec
from segcore.metrics import ConfusionMatrix, format_report
from segcore.modelio.folder import LoadedModel
from segcore.modelio.ref import load_model
from segcore.readers.scaled import area_resample, model_shape
from segcore.tiling import pad_to_multiple, predict_tiled
from segcore.visualize import save_prediction_panel

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict
    report: str
    out_dir: Path


def predict_labels(loaded: LoadedModel, image: np.ndarray, tile: int, halo: int, batch_size: int = 8) -> np.ndarray:
    """Whole-image class ids for a normalised (C, H, W) image, tiled like the pipeline (inputs
    padded to the model's size multiple; a binary head thresholded at its saved threshold)."""
    predict = pad_to_multiple(loaded.predict_proba, loaded.size_multiple)
    proba = predict_tiled(image, predict, tile=tile, halo=halo, batch_size=batch_size)
    return loaded.labels_from_proba(proba)


def at_model_scale(image: np.ndarray, scale: float) -> np.ndarray:
    """A normalised (C, H, W) image as a model trained at ``data.scale`` sees it: area means of
    ``scale`` x ``scale`` px (the same resampling as training and ``gigaseg segment``)."""
    if scale == 1:
        return image
    h, w = model_shape(image.shape[1:], scale)
    rows, cols = min(int(np.ceil(h * scale)), image.shape[1]), min(int(np.ceil(w * scale)), image.shape[2])
    out = area_resample(image[:, :rows, :cols].transpose(1, 2, 0), scale, (0.0, 0.0), (0, 0), (h, w))
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def to_input_grid(labels: np.ndarray, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Model-grid labels on the input's (H, W) grid: each input px takes the model px it lies in
    (px beyond the last whole model px take the nearest), as ``gigaseg segment`` writes them."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.minimum((np.arange(shape[0]) / scale).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) / scale).astype(np.int64), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def evaluate(model_ref: str | Path, data_dir: str | Path, out_dir: str | Path, n_overlays: int = 4,
             device: str = "auto") -> EvalResult:
    """Predict every image of ``data_dir`` with the model's own normalisation and score it."""
    loaded = load_model(model_ref, device=device)
    cfg = loaded.card.train
    spec = load_spec(data_dir).model_copy(update={"normalize": cfg.normalize})
    samples = load_samples(data_dir, spec)
    cm = ConfusionMatrix(loaded.num_classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        pred = predict_labels(loaded, at_model_scale(sample.image, cfg.data.scale), cfg.data.val_tile,
                              cfg.data.val_halo, cfg.data.batch_size)
        pred = to_input_grid(pred, sample.mask.shape, cfg.data.scale)
        cm.update(pred, sample.mask)
        if i < n_overlays:
            save_prediction_panel(out_dir / f"overlay_{sample.name}.png", sample.image, sample.mask, pred,
                                  loaded.card.class_names, loaded.card.class_colors)
    metrics = cm.compute()
    report = format_report(metrics, loaded.card.class_names)
    payload = {"model": str(model_ref), "data": str(data_dir), "n_images": len(samples),
               "metrics": _jsonable(metrics), "confusion_matrix": cm.matrix.tolist(),
               "class_names": loaded.card.class_names}
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    return EvalResult(metrics=metrics, report=report, out_dir=out_dir)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
