"""What a segmentation run does (``SegmentOptions``) and what it needs to know about the model
(``ModelInfo``); both are small JSON-able objects shipped to every Ray task and actor.

The *signature* hashes everything that changes the output bytes (model identity, tiling,
TTA, blending, output arrays), so a rerun resumes only work done under the same signature.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from segcore import modelref
from segcore.config import NormalizeConfig
from segcore.errors import ConfigError
from segcore.modeldir import LoadedModel

DEFAULT_COLORS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                  (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
DEFAULT_TILE = 512
DEFAULT_HALO = 128  # SegmentOptions default; segment_archive uses default_halo(model) instead
HALO_STRIDES = 4  # default halo = 4 x the model's total stride (128 px for a depth-5 U-Net), see default_halo
HALO_CARD_KEY = "halo"  # ModelCard.extra[HALO_CARD_KEY]: the halo measured for this model


class SegmentOptions(BaseModel):
    """Per-run settings that shape the output (all part of the resume signature)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str  # resolved model reference (directory or pinned MLflow URI)
    tile: int = Field(DEFAULT_TILE, ge=16)  # write region edge == output chunk edge
    halo: int = Field(DEFAULT_HALO, ge=0)
    batch_size: int = Field(8, ge=1)  # windows per model call (and per work unit on tiled files)
    tta: bool = False  # average over flips
    blend_tile: int | None = Field(None, ge=16)  # Gaussian-blended sub-tiles inside each window
    blend_overlap: float = Field(0.5, ge=0.0, lt=1.0)
    only_class: str | None = None  # write a 0/1 mask of this class instead of all labels
    probabilities: bool = False  # also store float16 class probabilities
    uncertainty: bool = False  # also store float16 normalised softmax entropy
    device: str = "auto"
    # MLflow server the actors download an MLflow model URI from: resolved once on the driver and
    # passed to every actor, so a worker node never falls back to its own environment.
    tracking_uri: str | None = None

    def signature(self, model_digest: str) -> str:
        data = self.model_dump(mode="json", exclude={"device", "tracking_uri"})
        data["model_digest"] = model_digest
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ModelInfo(BaseModel):
    """What the planning and finishing stages need from the model card (no weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str
    digest: str
    class_names: list[str]
    class_colors: list[tuple[int, int, int]]
    normalize: NormalizeConfig
    in_channels: int
    stride: int  # inputs are padded to a multiple of this (LoadedModel.size_multiple)
    input_range: tuple[float, float] | None = None  # normalised range seen in training (card)
    scale: float = 1.0  # image px per model px (card: train.data.scale); windows are read at it

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, ref: str) -> ModelInfo:
        """The card facts the planning and finishing stages need, from a loaded pinned ``ref``."""
        card = loaded.card
        k = len(card.class_names)
        colors = [tuple(int(v) for v in c) for c in (card.class_colors or [])]
        colors += [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(colors), k)]
        return cls(ref=ref, digest=modelref.digest(ref), class_names=list(card.class_names),
                   class_colors=colors[:k], normalize=card.train.normalize,
                   in_channels=card.train.model.in_channels, stride=loaded.size_multiple,
                   input_range=loaded.input_range, scale=float(card.train.data.scale))

    def class_index(self, name: str) -> int:
        if name not in self.class_names:
            raise ConfigError(f"--only-class {name!r}: the model's classes are {self.class_names}; pick one of them")
        return self.class_names.index(name)


def default_halo(loaded: LoadedModel) -> int:
    """The halo recorded on the model card (``extra["halo"]``, measured with bench/halo_seams.py),
    else 4 x the model's total stride: 128 px for a depth-5 U-Net, where a trained resnet18 U-Net
    left 0.14 % of labels different from whole-image prediction (0.9 % at 64 px, < 0.01 % at 160 px)."""
    value: Any = loaded.card.extra.get(HALO_CARD_KEY)
    if isinstance(value, int | float) and value >= 0:
        return int(value)
    return HALO_STRIDES * 2 ** int(loaded.card.train.model.arch_kwargs.get("encoder_depth", 5))


def load_for_run(ref: str, tracking_uri: str | None) -> tuple[LoadedModel, ModelInfo]:
    """Pin, load on the CPU (validates the reference before any work starts) and summarise."""
    pinned = modelref.pin(ref, tracking_uri)
    loaded = modelref.load_model(pinned, device="cpu", tracking_uri=tracking_uri)
    return loaded, ModelInfo.from_loaded(loaded, pinned)
