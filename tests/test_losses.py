"""Losses: hand-computed values on a 2x2 image, ignore handling, binary heads, schedules, class weights."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segcore.config import LossConfig, LossPhase
from segcore.losses import build_loss, inverse_frequency_weights, list_losses
from segcore.registry import UnknownNameError

ALL = ["bce", "ce", "dice", "focal", "lovasz", "tversky"]
L3 = math.log(3.0)  # softmax([0, ln 3]) = (0.25, 0.75)

# 2x2 image, 2 classes. Pixel: (target, p(class 1)) = a (1, .75), b (0, .25), c (1, .25), d (0, .25)
TARGET = torch.tensor([[[1, 0], [1, 0]]])
Z = torch.tensor([[[L3, -L3], [-L3, -L3]]])  # logit of class 1 vs class 0


def two_channel(z: torch.Tensor) -> torch.Tensor:
    """(N, H, W) binary logit -> (N, 2, H, W) softmax logits [0, z] with the same probabilities."""
    return torch.stack([torch.zeros_like(z), z], dim=1)


def term(name: str, logits: torch.Tensor, target: torch.Tensor, num_classes: int = 2, **cfg) -> float:
    loss = build_loss(LossConfig(terms={name: 1.0}, **cfg), num_classes)
    return float(loss(logits, target))


def test_registry_lists_all_terms():
    assert list_losses() == ALL


def test_hand_computed_multiclass_values():
    logits = two_channel(Z)
    ce = -(3 * math.log(0.75) + math.log(0.25)) / 4
    focal = -(3 * 0.25**2 * math.log(0.75) + 0.75**2 * math.log(0.25)) / 4
    dice = 1 - (4 / 7 + 2 / 3) / 2  # class 1: 2*1/(2+.5+1); class 0: 2*1.5/(3+1+.5)
    tversky = 1 - (1 / (1 + 0.3 * 0.5 + 0.7 * 1) + 1.5 / (1.5 + 0.3 * 1 + 0.7 * 0.5)) / 2
    assert term("ce", logits, TARGET) == pytest.approx(ce, rel=1e-5)
    assert term("focal", logits, TARGET, focal_gamma=2.0) == pytest.approx(focal, rel=1e-5)
    assert term("dice", logits, TARGET) == pytest.approx(dice, rel=1e-5)
    assert term("tversky", logits, TARGET, tversky_alpha=0.3, tversky_beta=0.7) == pytest.approx(tversky, rel=1e-5)


def test_weighted_dice_by_hand():
    cfg = LossConfig(terms={"dice": 1.0}, class_weighting="inverse_frequency")
    loss = build_loss(cfg, 2, torch.tensor([1.0, 3.0]))
    expected = (1 * (1 - 2 / 3) + 3 * (1 - 4 / 7)) / 4
    assert float(loss(two_channel(Z), TARGET)) == pytest.approx(expected, rel=1e-5)


def test_binary_head_matches_two_channel_softmax():
    logits1 = Z.unsqueeze(1)  # (N, 1, H, W): sigmoid(z) = softmax([0, z])[1]
    for name in ["ce", "focal"]:
        assert term(name, logits1, TARGET) == pytest.approx(term(name, two_channel(Z), TARGET), rel=1e-5)
    assert term("focal", logits1, TARGET, focal_alpha=0.8) == pytest.approx(
        term("focal", two_channel(Z), TARGET, focal_alpha=0.8), rel=1e-5)
    assert term("bce", logits1, TARGET) == pytest.approx(term("ce", logits1, TARGET), rel=1e-6)
    assert term("dice", logits1, TARGET) == pytest.approx(1 - 4 / 7, rel=1e-5)  # foreground dice only


def test_focal_with_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 4, 5, 5, generator=g), torch.randint(0, 4, (2, 5, 5), generator=g)
    assert term("focal", logits, target, 4, focal_gamma=0.0) == pytest.approx(term("ce", logits, target, 4), rel=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 3])
def test_ignored_pixels_do_not_contribute(name, k):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, k, 4, 4, generator=g)
    target = torch.randint(0, max(k, 2), (2, 4, 4), generator=g)
    wide_logits = torch.cat([logits, 50 * torch.randn(2, k, 4, 3, generator=g)], dim=3).requires_grad_()
    wide_target = torch.cat([target, torch.full((2, 4, 3), 255)], dim=2)
    loss = build_loss(LossConfig(terms={name: 1.0}), max(k, 2))
    value = loss(wide_logits, wide_target)
    assert float(value.detach()) == pytest.approx(float(loss(logits, target)), rel=1e-5, abs=1e-6)
    value.backward()
    assert wide_logits.grad[..., 4:].abs().max() == 0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 3])
def test_all_ignored_batch_gives_zero_and_backward_works(name, k):
    logits = torch.randn(1, k, 4, 4, requires_grad=True)
    value = build_loss(LossConfig(terms={name: 1.0}), max(k, 2))(logits, torch.full((1, 4, 4), 255))
    value.backward()
    assert float(value.detach()) == 0.0 and logits.grad is not None


@pytest.mark.parametrize("name", ["dice", "tversky", "lovasz"])
@pytest.mark.parametrize("k", [1, 3])
def test_perfect_prediction_gives_zero(name, k):
    target = torch.randint(0, max(k, 2), (2, 6, 6), generator=torch.Generator().manual_seed(2))
    if k == 1:
        logits = (20.0 * (2 * target - 1)).float().unsqueeze(1)
    else:
        logits = 40.0 * F.one_hot(target, k).permute(0, 3, 1, 2).float() - 20.0
    assert term(name, logits, target, max(k, 2)) < 1e-4


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 3])
def test_gradients_flow(name, k):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, k, 6, 6, generator=g, requires_grad=True)
    target = torch.randint(0, max(k, 2), (2, 6, 6), generator=g)
    build_loss(LossConfig(terms={name: 1.0}), max(k, 2))(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_weighted_ce_equals_torch_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits, target = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)
    target[0, :3] = 255
    w = torch.tensor([0.2, 1.0, 1.8])
    loss = build_loss(LossConfig(terms={"ce": 1.0}, class_weighting="inverse_frequency"), 3, w)
    expected = F.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert float(loss(logits, target)) == pytest.approx(float(expected), rel=1e-5)
    unweighted = build_loss(LossConfig(terms={"ce": 1.0}, class_weighting="none"), 3, w)
    assert float(unweighted(logits, target)) == pytest.approx(float(F.cross_entropy(logits, target, ignore_index=255)),
                                                              rel=1e-5)


def test_composite_is_weighted_sum_and_reports_terms():
    loss = build_loss(LossConfig(terms={"dice": 1.0, "focal": 0.5, "lovasz": 0.0}), 2)
    total = float(loss(two_channel(Z), TARGET))
    parts = loss.last_terms
    assert set(parts) == {"dice", "focal"}
    assert total == pytest.approx(parts["dice"] + 0.5 * parts["focal"], rel=1e-6)


def test_schedule_switches_terms_at_epoch():
    cfg = LossConfig(terms={"bce": 1.0}, schedule=[LossPhase(start_epoch=20, terms={"dice": 1.0})])
    loss = build_loss(cfg, 2)
    logits = Z.unsqueeze(1)
    for epoch, expected in [(0, {"bce"}), (19, {"bce"}), (20, {"dice"}), (35, {"dice"})]:
        loss.set_epoch(epoch)
        value = float(loss(logits, TARGET))
        assert set(loss.last_terms) == expected, epoch
    assert value == pytest.approx(1 - 4 / 7, rel=1e-5)


def test_schedule_phase_at_zero_replaces_terms():
    cfg = LossConfig(terms={"dice": 1.0}, schedule=[LossPhase(start_epoch=0, terms={"ce": 1.0}),
                                                     LossPhase(start_epoch=3, terms={"focal": 2.0})])
    loss = build_loss(cfg, 2)
    assert loss.active_weights(0) == {"ce": 1.0} and loss.active_weights(5) == {"focal": 2.0}


@pytest.mark.parametrize("cfg", [LossConfig(terms={"dcie": 1.0}),
                                 LossConfig(terms={"ce": 1.0}, schedule=[LossPhase(start_epoch=2, terms={"dcie": 1})])])
def test_unknown_term_fails_at_build_with_suggestion(cfg):
    with pytest.raises(UnknownNameError, match=r"Did you mean 'dice'.*Valid names: bce, ce, dice"):
        build_loss(cfg, 2)


@pytest.mark.parametrize("terms", [{"dice": 0.0}, {"dice": -1.0}, {}])
def test_bad_weights_fail_at_build(terms):
    with pytest.raises(ValueError, match="loss.terms"):
        build_loss(LossConfig(terms=terms), 2)


def test_bad_inputs_name_the_problem():
    loss = build_loss(LossConfig(terms={"ce": 1.0}), 3)
    logits = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"class ids \[7\]"):
        loss(logits, torch.tensor([[[0, 1], [2, 7]]]))
    with pytest.raises(ValueError, match="does not match logits"):
        loss(logits, torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="built for 3 classes"):
        loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="one per label class"):
        build_loss(LossConfig(class_weighting="inverse_frequency"), 3, torch.ones(2))


def test_inverse_frequency_weights_on_known_masks(caplog):
    mask = np.array([[0, 0, 0, 255], [0, 0, 0, 255], [1, 1, 255, 255]])
    with caplog.at_level(logging.WARNING, logger="segcore.losses"):
        w3 = inverse_frequency_weights([mask], 3)  # counts 6, 2, 0 -> 8/6, 4, 4(max) -> sum 3
    np.testing.assert_allclose(w3, [3 / 7, 9 / 7, 9 / 7], rtol=1e-6)
    assert w3.dtype == np.float32 and "[2]" in caplog.text
    w2 = inverse_frequency_weights(iter([mask[:2], mask[2:]]), 2)
    np.testing.assert_allclose(w2, [0.5, 1.5], rtol=1e-6)
    np.testing.assert_allclose(inverse_frequency_weights([mask], 1), w2, rtol=1e-6)  # binary head: 2 classes
    with pytest.raises(ValueError, match=r"class ids \[3\]"):
        inverse_frequency_weights([np.array([[0, 3]])], 2)


def test_dice_averages_only_classes_present_in_target():
    target = torch.tensor([[[0, 1], [1, 0]]])  # class 2 absent
    logits = 40.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float() - 20.0
    assert term("dice", logits, target, 3) < 1e-4  # absent class 2 would add 1/3 if it were averaged
