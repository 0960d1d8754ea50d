"""Model references for a run: pin ``models:/name@alias`` to a version (so every worker loads
the same weights even if the alias moves mid-run), fingerprint it, and summarise its card."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from pipelines.options import ModelInfo
from segcore.modeldir import CONFIG_FILE, WEIGHTS_FILE, LoadedModel, load_model

log = logging.getLogger(__name__)

DEFAULT_COLORS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                  (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
_ALIAS = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)")


def pin_model_ref(ref: str, tracking_uri: str | None) -> str:
    """A directory becomes absolute; ``models:/name@alias`` becomes ``models:/name/<version>``."""
    if Path(ref).exists():
        return str(Path(ref).resolve())
    match = _ALIAS.fullmatch(ref)
    if not match:
        return ref
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    version = client.get_model_version_by_alias(match["name"], match["alias"]).version
    pinned = f"models:/{match['name']}/{version}"
    log.info("model %s is %s", ref, pinned)
    return pinned


def model_digest(ref: str) -> str:
    """Identity of a model: for a directory its config text + weights size and first/last MiB;
    for a pinned MLflow URI the URI itself (registered versions are immutable)."""
    path = Path(ref)
    h = hashlib.sha256()
    if not path.is_dir():
        h.update(ref.encode())
        return h.hexdigest()[:16]
    h.update((path / CONFIG_FILE).read_bytes())
    weights = path / WEIGHTS_FILE
    size = weights.stat().st_size
    h.update(str(size).encode())
    with weights.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def model_info(loaded: LoadedModel, ref: str) -> ModelInfo:
    """The card facts the planning and finishing stages need (no weights)."""
    card = loaded.card
    k = len(card.class_names)
    colors = [tuple(int(v) for v in c) for c in (card.class_colors or [])]
    colors += [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(colors), k)]
    depth = int(card.train.model.arch_kwargs.get("encoder_depth", 5))
    return ModelInfo(
        ref=ref,
        digest=model_digest(ref),
        class_names=list(card.class_names),
        class_colors=colors[:k],
        normalize=card.train.normalize,
        in_channels=card.train.model.in_channels,
        stride=2**depth,
    )


def load_for_run(ref: str, tracking_uri: str | None) -> tuple[LoadedModel, ModelInfo]:
    """Pin, load on the CPU (validates the reference before any work starts) and summarise."""
    pinned = pin_model_ref(ref, tracking_uri)
    loaded = load_model(pinned, device="cpu", tracking_uri=tracking_uri)
    return loaded, model_info(loaded, pinned)
