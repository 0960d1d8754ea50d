"""Layer 4 of :mod:`segcore.modelio`: an ensemble folder, built on single model folders (layer 3), and
greedy ensemble selection (Caruana et al. 2004).

An ensemble directory holds ``config.json`` (``format: gigaseg-ensemble/1``, the members'
sub-directories and weights, plus its own ``metrics`` and ``extra``: temperature, TTA) and one
ordinary gigaseg model directory per member under ``members/``. :func:`segcore.modelio.ref.load_model_dir`
(hence ``load_model``, ``gigaseg evaluate``, the MLflow pyfunc and ``segment``) loads it as an
:class:`EnsembleModel`, a :class:`~segcore.modelio.folder.LoadedModel` whose ``predict_tensor`` is the
weighted mean of its members' probabilities. Members are single models that must agree on classes,
input channels and normalisation; the ensemble's size multiple is the lcm of theirs.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcore.errors import ModelError
from segcore.modelio.card import CONFIG_FILE, INPUT_RANGE_KEY, ModelCard, read_single_card
from segcore.modelio.folder import LoadedModel, load_single_dir

log = logging.getLogger(__name__)

ENSEMBLE_FORMAT = "gigaseg-ensemble/1"
MEMBERS_DIR = "members"
HALO_KEY = "halo"  # == segcore.halo.HALO_KEY
DEFAULT_HALO_STRIDES = 4  # == pipelines.options.HALO_STRIDES: a member without a measured halo


def is_ensemble_dir(path: str | Path) -> bool:
    """True if ``path/config.json`` declares the ensemble format."""
    cfg = Path(path) / CONFIG_FILE
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("format") == ENSEMBLE_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def save_ensemble_dir(path: str | Path, members: Sequence[str | Path], weights: Sequence[float],
                      metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Copy each member model directory under ``path/members/<i>`` and write the ensemble's
    ``config.json``; weights are normalised to sum to 1 (the members' cards are checked first)."""
    if not members or len(members) != len(weights) or min(weights) < 0 or sum(weights) <= 0:
        raise ModelError(f"ensemble: need one non-negative weight per member (got {len(members)} members, "
                         f"weights {list(weights)})")
    cards = [read_single_card(m) for m in members]
    check_compatible(cards, [str(m) for m in members])
    path = Path(path)
    (path / MEMBERS_DIR).mkdir(parents=True, exist_ok=True)
    total = float(sum(weights))
    entries = []
    for i, (member, w) in enumerate(zip(members, weights, strict=True)):
        rel = f"{MEMBERS_DIR}/{i}"
        shutil.copytree(member, path / rel, dirs_exist_ok=True)
        entries.append({"path": rel, "weight": float(w) / total})
    config = {"format": ENSEMBLE_FORMAT, "members": entries, "metrics": metrics or {}, "extra": extra or {}}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path


def read_ensemble_config(path: str | Path) -> dict[str, Any]:
    """The ensemble's config.json, checked: members exist, weights are non-negative and sum to 1."""
    cfg = Path(path) / CONFIG_FILE
    try:
        data = json.loads(cfg.read_text())
        members = [(Path(path) / m["path"], float(m["weight"])) for m in data["members"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{cfg}: not a valid ensemble config ({err}). Restore the folder from its source") from None
    if not members or any(w < 0 for _, w in members) or not math.isclose(sum(w for _, w in members), 1, abs_tol=1e-4):
        raise ModelError(f"{cfg}: ensemble weights must be non-negative and sum to 1, got "
                         f"{[w for _, w in members]}. Restore the folder from its source")
    data["members"] = members
    return data


def check_compatible(cards: Sequence[ModelCard], sources: Sequence[str]) -> None:
    """Members must agree on class names, output classes, input channels and normalisation."""
    first = cards[0]
    for card, src in zip(cards[1:], sources[1:], strict=True):
        for what, a, b in (("class_names", first.class_names, card.class_names),
                           ("model.classes", first.train.model.classes, card.train.model.classes),
                           ("model.in_channels", first.train.model.in_channels, card.train.model.in_channels),
                           ("normalize", first.train.normalize, card.train.normalize),
                           ("data.scale", first.train.data.scale, card.train.data.scale)):
            if a != b:
                raise ModelError(f"{src}: {what} {b!r} differs from the first member's ({sources[0]}: {a!r}); "
                                 "an ensemble's members must agree on it")


def member_halo(card: ModelCard) -> int:
    """The card's measured halo, else segment's default (4 x the total stride)."""
    value = card.extra.get(HALO_KEY)
    if isinstance(value, int | float) and value >= 0:
        return int(value)
    return DEFAULT_HALO_STRIDES * 2 ** int(card.train.model.arch_kwargs.get("encoder_depth", 5))


def ensemble_card(cards: Sequence[ModelCard], weights: Sequence[float], metrics: dict[str, Any],
                  extra: dict[str, Any]) -> ModelCard:
    """One card for the whole ensemble: the first member's training config (binary threshold =
    weighted mean of the members'), the largest member halo, and the ensemble's own metrics/extra."""
    first = cards[0]
    threshold = float(sum(w * c.train.binary_threshold for c, w in zip(cards, weights, strict=True)))
    train = first.train.model_copy(update={"binary_threshold": threshold})
    merged = {HALO_KEY: max(member_halo(c) for c in cards)}
    if INPUT_RANGE_KEY in first.extra:
        merged[INPUT_RANGE_KEY] = first.extra[INPUT_RANGE_KEY]
    merged.update(extra)
    return ModelCard(train=train, class_names=list(first.class_names), class_colors=first.class_colors,
                     metrics=dict(metrics), extra=merged)


def read_ensemble_card(path: str | Path) -> ModelCard:
    """The ensemble's merged card (see :func:`ensemble_card`), members checked for agreement."""
    data = read_ensemble_config(path)
    cards = [read_single_card(p) for p, _ in data["members"]]
    check_compatible(cards, [str(p) for p, _ in data["members"]])
    return ensemble_card(cards, [w for _, w in data["members"]], data.get("metrics", {}), data.get("extra", {}))


class _MemberStack(torch.nn.Module):
    """The members' networks as one module (``.to``, parameters, memory probes); its forward is the
    mean of the members' logits, used only to probe activations: predictions go through
    :meth:`EnsembleModel.predict_tensor`."""

    def __init__(self, models: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


@dataclass
class EnsembleModel(LoadedModel):
    """A :class:`LoadedModel` averaging its members' probabilities with ``weights``."""

    members: list[LoadedModel] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @property
    def size_multiple(self) -> int:
        return math.lcm(*(m.size_multiple for m in self.members))

    @torch.inference_mode()
    def predict_tensor(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Weighted mean of the members' probabilities; then the ensemble's temperature, applied to
        the log-probabilities (``softmax(log p / T)``; the same as dividing one model's logits)."""
        return apply_temperature(self._mean_proba(batch), self.temperature, self.binary)

    @torch.inference_mode()
    def predict_log_tensor(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The log of :meth:`predict_tensor`."""
        logp = self._mean_proba(batch).clamp_min(1e-30).log()
        if self.temperature == 1.0 or self.binary:
            return logp
        return torch.log_softmax(logp / self.temperature, dim=1)

    def _mean_proba(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        total = None
        for member, w in zip(self.members, self.weights, strict=True):
            p = member.predict_tensor(batch) * w
            total = p if total is None else total + p
        return total


def apply_temperature(proba: torch.Tensor, temperature: float, binary: bool = False) -> torch.Tensor:
    """``softmax(log p / T)`` over dim 1 (identity at T = 1 and for binary heads, never calibrated)."""
    if temperature == 1.0 or binary:
        return proba
    return torch.softmax(proba.clamp_min(1e-12).log() / temperature, dim=1)


def load_ensemble_dir(path: str | Path, device: str = "auto", fold_bn: bool = True) -> EnsembleModel:
    """Load every member (checked card against weights) and wrap them as one model (``fold_bn``:
    see :func:`segcore.modelio.folder.load_single_dir`)."""
    data = read_ensemble_config(path)
    members = [load_single_dir(p, device, fold_bn) for p, _ in data["members"]]
    weights = [w for _, w in data["members"]]
    check_compatible([m.card for m in members], [str(p) for p, _ in data["members"]])
    card = ensemble_card([m.card for m in members], weights, data.get("metrics", {}), data.get("extra", {}))
    return EnsembleModel(model=_MemberStack([m.model for m in members]).eval(), card=card, device=members[0].device,
                         source=str(path), members=members, weights=weights)


# ----------------------------------------------------------------------------- greedy selection


@dataclass
class Selection:
    """Greedy selection's result: member indices with their weights, and the score path."""

    members: list[int]  # distinct candidate indices, in order of first pick
    weights: list[float]  # pick counts / picks
    score: float
    single_scores: list[float]
    path: list[float]  # score after each pick

    @property
    def best_single(self) -> float:
        return max(self.single_scores)

    @property
    def gain(self) -> float:
        return self.score - self.best_single


def miou_of(proba: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> float:
    """Mean IoU of (K, P) probabilities against (P,) labels (255 ignored); a binary head's labels
    are ``p1 >= threshold``."""
    from segcore.metrics import ConfusionMatrix

    pred = (proba[1] >= threshold) if threshold is not None else proba.argmax(axis=0)
    cm = ConfusionMatrix(proba.shape[0])
    cm.update(pred.astype(np.int64), labels)
    return float(cm.compute()["miou"])


def greedy_select(probas: Sequence[np.ndarray], labels: np.ndarray, k: int = 5,
                  threshold: float | None = None) -> Selection:
    """Caruana et al. (2004) forward selection with replacement: each step adds the candidate whose
    inclusion scores best (ties: the lower index); returns the best prefix (ties: the shortest), so
    the result never scores below the best single candidate."""
    if not probas:
        raise ValueError("greedy_select: no candidates")
    singles = [miou_of(p, labels, threshold) for p in probas]
    total = np.zeros(probas[0].shape, dtype=np.float32)
    picks: list[int] = []
    path: list[float] = []
    best_len, best_score = 0, -math.inf
    for step in range(1, k + 1):
        scores = [miou_of((total + p) / step, labels, threshold) for p in probas]
        pick = int(np.argmax(scores))  # first maximum
        picks.append(pick)
        total += probas[pick]
        path.append(scores[pick])
        if scores[pick] > best_score + 1e-9:
            best_len, best_score = step, scores[pick]
    counts = Counter(picks[:best_len])
    members = list(dict.fromkeys(picks[:best_len]))
    return Selection(members=members, weights=[counts[m] / best_len for m in members], score=best_score,
                     single_scores=singles, path=path)
