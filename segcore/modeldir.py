"""A model directory: ``config.json`` (everything to rebuild) + ``model.safetensors`` (weights).

Loading never unpickles: weights are safetensors, config is JSON. A model reference is
either such a directory or an MLflow URI (``models:/<name>@champion``, ``runs:/...``),
resolved to a local directory by :mod:`segcore.mlflow_model`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from segcore.config import TrainConfig, parse_config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "gigaseg-model/1"


@dataclass
class ModelCard:
    """What travels with the weights: the training config and what the classes mean."""

    train: TrainConfig
    class_names: list[str]
    class_colors: list[tuple[int, int, int]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "train": self.train.model_dump(mode="json"),
            "class_names": self.class_names,
            "class_colors": [list(c) for c in self.class_colors] if self.class_colors else None,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> ModelCard:
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a gigaseg model config (format {data.get('format')!r}, want {FORMAT!r}).")
        colors = data.get("class_colors")
        return cls(
            train=parse_config(data["train"], TrainConfig, source=source),
            class_names=list(data["class_names"]),
            class_colors=[tuple(c) for c in colors] if colors else None,
            metrics=data.get("metrics", {}),
            extra=data.get("extra", {}),
        )


@dataclass
class LoadedModel:
    """A rebuilt model in eval mode plus its card; ``predict_proba`` is the tiling predictor."""

    model: torch.nn.Module
    card: ModelCard
    device: torch.device
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.card.class_names)

    @torch.inference_mode()
    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, h, w) normalised float32 -> (N, K, h, w) class probabilities (K >= 2)."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        use_amp = self.device.type == "cuda" and self.card.train.amp
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = self.model(x)
        return logits_to_proba(logits.float()).cpu().numpy()


def logits_to_proba(logits: torch.Tensor) -> torch.Tensor:
    """Softmax for multiclass; for a single-channel binary head, stack (1 - p, p)."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def save_model_dir(path: str | Path, model: torch.nn.Module, card: ModelCard) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``path`` (created if missing)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    st_save_model(model, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(card.to_json(), indent=2))
    return path


def read_card(path: str | Path) -> ModelCard:
    path = Path(path)
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise FileNotFoundError(
            f"{path}: no {CONFIG_FILE}; a model reference must be a gigaseg model directory "
            "(written by `gigaseg train` or a search) or an MLflow URI such as models:/<name>@champion."
        )
    return ModelCard.from_json(json.loads(cfg.read_text()), source=str(cfg))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_dir(path: str | Path, device: str = "auto") -> LoadedModel:
    """Rebuild the model from ``config.json`` and load its safetensors weights (no pickle)."""
    from segcore.models import build_model

    path = Path(path)
    card = read_card(path)
    model_cfg = card.train.model.model_copy(update={"encoder_weights": None})  # weights come from the file
    model = build_model(model_cfg)
    missing, unexpected = st_load_model(model, str(path / WEIGHTS_FILE), strict=True)
    dev = pick_device(device)
    model.to(dev).eval()
    return LoadedModel(model=model, card=card, device=dev, source=str(path))


def load_model(ref: str | Path, device: str = "auto", tracking_uri: str | None = None) -> LoadedModel:
    """Load a model directory or an MLflow model URI (``models:/name@alias``, ``runs:/id/path``).

    ``tracking_uri`` names the MLflow server of a URI; default: gigaseg's (``MLFLOW_TRACKING_URI``,
    else the SQLite store under ``GIGASEG_HOME``).
    """
    ref_str = str(ref)
    if ":/" in ref_str and not Path(ref_str).exists():
        from segcore.mlflow_model import download_model_dir

        loaded = load_model_dir(download_model_dir(ref_str, tracking_uri=tracking_uri), device)
        loaded.source = ref_str
        return loaded
    return load_model_dir(ref_str, device)
