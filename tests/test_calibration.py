"""Temperature scaling lowers the ECE of a deliberately over-confident model, is stored on the
card, and is what ``predict_tensor`` (hence ``segment``'s probabilities and entropy) applies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from champion_helpers import label_with, write_images
from pipelines_helpers import make_model

from segcore.calibration import calibrate_model, expected_calibration_error, fit_temperature, tiled_proba
from segcore.data import load_samples, load_spec
from segcore.modelio.card import CONFIG_FILE
from segcore.modelio.folder import save_model_dir
from segcore.modelio.ref import load_model_dir


def _overconfident(src, dst):
    """``src`` with its head's weights and bias x10: the same labels, logits 10x larger."""
    loaded = load_model_dir(src, device="cpu", fold_bn=False)  # saved back below
    head = loaded.model.segmentation_head[0]
    with torch.no_grad():
        head.weight.mul_(10)
        head.bias.mul_(10)
    return save_model_dir(dst, loaded.model, loaded.card)


def _val_probas(loaded, data_dir):
    spec = load_spec(data_dir).model_copy(update={"normalize": loaded.card.train.normalize})
    samples = load_samples(data_dir, spec)
    cfg = loaded.card.train.data
    return ([tiled_proba(loaded, s.image, cfg.val_tile, cfg.val_halo, log=True) for s in samples],
            [s.mask for s in samples])


def test_calibration_lowers_ece_of_an_overconfident_model(tmp_path):
    good = make_model(tmp_path / "good", seed=0)
    hot = _overconfident(good, tmp_path / "hot")
    data = write_images(tmp_path / "val", n=2)
    label_with(good, data, seed=1, sample_temperature=10.0)  # labels drawn from good's p at T = 10
    loaded = load_model_dir(hot, device="cpu")
    probas, masks = _val_probas(loaded, data)
    result = calibrate_model(loaded, hot, probas, masks)
    assert result is not None and result.temperature > 2
    assert result.ece_after < 0.5 * result.ece_before
    assert result.nll_after < result.nll_before
    assert json.loads((hot / CONFIG_FILE).read_text())["extra"]["temperature"] == pytest.approx(result.temperature)

    calibrated = load_model_dir(hot, device="cpu")  # the card's temperature is applied on load
    assert calibrated.temperature == pytest.approx(result.temperature)
    new_probas, _ = _val_probas(calibrated, data)
    flat = np.concatenate([p.reshape(4, -1) for p in new_probas], axis=1)
    labels = np.concatenate([m.reshape(-1) for m in masks])
    assert expected_calibration_error(flat, labels) == pytest.approx(result.ece_after, abs=1e-3)
    for before, after in zip(probas, new_probas, strict=True):  # labels are unchanged
        np.testing.assert_array_equal(before.argmax(0), after.argmax(0))
    probs = load_model_dir(hot, device="cpu").predict_proba(np.zeros((1, 1, 16, 16), np.float32))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50000)).astype(np.float32) * 2
    p_true = torch.softmax(torch.from_numpy(logits), 0).numpy()
    labels = np.array([rng.choice(3, p=p_true[:, i]) for i in range(0, logits.shape[1])])
    hot = torch.log_softmax(torch.from_numpy(logits * 3), 0).numpy()  # T = 3 undoes it
    result = fit_temperature(hot, labels)
    assert result.temperature == pytest.approx(3.0, rel=0.1)


def test_binary_heads_are_not_calibrated(tmp_path):
    from segcore.config import ModelConfig, TrainConfig
    from segcore.modelio.card import ModelCard
    from segcore.models import build_model

    cfg = TrainConfig(model=ModelConfig(arch="Unet", encoder="resnet18", classes=1,
                                        arch_kwargs={"encoder_depth": 2, "decoder_channels": [16, 8]}))
    path = save_model_dir(tmp_path / "bin", build_model(cfg.model), ModelCard(train=cfg, class_names=["bg", "fg"]))
    loaded = load_model_dir(path, device="cpu")
    proba = np.full((2, 8, 8), np.log(0.5), np.float32)
    assert calibrate_model(loaded, path, [proba], [np.zeros((8, 8), np.int64)]) is None
    assert "temperature" not in json.loads((path / CONFIG_FILE).read_text())["extra"]
