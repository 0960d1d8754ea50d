"""Segmentation losses, composed as data: ``{dice: 1.0, focal: 0.5}``, optionally switched by epoch.

Every term takes logits ``(N, K, H, W)`` and an int64 target ``(N, H, W)`` of class ids where
``255`` means "ignore". ``K == 1`` is a binary head (sigmoid, labels 0/1); otherwise softmax.
Ignored pixels never contribute, and a batch with no labelled pixel gives a loss of 0 (with a
graph, so ``backward()`` still works) instead of NaN.

Where we use segmentation_models_pytorch (smp) and where we differ, and why:

* ``dice``, ``tversky``: our own soft Tversky (dice is alpha = beta = 0.5) because smp's
  DiceLoss/TverskyLoss have no per-class weights and average over *all* K classes while zeroing
  the classes absent from the batch, which shrinks the loss as K grows. We average
  (class-weighted) over the classes present in the batch's target. A binary head scores the
  foreground only, like smp's binary mode.
* ``focal``: multiclass uses a *softmax* focal loss, -alpha_t (1 - p_t)^gamma log p_t, because
  the model is read with a softmax at inference; smp's multiclass FocalLoss is a sum of one-vs-rest
  sigmoid losses. With gamma = 0 it equals ``ce``. A scalar ``focal_alpha`` weights classes >= 1
  by alpha and class 0 by 1 - alpha, so a 2-class softmax head and a 1-channel head agree. The
  binary head uses smp's FocalLoss (mode "binary"). Mean over labelled pixels.
* ``ce``: torch's cross-entropy (class weights, ``ignore_index``); a 1-channel head gets the
  equivalent weighted BCE, normalised by the summed pixel weights exactly like ``F.cross_entropy``.
* ``bce``: smp's SoftBCEWithLogitsLoss, but divided by the number of *labelled* pixels (smp's
  "mean" also counts ignored ones, so sparse labels would dilute it). A K-channel head gets
  one-vs-rest BCE on one-hot targets.
* ``lovasz``: smp's LovaszLoss as is (Lovasz-softmax over present classes, or Lovasz hinge for a
  binary head), guarded against batches with no labelled pixel.

Class weights (from :func:`inverse_frequency_weights`) are used by ``ce`` and ``dice``/``tversky``
when ``LossConfig.class_weighting == "inverse_frequency"``; they have one entry per *label* class,
so a 1-channel binary head takes two (background, foreground).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import FocalLoss, LovaszLoss, SoftBCEWithLogitsLoss
from torch import nn

from segcore.config import LossConfig
from segcore.data.errors import DataError
from segcore.errors import ConfigError
from segcore.registry import Registry

log = logging.getLogger(__name__)

IGNORE_INDEX = 255

LossFactory = Callable[[LossConfig, int, "torch.Tensor | None"], nn.Module]
LOSSES: Registry[LossFactory] = Registry("loss")


def list_losses() -> list[str]:
    """Names usable as keys of ``LossConfig.terms``."""
    return LOSSES.names()


# ----------------------------------------------------------------------------- helpers


def _split_target(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid mask, target with ignored pixels set to class 0) so indexing ops stay in range."""
    valid = target != ignore_index
    return valid, target.masked_fill(~valid, 0)


def _masked_mean(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over labelled pixels; 0 (still differentiable) when there are none."""
    total = torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).sum()
    return total / valid.sum().clamp_min(1)


def _one_hot(safe: torch.Tensor, num_channels: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W) ids -> (N, K, H, W) one-hot."""
    return F.one_hot(safe, num_channels).permute(0, 3, 1, 2).to(dtype)


# ----------------------------------------------------------------------------- terms


class SoftTverskyLoss(nn.Module):
    """1 - Tversky index, class-weighted mean over classes present in the target (dice: a = b = 0.5)."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, class_weights: torch.Tensor | None = None,
                 smooth: float = 0.0, eps: float = 1e-7, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.alpha, self.beta, self.smooth, self.eps = alpha, beta, smooth, eps
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = _split_target(target, self.ignore_index)
        if logits.shape[1] == 1:  # binary head: foreground channel only
            probs = torch.sigmoid(logits)
            onehot = (safe == 1).unsqueeze(1).to(probs.dtype)
            weights = None
        else:
            probs = torch.softmax(logits, dim=1)
            onehot = _one_hot(safe, logits.shape[1], probs.dtype)
            weights = self.class_weights
        v = valid.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * v, onehot * v
        dims = (0, 2, 3)
        tp = (probs * onehot).sum(dims)
        fp = probs.sum(dims) - tp
        support = onehot.sum(dims)
        fn = support - tp
        score = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth).clamp_min(self.eps)
        w = (support > 0).to(score.dtype)
        if weights is not None:
            w = w * weights.to(score.dtype)
        return (w * (1.0 - score)).sum() / w.sum().clamp_min(self.eps)


class SoftmaxFocalLoss(nn.Module):
    """Focal loss on softmax (multiclass) or sigmoid (binary head) probabilities; mean over labelled pixels."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.gamma, self.alpha, self.ignore_index = gamma, alpha, ignore_index
        self._binary = FocalLoss("binary", alpha=alpha, gamma=gamma, ignore_index=ignore_index, reduction="sum")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = _split_target(target, self.ignore_index)
        if logits.shape[1] == 1:
            # smp filters the ignored pixels; we divide its sum by their count (0 pixels -> 0).
            total = self._binary(logits, target)
            return total / valid.sum().clamp_min(1)
        logpt = F.log_softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -((1.0 - logpt.exp()).clamp_min(0.0) ** self.gamma) * logpt
        if self.alpha is not None:
            loss = loss * torch.where(safe > 0, self.alpha, 1.0 - self.alpha)
        return _masked_mean(loss, valid)


class WeightedCrossEntropyLoss(nn.Module):
    """Cross-entropy with optional class weights; BCE with the same weighting for a binary head."""

    def __init__(self, class_weights: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = _split_target(target, self.ignore_index)
        w = self.class_weights
        if logits.shape[1] == 1:
            per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], safe.to(logits.dtype), reduction="none")
        else:
            per_pixel = F.cross_entropy(logits, safe, reduction="none")
        pixel_w = valid.to(logits.dtype)
        if w is not None:
            pixel_w = pixel_w * w.to(logits.dtype)[safe]
        return (per_pixel * pixel_w).sum() / pixel_w.sum().clamp_min(1e-12)


class MaskedBCELoss(nn.Module):
    """smp's SoftBCEWithLogitsLoss averaged over labelled pixels (one-vs-rest for K channels)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self._bce = SoftBCEWithLogitsLoss(ignore_index=ignore_index, reduction="sum")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = _split_target(target, self.ignore_index)
        k = logits.shape[1]
        y = safe.unsqueeze(1).to(logits.dtype) if k == 1 else _one_hot(safe, k, logits.dtype)
        y = y.masked_fill(~valid.unsqueeze(1), float(self.ignore_index))
        return self._bce(logits, y) / (valid.sum() * k).clamp_min(1)


class MaskedLovaszLoss(nn.Module):
    """smp's LovaszLoss (softmax or hinge), returning a scalar 0 when no pixel is labelled."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self._multi = LovaszLoss("multiclass", ignore_index=ignore_index)
        self._binary = LovaszLoss("binary", ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self._binary(logits, target) if logits.shape[1] == 1 else self._multi(logits, target)
        if not torch.is_tensor(loss):  # smp's mean() of no classes returns a Python 0
            return logits.sum() * 0.0
        return loss.sum() if loss.dim() > 0 else loss  # all-ignored multiclass gives an empty tensor


@LOSSES.register("dice")
def _dice(cfg: LossConfig, num_classes: int, weights: torch.Tensor | None) -> nn.Module:
    return SoftTverskyLoss(0.5, 0.5, weights)


@LOSSES.register("tversky")
def _tversky(cfg: LossConfig, num_classes: int, weights: torch.Tensor | None) -> nn.Module:
    return SoftTverskyLoss(cfg.tversky_alpha, cfg.tversky_beta, weights)


@LOSSES.register("focal")
def _focal(cfg: LossConfig, num_classes: int, weights: torch.Tensor | None) -> nn.Module:
    return SoftmaxFocalLoss(cfg.focal_gamma, cfg.focal_alpha)


@LOSSES.register("ce")
def _ce(cfg: LossConfig, num_classes: int, weights: torch.Tensor | None) -> nn.Module:
    return WeightedCrossEntropyLoss(weights)


@LOSSES.register("bce")
def _bce(cfg: LossConfig, num_classes: int, weights: torch.Tensor | None) -> nn.Module:
    return MaskedBCELoss()


@LOSSES.register("lovasz")
def _lovasz(cfg: LossConfig, num_classes: int, weights: torch.Tensor | None) -> nn.Module:
    return MaskedLovaszLoss()


# ----------------------------------------------------------------------------- composite


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Validate shapes, dtype and label range; return the target as int64 (N, H, W)."""
    if logits.dim() != 4:
        raise ValueError(f"loss: logits must be (N, K, H, W), got shape {tuple(logits.shape)}; "
                         "pass the model output unchanged.")
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"loss: target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
                         "the target must be (N, H, W) class ids for the same pixels.")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"loss: target dtype is {target.dtype}; pass integer class ids (int64, 255 = ignore).")
    k = logits.shape[1]
    if (k == 1 and num_classes > 2) or (k > 1 and k != num_classes):
        raise ValueError(f"loss: logits have {k} channels but the loss was built for {num_classes} classes; "
                         "build it with the model's class count (2 or 1 for a 1-channel binary head).")
    target = target.long()
    n_labels = max(k, 2)
    bad = (target != ignore_index) & ((target < 0) | (target >= n_labels))
    if bool(bad.any()):
        values = torch.unique(target[bad])[:10].tolist()
        raise ValueError(f"loss: target holds class ids {values} outside 0..{n_labels - 1}; "
                         f"fix the masks or mark unlabelled pixels with {ignore_index}.")
    return target


class CompositeLoss(nn.Module):
    """Weighted sum of registered loss terms; the mix can change at given epochs (``set_epoch``)."""

    def __init__(self, terms: dict[str, nn.Module], phases: list[tuple[int, dict[str, float]]],
                 num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.phases = sorted(phases, key=lambda p: p[0])
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.epoch = 0
        self._last: dict[str, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the phase whose ``start_epoch`` is the latest one <= ``epoch`` (0-based)."""
        if epoch < 0:
            raise ValueError(f"loss: epoch must be >= 0, got {epoch}.")
        if self.active_weights(epoch) != self.active_weights(self.epoch):
            log.info("loss terms from epoch %d: %s", epoch, self.active_weights(epoch))
        self.epoch = epoch

    def active_weights(self, epoch: int | None = None) -> dict[str, float]:
        """The ``{term: weight}`` mix used at ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        current = self.phases[0][1]
        for start, weights in self.phases:
            if start <= epoch:
                current = weights
        return dict(current)

    @property
    def last_terms(self) -> dict[str, float]:
        """Unweighted value of each active term in the last call (read lazily: one sync per read)."""
        return {name: float(v) for name, v in self._last.items()}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _check_inputs(logits, target, self.num_classes, self.ignore_index)
        logits = logits.float()  # losses in fp32 even under autocast
        total = logits.new_zeros(())
        values: dict[str, torch.Tensor] = {}
        for name, weight in self.active_weights().items():
            if weight == 0:
                continue
            value = self.terms[name](logits, target)
            values[name] = value.detach()
            total = total + weight * value
        self._last = values
        return total


def _check_weights(where: str, weights: dict[str, float]) -> None:
    """Every name registered, weights finite and >= 0, at least one > 0."""
    for name, w in weights.items():
        LOSSES.get(name)  # raises the "did you mean" error for a typo
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"{where}: weight of {name!r} is {w}; use a finite number >= 0.")
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(f"{where}: {weights or '{}'} has no term with a weight > 0; add one, e.g. {{dice: 1.0}}.")


def _phases(cfg: LossConfig) -> list[tuple[int, dict[str, float]]]:
    """``cfg.terms`` from epoch 0, then each schedule phase; a phase at epoch 0 replaces ``cfg.terms``."""
    starts = [p.start_epoch for p in cfg.schedule]
    if len(set(starts)) != len(starts):
        raise ConfigError(f"loss.schedule: start_epoch values {starts} repeat; give each phase its own epoch.")
    phases = [(p.start_epoch, dict(p.terms)) for p in cfg.schedule]
    if 0 not in starts:
        phases.insert(0, (0, dict(cfg.terms)))
    else:
        _check_weights("loss.terms", cfg.terms)  # unused, but a typo is still a typo
    for start, weights in phases:
        _check_weights("loss.terms" if start == 0 and 0 not in starts else f"loss.schedule[epoch {start}]", weights)
    return sorted(phases, key=lambda p: p[0])


def _resolve_class_weights(cfg: LossConfig, num_classes: int, class_weights: object) -> torch.Tensor | None:
    """The weights to use (or None), checked for length and sign."""
    if cfg.class_weighting == "none":
        if class_weights is not None:
            log.info("loss: class weights passed but loss.class_weighting is 'none'; ignoring them")
        return None
    if class_weights is None:
        log.warning("loss: class_weighting is %r but no class weights were passed; terms are unweighted. "
                    "Pass inverse_frequency_weights(masks, num_classes) to build_loss.", cfg.class_weighting)
        return None
    w = torch.as_tensor(np.asarray(class_weights), dtype=torch.float32)
    n = max(num_classes, 2)
    if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ConfigError(f"loss: class_weights must be {n} finite values >= 0 (one per label class), "
                         f"got {w.tolist()}; compute them with inverse_frequency_weights(masks, {num_classes}).")
    return w


def build_loss(cfg: LossConfig, num_classes: int, class_weights: torch.Tensor | None = None) -> CompositeLoss:
    """Build the composite loss of ``cfg`` for ``num_classes`` label classes; errors surface here."""
    if num_classes < 1:
        raise ValueError(f"loss: num_classes must be >= 1, got {num_classes}.")
    if cfg.focal_alpha is not None and not 0.0 <= cfg.focal_alpha <= 1.0:
        raise ConfigError(f"loss.focal_alpha is {cfg.focal_alpha}; use a value in [0, 1] or null.")
    if cfg.tversky_alpha < 0 or cfg.tversky_beta < 0:
        raise ConfigError("loss.tversky_alpha and loss.tversky_beta must be >= 0; "
                         f"got {cfg.tversky_alpha}, {cfg.tversky_beta}.")
    phases = _phases(cfg)
    weights = _resolve_class_weights(cfg, num_classes, class_weights)
    names = sorted({name for _, mix in phases for name in mix})
    terms = {name: LOSSES.get(name)(cfg, num_classes, weights) for name in names}
    return CompositeLoss(terms, phases, num_classes)


# ----------------------------------------------------------------------------- class weights


def inverse_frequency_weights(masks: Iterable[np.ndarray], num_classes: int,
                              ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Per-class weights 1/frequency over labelled pixels, normalised to sum to the class count.

    ``num_classes`` 1 (a binary head) counts two label classes. A class absent from every mask gets
    the largest weight among present classes (so a rare class is not switched off) and a warning.
    """
    n = max(int(num_classes), 2)
    counts = np.zeros(n, dtype=np.int64)
    for i, mask in enumerate(masks):
        m = np.asarray(mask)
        labels = m[m != ignore_index].astype(np.int64, copy=False)
        if labels.size and (labels.min() < 0 or labels.max() >= n):
            bad = np.unique(labels[(labels < 0) | (labels >= n)])[:10].tolist()
            raise ValueError(f"mask {i}: class ids {bad} outside 0..{n - 1}; fix the mask or use {ignore_index} "
                             "for unlabelled pixels.")
        counts += np.bincount(labels.ravel(), minlength=n)
    total = counts.sum()
    if total == 0:
        raise DataError("inverse_frequency_weights: the masks hold no labelled pixel; "
                         "check the dataset or set loss.class_weighting to 'none'.")
    present = counts > 0
    weights = np.zeros(n, dtype=np.float64)
    weights[present] = total / counts[present]
    if not present.all():
        log.warning("classes %s have no labelled pixel; giving them the largest weight of the present classes",
                    np.flatnonzero(~present).tolist())
        weights[~present] = weights[present].max()
    return (weights * n / weights.sum()).astype(np.float32)
