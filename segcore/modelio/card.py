"""Layer 1 of :mod:`segcore.modelio`: the model card, pure data (no torch).

A model directory holds ``config.json`` (the :class:`ModelCard`: the full training config, what
the classes mean, metrics and measured extras) beside ``model.safetensors``. This module reads and
checks one model folder's card; an ensemble folder's merged card is :mod:`segcore.modelio.ensemble`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segcore.config import TrainConfig, parse_config
from segcore.errors import ConfigError, ModelError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "gigaseg-model/1"
INPUT_RANGE_KEY = "input_range"  # ModelCard.extra: (0.5, 99.5) percentiles of the normalised training input
TEMPERATURE_KEY = "temperature"  # ModelCard.extra: logits are divided by it (fitted on validation, segcore.calibration)
TTA_KEY = "tta"  # ModelCard.extra: True when flip TTA gained on validation; segment's default


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
            raise ModelError(f"{source}: not a gigaseg model config (format {data.get('format')!r}, want {FORMAT!r}).")
        colors = data.get("class_colors")
        return cls(
            train=parse_config(data["train"], TrainConfig, source=source),
            class_names=list(data["class_names"]),
            class_colors=[tuple(c) for c in colors] if colors else None,
            metrics=data.get("metrics", {}),
            extra=data.get("extra", {}),
        )


def read_single_card(path: str | Path) -> ModelCard:
    """The checked card of one model directory (not an ensemble: see :func:`segcore.modelio.ref.read_card`)."""
    path = Path(path)
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise ModelError(
            f"{path}: no {CONFIG_FILE}; a model reference must be a gigaseg model directory "
            "(written by `gigaseg train` or a search) or an MLflow URI such as models:/<name>@champion."
        )
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{cfg}: not valid JSON ({err}). Restore the model folder from its source") from None
    try:
        card = ModelCard.from_json(data, source=str(cfg))
    except (ConfigError, KeyError, TypeError) as err:
        raise ModelError(f"{cfg}: not a valid model card ({err}). Restore the model folder from its source") from None
    check_card(card, str(cfg))
    return card


def check_card(card: ModelCard, source: str) -> None:
    """One class name (and colour, if given) per output class: a 1-channel head has 2 classes."""
    channels = card.train.model.classes
    want = 2 if channels == 1 else channels
    fix = "Restore config.json from the training run (class_names must list one name per class)"
    if len(card.class_names) != want:
        raise ModelError(f"{source}: {len(card.class_names)} class_names {card.class_names} for a model with "
                         f"{want} classes ({channels} output channel{'s' if channels > 1 else ''}). {fix}")
    if card.class_colors is not None and len(card.class_colors) != want:
        raise ModelError(f"{source}: {len(card.class_colors)} class_colors for {want} classes. {fix}")
