"""Ensemble model directories load everywhere a model does and average their members'
probabilities; greedy selection (Caruana) starts from the best member and never loses score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from champion_helpers import label_with, write_images
from pipelines_helpers import make_model

from segcore.errors import ModelError
from segcore.modelio.ensemble import EnsembleModel, greedy_select, miou_of, save_ensemble_dir
from segcore.modelio.ref import digest, load_model


@pytest.fixture
def members(tmp_path):
    return [make_model(tmp_path / f"m{i}", seed=i) for i in range(2)]


def test_ensemble_probabilities_are_the_weighted_mean(tmp_path, members):
    ens = save_ensemble_dir(tmp_path / "ens", members, [1.0, 3.0])
    loaded = load_model(ens, device="cpu")
    assert isinstance(loaded, EnsembleModel)
    assert loaded.weights == pytest.approx([0.25, 0.75])
    batch = np.random.default_rng(0).random((2, 1, 40, 56), dtype=np.float32)
    p = [load_model(m, device="cpu").predict_proba(batch) for m in members]
    np.testing.assert_allclose(loaded.predict_proba(batch), 0.25 * p[0] + 0.75 * p[1], atol=1e-6)
    assert loaded.size_multiple == 4 and loaded.num_classes == 4 and not loaded.binary
    assert loaded.card.extra["halo"] >= 16
    assert digest(ens) != digest(members[0])


def test_ensemble_temperature_divides_log_probabilities(tmp_path, members):
    ens = save_ensemble_dir(tmp_path / "ens", members, [1, 1], extra={"temperature": 2.0})
    loaded = load_model(ens, device="cpu")
    batch = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
    p = 0.5 * sum(load_model(m, device="cpu").predict_proba(batch) for m in members)
    want = torch.softmax(torch.from_numpy(np.log(p)) / 2.0, dim=1).numpy()
    np.testing.assert_allclose(loaded.predict_proba(batch), want, atol=1e-5)
    np.testing.assert_array_equal(loaded.predict_proba(batch).argmax(1), p.argmax(1))


def test_members_must_agree(tmp_path, members):
    from segcore.config import NormalizeConfig

    other = make_model(tmp_path / "other", seed=2, normalize=NormalizeConfig(mode="dtype_range"))
    with pytest.raises(ModelError, match="normalize"):
        save_ensemble_dir(tmp_path / "ens", [members[0], other], [1, 1])


def test_ensemble_loads_in_evaluate_pyfunc_and_segment_options(tmp_path, members, mlflow_sqlite):
    import mlflow

    from pipelines.options import load_for_run, resolve_tiling
    from segcore.evaluate import evaluate
    from segcore.mlflow_model import log_model_dir

    ens = save_ensemble_dir(tmp_path / "ens", members, [0.5, 0.5])
    data = write_images(tmp_path / "data")
    label_with(ens, data)
    result = evaluate(ens, data, tmp_path / "eval", n_overlays=0, device="cpu")
    assert result.metrics["miou"] == pytest.approx(1.0)

    mlflow.set_tracking_uri(mlflow_sqlite)
    with mlflow.start_run():
        info = log_model_dir(ens, name="model", registered_model_name="ens-test")
    batch = np.random.default_rng(2).random((1, 1, 48, 40), dtype=np.float32)
    want = load_model(ens, device="cpu").predict_proba(batch)
    np.testing.assert_allclose(mlflow.pyfunc.load_model(info.model_uri).predict(batch), want, atol=1e-6)
    by_uri = load_model("models:/ens-test/1", device="cpu", tracking_uri=mlflow_sqlite)
    assert isinstance(by_uri, EnsembleModel)
    np.testing.assert_allclose(by_uri.predict_proba(batch), want, atol=1e-6)

    loaded, info = load_for_run(str(ens), None)  # what `segment` does before starting Ray
    assert info.stride == 4 and info.class_names == loaded.card.class_names
    tiling = resolve_tiling(loaded, {"tile": None, "halo": None, "batch_size": 4}, actors=1)
    assert tiling["halo"] % 4 == 0 and tiling["tile"] % 4 == 0


def _noisy_probas(labels: np.ndarray, k: int, acc: float, seed: int) -> np.ndarray:
    """(K, P) probabilities whose argmax is right on about ``acc`` of the pixels."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(k, labels.size)).astype(np.float32)
    right = rng.random(labels.size) < acc
    logits[labels[right], np.flatnonzero(right)] += 3.0
    e = np.exp(logits - logits.max(0))
    return e / e.sum(0)


def test_greedy_selection_picks_the_best_first_and_never_loses():
    labels = np.random.default_rng(0).integers(0, 3, 20000)
    probas = [_noisy_probas(labels, 3, acc, seed) for acc, seed in ((0.5, 1), (0.8, 2), (0.6, 3), (0.75, 4))]
    sel = greedy_select(probas, labels, k=5)
    assert sel.path[0] == pytest.approx(max(sel.single_scores))
    assert sel.members[0] == 1  # the best single model is picked first
    assert sel.score >= sel.best_single and sel.gain >= 0
    assert sel.gain > 0.005  # independent errors: averaging helps
    assert sum(sel.weights) == pytest.approx(1.0)
    ens = sum(w * probas[m] for m, w in zip(sel.members, sel.weights, strict=True))
    assert miou_of(ens, labels) == pytest.approx(sel.score)


def test_greedy_selection_keeps_a_dominant_single_model():
    labels = np.random.default_rng(0).integers(0, 3, 5000)
    perfect = np.eye(3, dtype=np.float32)[labels].T * 0.9 + 0.1 / 3
    probas = [_noisy_probas(labels, 3, 0.4, 5), perfect]
    sel = greedy_select(probas, labels, k=4)
    assert sel.members == [1] and sel.weights == [1.0] and sel.score == pytest.approx(1.0)


def test_segment_takes_tta_from_the_card_unless_told(tmp_path):
    from pipelines.options import resolve_tiling

    loaded = load_model(make_model(tmp_path / "m", extra={"tta": True}), device="cpu")
    assert resolve_tiling(loaded, {"tile": 64, "halo": 32})["tta"] is True
    assert resolve_tiling(loaded, {"tile": 64, "halo": 32, "tta": False})["tta"] is False
    plain = load_model(make_model(tmp_path / "p"), device="cpu")
    assert resolve_tiling(plain, {"tile": 64, "halo": 32, "tta": None})["tta"] is False
