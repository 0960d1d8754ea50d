"""Metrics: a hand-computed confusion matrix, agreement with scikit-learn, merge, threshold, report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
)

from segcore.metrics import (
    ConfusionMatrix,
    choose_binary_threshold,
    confusion_matrix_png,
    flat_metrics,
    format_report,
)

# rows true / cols pred: [[1, 1, 0], [0, 2, 0], [1, 0, 0]]; the last pixel is ignored
TARGET = np.array([[0, 0, 1], [1, 2, 255]])
PRED = np.array([[0, 1, 1], [1, 0, 2]])


def test_hand_computed_example():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    m = cm.compute()
    np.testing.assert_allclose(m["iou"], [1 / 3, 2 / 3, 0])
    np.testing.assert_allclose(m["dice"], [1 / 2, 4 / 5, 0])
    np.testing.assert_allclose(m["precision"], [1 / 2, 2 / 3, np.nan])  # class 2 never predicted
    np.testing.assert_allclose(m["recall"], [1 / 2, 1, 0])
    np.testing.assert_array_equal(m["support"], [2, 2, 1])
    assert m["pixel_acc"] == pytest.approx(3 / 5)
    assert m["miou"] == pytest.approx(1 / 3) and m["total"] == 5


def test_class_absent_from_data_and_predictions_is_left_out_of_the_mean():
    m = ConfusionMatrix(4).update(PRED, TARGET).compute()
    assert math.isnan(m["iou"][3]) and math.isnan(m["dice"][3])
    assert m["miou"] == pytest.approx(1 / 3)
    predicted_only = ConfusionMatrix(4).update(np.array([3, 0]), np.array([0, 0])).compute()
    assert predicted_only["iou"][3] == 0 and predicted_only["miou"] == pytest.approx(0.25)  # (0.5 + 0) / 2


def test_empty_matrix_is_nan_not_an_error():
    m = ConfusionMatrix(2).update(np.array([0, 1]), np.array([255, 255])).compute()
    assert math.isnan(m["miou"]) and math.isnan(m["pixel_acc"]) and m["total"] == 0


def _random_labels(seed: int, k: int = 5, shape=(4, 50, 60)):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, k, shape)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, k, shape))  # better than chance
    target[rng.random(shape) < 0.1] = 255
    return pred, target


def test_agrees_with_scikit_learn():
    k = 5
    pred, target = _random_labels(0, k)
    cm = ConfusionMatrix(k)
    cm.update(pred[:2], target[:2])
    cm.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))  # torch path, same counts
    valid = target != 255
    t, p = target[valid], pred[valid]
    labels = list(range(k))
    np.testing.assert_array_equal(cm.matrix, confusion_matrix(t, p, labels=labels))
    m = cm.compute()
    np.testing.assert_allclose(m["iou"], jaccard_score(t, p, labels=labels, average=None))
    np.testing.assert_allclose(m["dice"], f1_score(t, p, labels=labels, average=None))
    np.testing.assert_allclose(m["precision"], precision_score(t, p, labels=labels, average=None))
    np.testing.assert_allclose(m["recall"], recall_score(t, p, labels=labels, average=None))
    assert m["pixel_acc"] == pytest.approx(accuracy_score(t, p))
    assert m["miou"] == pytest.approx(jaccard_score(t, p, labels=labels, average="macro"))


def test_merge_of_partial_matrices_equals_one_matrix():
    pred, target = _random_labels(1)
    whole = ConfusionMatrix(5).update(pred, target)
    a = ConfusionMatrix(5).update(pred[:1], target[:1])
    b = ConfusionMatrix(5).update(pred[1:], target[1:])
    np.testing.assert_array_equal(a.merge(b).matrix, whole.matrix)
    assert a.compute()["miou"] == whole.compute()["miou"]
    with pytest.raises(ValueError, match="merge only matrices built alike"):
        a.merge(ConfusionMatrix(3))


def test_binary_head_counts_two_classes():
    cm = ConfusionMatrix(1).update(np.array([1, 0, 1]), np.array([1, 0, 0]))
    np.testing.assert_array_equal(cm.matrix, [[1, 1], [0, 1]])


def test_bad_inputs_name_the_problem():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"target holds class ids \[7\]"):
        cm.update(np.array([0, 1]), np.array([7, 1]))
    with pytest.raises(ValueError, match=r"pred holds class ids \[-1\]"):
        cm.update(torch.tensor([-1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pass integer class ids"):
        cm.update(np.array([0.2, 0.9]), np.array([0, 1]))
    with pytest.raises(ValueError, match="pred shape"):
        cm.update(np.zeros((2, 2), dtype=int), np.zeros(4, dtype=int))
    assert cm.matrix.sum() == 0


def test_flat_metrics_keys_and_values():
    m = ConfusionMatrix(3).update(PRED, TARGET).compute()
    flat = flat_metrics(m, ["background", "Pore space", "quartz/feldspar"], prefix="val_")
    assert flat["val_miou"] == pytest.approx(1 / 3) and flat["val_pixel_acc"] == pytest.approx(3 / 5)
    assert flat["val_iou_pore_space"] == pytest.approx(2 / 3)
    assert flat["val_dice_quartz_feldspar"] == 0.0 and math.isnan(flat["val_precision_quartz_feldspar"])
    assert all(isinstance(v, float) for v in flat.values())
    clash = flat_metrics(m, ["a b", "a-b", "??"], prefix="")
    assert {"iou_a_b", "iou_a_b_1", "iou_class2"} <= set(clash)
    with pytest.raises(ValueError, match="one name per class"):
        flat_metrics(m, ["only", "two"])


def test_report_contains_names_and_numbers():
    m = ConfusionMatrix(3).update(PRED, TARGET).compute()
    report = format_report(m, ["background", "Pore space", "quartz"])
    lines = report.splitlines()
    pore = next(line for line in lines if line.strip().startswith("Pore space"))
    assert pore.split()[-5:] == ["0.6667", "1.0000", "0.8000", "0.6667", "2"]  # precision recall f1 iou support
    assert "iou" in lines[0] and "support" in lines[0]
    assert "0.3333" in next(line for line in lines if "mean IoU" in line)
    assert "0.6000" in next(line for line in lines if "pixel accuracy" in line)


def test_threshold_chooser_finds_known_best():
    # negatives: 100 at 0.2, 30 at 0.45; positives: 50 at 0.4, 100 at 0.8.
    # t in (0.2, 0.4] -> TP 150, FP 30 -> IoU 5/6, the best; ties resolve to the t nearest 0.5 -> 0.40
    probs = np.repeat([0.2, 0.45, 0.4, 0.8, 0.99], [100, 30, 50, 100, 40])
    targets = np.repeat([0, 0, 1, 1, 255], [100, 30, 50, 100, 40])  # the 0.99s are ignored
    threshold, iou = choose_binary_threshold(probs, targets)
    assert threshold == pytest.approx(0.40) and iou == pytest.approx(5 / 6)
    threshold, _ = choose_binary_threshold(probs, targets, candidates=[0.1, 0.3, 0.5])
    assert threshold == 0.3
    two_channel = np.stack([1 - probs, probs], axis=1)[:, :, None]  # (N, 2, 1)
    assert choose_binary_threshold(two_channel, targets[:, None])[0] == pytest.approx(0.40)


def test_threshold_chooser_matches_brute_force():
    rng = np.random.default_rng(3)
    targets = (rng.random(20000) < 0.3).astype(np.int64)
    probs = np.clip(0.35 * targets + rng.random(20000) * 0.65, 0, 1)
    threshold, iou = choose_binary_threshold(probs, targets)

    def iou_at(t: float) -> float:
        pos = probs >= t
        return (pos & (targets == 1)).sum() / (pos | (targets == 1)).sum()

    best = max(iou_at(t) for t in np.round(np.arange(1, 100) / 100, 2))
    assert iou == pytest.approx(best) and iou_at(threshold) == pytest.approx(best)


def test_threshold_chooser_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1 labels"):
        choose_binary_threshold(np.array([0.2, 0.8]), np.array([0, 2]))
    with pytest.raises(ValueError, match="every target pixel is ignored"):
        choose_binary_threshold(np.array([0.2]), np.array([255]))
    assert choose_binary_threshold(np.array([0.2, 0.8]), np.array([0, 0]))[0] == 0.5


def test_confusion_matrix_png(tmp_path):
    path = confusion_matrix_png(np.array([[10, 0], [5, 5]]), ["background", "pore"], tmp_path / "cm.png")
    img = Image.open(path).convert("RGB")
    assert img.width > 100 and img.height > 100
    arr = np.asarray(img).astype(int)
    cells = [tuple(arr[y, x]) for y, x in [(35, img.width - 100), (35, img.width - 20)]]  # row 0: 1.0 then 0.0
    assert sum(cells[0]) < sum(cells[1])  # the full cell is darker than the empty one
