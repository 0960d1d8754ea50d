"""Builders for the champion tests (ensembles, calibration, the gated alias): a labelled dataset
whose masks are what a known tiny model predicts (so that model is the "good" one and others are
worse), optionally with a share of the labels replaced at random (so a confident model is
over-confident)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from pipelines_helpers import CLASSES, structured

from segcore.calibration import tiled_proba
from segcore.data import load_samples, load_spec
from segcore.evaluate import predict_labels
from segcore.modelio.ref import load_model


def write_images(data_dir: Path, n: int = 2, shape: tuple[int, int] = (96, 128), seed: int = 5) -> Path:
    """``n`` grey uint8 PNGs and a dataset.yaml with the pipelines helpers' four classes (masks: zeros)."""
    (data_dir / "images").mkdir(parents=True)
    (data_dir / "masks").mkdir()
    for i in range(n):
        Image.fromarray(structured(shape, seed + i, 255)).save(data_dir / "images" / f"img{i}.png")
        Image.fromarray(np.zeros(shape, np.uint8)).save(data_dir / "masks" / f"img{i}.png")
    (data_dir / "dataset.yaml").write_text(yaml.safe_dump({"classes": CLASSES}))
    return data_dir


def label_with(model_dir: Path, data_dir: Path, noise: float = 0.0, seed: int = 0,
               sample_temperature: float | None = None) -> None:
    """Overwrite the masks with ``model_dir``'s tiled labels; ``noise`` of the pixels get a random
    class. With ``sample_temperature`` T, each label is drawn from softmax(log p / T) instead, so a
    model whose probabilities are p at temperature T is calibrated on these labels."""
    loaded = load_model(model_dir, device="cpu")
    cfg = loaded.card.train
    spec = load_spec(data_dir).model_copy(update={"normalize": cfg.normalize})
    rng = np.random.default_rng(seed)
    for sample in load_samples(data_dir, spec):
        labels = predict_labels(loaded, sample.image, cfg.data.val_tile, cfg.data.val_halo)
        if sample_temperature is not None:
            logp = tiled_proba(loaded, sample.image, cfg.data.val_tile, cfg.data.val_halo, log=True)
            p = np.exp(logp / sample_temperature)
            cum = np.cumsum(p / p.sum(0), axis=0)
            labels = np.minimum((rng.random(labels.shape) > cum).sum(0), len(CLASSES) - 1)
        flip = rng.random(labels.shape) < noise
        labels[flip] = rng.integers(0, len(CLASSES), int(flip.sum()))
        Image.fromarray(labels.astype(np.uint8)).save(data_dir / "masks" / f"{sample.name}.png")
