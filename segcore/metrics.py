"""Segmentation metrics, all derived from one confusion matrix accumulated over a dataset.

Pixels whose target is ``ignore_index`` (255) are skipped. ``num_classes == 1`` (a 1-channel
binary head) is counted as two label classes, background and foreground.

Undefined values are NaN, never a silent 0: IoU/Dice of a class with neither support nor
predictions, precision of a class never predicted, recall of a class with no support. The means
(``miou``, ``mean_dice``) average the classes that have support *or* predictions, so a class that
is absent from the data but predicted counts with IoU 0 (false positives are penalised), while a
class absent from both does not drag the mean to 0 or NaN.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
ArrayLike = np.ndarray | torch.Tensor


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float64, NaN where den == 0 (no warnings)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _mean_defined(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN when there are none."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


class ConfusionMatrix:
    """A K x K pixel count matrix (rows = true class, columns = predicted class) with metrics."""

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be >= 1, got {num_classes}.")
        self.num_classes = max(int(num_classes), 2)
        self.ignore_index = ignore_index
        self._matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    @property
    def matrix(self) -> np.ndarray:
        """The live int64 count array (rows = true, cols = predicted); in-place edits are kept."""
        return self._matrix

    def reset(self) -> None:
        """Zero all counts."""
        self._matrix[...] = 0

    def update(self, pred: ArrayLike, target: ArrayLike) -> ConfusionMatrix:
        """Count predicted vs true class ids (any matching shapes; numpy or torch, counted on its device)."""
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} != target shape "
                             f"{tuple(target.shape)}; pass class ids (not probabilities) for the same pixels.")
        for what, arr in (("pred", pred), ("target", target)):
            if _is_float(arr):
                raise ValueError(f"ConfusionMatrix.update: {what} is {arr.dtype}; pass integer class ids "
                                 "(argmax or thresholded probabilities).")
        if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
            self._matrix += self._count_torch(pred.to(target.device), target)
        else:
            self._matrix += self._count_numpy(_to_numpy(pred), _to_numpy(target))
        return self

    def _range_error(self, what: str, bad: list[int]) -> ValueError:
        return ValueError(f"ConfusionMatrix.update: {what} holds class ids {bad[:10]} outside "
                          f"0..{self.num_classes - 1}; check num_classes or mark unlabelled pixels "
                          f"with {self.ignore_index}.")

    def _count_numpy(self, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
        k = self.num_classes
        if self.ignore_index is not None:
            valid = target != self.ignore_index
            pred, target = pred[valid], target[valid]
        pred, target = pred.astype(np.int64, copy=False).ravel(), target.astype(np.int64, copy=False).ravel()
        if target.size == 0:
            return np.zeros((k, k), dtype=np.int64)
        for what, arr in (("target", target), ("pred", pred)):
            if arr.min() < 0 or arr.max() >= k:
                raise self._range_error(what, np.unique(arr[(arr < 0) | (arr >= k)]).tolist())
        return np.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def _count_torch(self, pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        k = self.num_classes
        if self.ignore_index is not None:
            valid = target != self.ignore_index
            pred, target = pred[valid], target[valid]
        pred, target = pred.long().reshape(-1), target.long().reshape(-1)
        if target.numel() == 0:
            return np.zeros((k, k), dtype=np.int64)
        for what, arr in (("target", target), ("pred", pred)):
            lo, hi = torch.aminmax(arr)
            if int(lo) < 0 or int(hi) >= k:
                raise self._range_error(what, torch.unique(arr[(arr < 0) | (arr >= k)]).tolist())
        counts = torch.bincount(target * k + pred, minlength=k * k)
        return counts.cpu().numpy().astype(np.int64).reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another worker) into this one."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(f"ConfusionMatrix.merge: {other.num_classes} classes/ignore {other.ignore_index} vs "
                             f"{self.num_classes}/{self.ignore_index}; merge only matrices built alike.")
        self._matrix += other.matrix
        return self

    def compute(self) -> dict[str, Any]:
        """Per-class iou/dice/precision/recall (arrays, NaN if undefined), support, and the means."""
        m = self._matrix
        tp = np.diag(m).astype(np.int64)
        support, predicted = m.sum(axis=1), m.sum(axis=0)
        fp, fn = predicted - tp, support - tp
        iou = _ratio(tp, tp + fp + fn)
        dice = _ratio(2 * tp, 2 * tp + fp + fn)
        total = int(m.sum())
        return {
            "iou": iou, "dice": dice, "precision": _ratio(tp, predicted), "recall": _ratio(tp, support),
            "support": support, "predicted": predicted,
            "miou": _mean_defined(iou), "mean_dice": _mean_defined(dice),
            "pixel_acc": float(tp.sum() / total) if total else float("nan"), "total": total,
        }


def _is_float(a: ArrayLike) -> bool:
    return a.is_floating_point() if isinstance(a, torch.Tensor) else np.issubdtype(np.asarray(a).dtype, np.floating)


def _to_numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# ----------------------------------------------------------------------------- logging and reports


def metric_key(name: str) -> str:
    """A class name as a metric-key fragment: lower case, runs of other characters -> ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")


def _class_names(class_names: Sequence[str] | None, k: int) -> list[str]:
    if class_names is None:
        return [f"class{i}" for i in range(k)]
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names {names} for {k} classes; pass one name per class "
                         "(2 for a binary head: background and foreground).")
    return names


def _key_names(names: list[str]) -> list[str]:
    """Sanitised, unique key fragments (``class<i>`` when nothing is left, ``_<i>`` on a clash)."""
    keys: list[str] = []
    for i, name in enumerate(names):
        key = metric_key(name) or f"class{i}"
        keys.append(f"{key}_{i}" if key in keys else key)
    return keys


def flat_metrics(metrics: dict[str, Any], class_names: Sequence[str] | None = None,
                 prefix: str = "val_") -> dict[str, float]:
    """Flat ``{prefix+'miou': ..., prefix+'iou_<class>': ...}`` floats for MLflow/Tune (NaN kept)."""
    k = len(metrics["iou"])
    out = {f"{prefix}miou": float(metrics["miou"]), f"{prefix}mean_dice": float(metrics["mean_dice"]),
           f"{prefix}pixel_acc": float(metrics["pixel_acc"])}
    for i, key in enumerate(_key_names(_class_names(class_names, k))):
        for metric in ("iou", "dice", "precision", "recall"):
            out[f"{prefix}{metric}_{key}"] = float(metrics[metric][i])
    return out


def _fmt(value: float, width: int = 9) -> str:
    return f"{'-':>{width}}" if np.isnan(value) else f"{value:>{width}.4f}"


def format_report(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """A text table like sklearn's classification_report, plus IoU, mean IoU and pixel accuracy."""
    k = len(metrics["iou"])
    names = _class_names(class_names, k)
    w = max(len(n) for n in [*names, "pixel accuracy"])
    lines = [f"{'':>{w}}  {'precision':>9}  {'recall':>9}  {'f1/dice':>9}  {'iou':>9}  {'support':>12}", ""]
    for i, name in enumerate(names):
        cells = "  ".join(_fmt(metrics[m][i]) for m in ("precision", "recall", "dice", "iou"))
        lines.append(f"{name:>{w}}  {cells}  {int(metrics['support'][i]):>12d}")
    macro = "  ".join(_fmt(_mean_defined(np.asarray(metrics[m], dtype=np.float64)))
                      for m in ("precision", "recall", "dice", "iou"))
    blank = " " * (3 * 11)
    lines += ["", f"{'macro avg':>{w}}  {macro}  {int(metrics['total']):>12d}",
              f"{'mean IoU':>{w}}  {blank}{_fmt(metrics['miou'])}",
              f"{'pixel accuracy':>{w}}  {blank}{_fmt(metrics['pixel_acc'])}  {int(metrics['total']):>12d}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- binary threshold


def _positive_probs(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Accept probs shaped like targets, or with a 2-channel axis 1 (background, foreground)."""
    if probs.shape == targets.shape:
        return probs
    if probs.ndim == targets.ndim + 1 and probs.shape[1] == 2 and probs.shape[:1] + probs.shape[2:] == targets.shape:
        return probs[:, 1]
    raise ValueError(f"choose_binary_threshold: probs shape {probs.shape} does not fit targets {targets.shape}; "
                     "pass foreground probabilities shaped like the targets.")


def choose_binary_threshold(probs: np.ndarray, targets: np.ndarray, candidates: Sequence[float] | None = None,
                            ignore_index: int = IGNORE_INDEX) -> tuple[float, float]:
    """The candidate threshold (predict positive where prob >= t) with the best foreground IoU.

    One pass: each pixel is binned by ``searchsorted`` into the candidate grid (default 0.01..0.99),
    and TP/FP for every threshold follow from cumulative sums of two histograms. Ties go to the
    threshold nearest 0.5. Returns ``(threshold, iou)``; ``(0.5, nan)`` when no pixel is positive.
    """
    cands = threshold_candidates(candidates)
    hist = threshold_histograms(probs, targets, cands, ignore_index)
    if hist.sum() == 0:
        raise ValueError("choose_binary_threshold: every target pixel is ignored; pass labelled validation data.")
    return threshold_from_histograms(cands, hist)


def threshold_candidates(candidates: Sequence[float] | None = None) -> np.ndarray:
    """The sorted threshold grid (default 0.01, 0.02, ..., 0.99)."""
    cands = np.round(np.arange(1, 100) / 100, 2) if candidates is None else np.asarray(candidates, dtype=np.float64)
    if cands.ndim != 1 or cands.size == 0 or not np.all((cands >= 0) & (cands <= 1)):
        raise ValueError(f"choose_binary_threshold: candidates must be a non-empty list in [0, 1], got {cands}.")
    return np.unique(cands)


def threshold_histograms(probs: np.ndarray, targets: np.ndarray, cands: np.ndarray,
                         ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(2, len(cands) + 1) counts of negative / positive pixels per candidate bin.

    Histograms of several images (or DDP ranks) add up, so the threshold can be chosen over all.
    """
    targets = np.asarray(targets)
    probs = _positive_probs(np.asarray(probs), targets)
    valid = targets != ignore_index
    p, t = probs[valid].ravel(), targets[valid].ravel()
    if np.any((t != 0) & (t != 1)):
        raise ValueError(f"choose_binary_threshold: targets hold {np.unique(t[(t != 0) & (t != 1)])[:10].tolist()}; "
                         "a binary task needs 0/1 labels (and the ignore value).")
    bins = np.searchsorted(cands, p, side="right")  # pixel is positive at candidate j iff j < bins
    m = cands.size
    return np.stack([np.bincount(bins[t == 0], minlength=m + 1), np.bincount(bins[t == 1], minlength=m + 1)])


def threshold_from_histograms(cands: np.ndarray, hist: np.ndarray) -> tuple[float, float]:
    """``(threshold, foreground IoU)`` from summed :func:`threshold_histograms`; ties go nearest 0.5."""
    neg, pos = hist
    tp = np.cumsum(pos[::-1])[::-1][1:]
    fp = np.cumsum(neg[::-1])[::-1][1:]
    n_pos = int(pos.sum())
    if n_pos == 0:
        log.warning("choose_binary_threshold: no positive pixel in the targets; keeping threshold 0.5")
        return 0.5, float("nan")
    iou = tp / (n_pos + fp)  # union = tp + fp + fn = positives + fp
    best = iou.max()
    ties = np.flatnonzero(iou >= best - 1e-12)
    j = ties[np.argmin(np.abs(cands[ties] - 0.5))]
    return float(cands[j]), float(iou[j])


# ----------------------------------------------------------------------------- picture


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str] | None, path: str | Path,
                         cell: int = 56) -> Path:
    """Write the row-normalised matrix (recall per true class) as a small PNG heat map (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    m = np.asarray(matrix, dtype=np.float64)
    k = m.shape[0]
    names = _class_names(class_names, k)
    norm = _ratio(m, m.sum(axis=1, keepdims=True))
    font = ImageFont.load_default()
    labels = [f"{i} {n}" for i, n in enumerate(names)]
    left = 12 + 7 * max(len(s) for s in [*labels, "true \\ pred"])
    top = 28
    img = Image.new("RGB", (left + k * cell + 8, top + k * cell + 8), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 8), "true \\ pred", fill="black", font=font)
    for j in range(k):
        draw.text((left + j * cell + cell // 2 - 3, 8), str(j), fill="black", font=font)
    for i in range(k):
        y = top + i * cell
        draw.text((6, y + cell // 2 - 6), labels[i], fill="black", font=font)
        for j in range(k):
            v = 0.0 if np.isnan(norm[i, j]) else float(norm[i, j])
            shade = tuple(int(255 - v * (255 - c)) for c in (8, 48, 107))  # white -> dark blue
            x = left + j * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=shade, outline=(200, 200, 200))
            draw.text((x + 8, y + cell // 2 - 6), f"{v:.2f}", fill="white" if v > 0.5 else "black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
