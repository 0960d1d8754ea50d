"""The champion alias moves only when the new model beats the current champion on the same
held-out data (tiled, as segment predicts); a worse model is registered as @challenger."""

from __future__ import annotations

import pytest
from champion_helpers import label_with, write_images
from mlflow import MlflowClient
from pipelines_helpers import make_model

from search.champion import HeldOut, gate_and_register
from search.mlflow_runs import start_parent_run


def test_alias_does_not_move_when_the_challenger_is_worse(tmp_path, mlflow_sqlite):
    good, bad = make_model(tmp_path / "good", seed=0), make_model(tmp_path / "bad", seed=1)
    data = write_images(tmp_path / "test", n=1, shape=(64, 96))
    label_with(good, data)  # the good model is right by construction
    heldout = HeldOut(data, what="test")
    target = start_parent_run(mlflow_sqlite, "gate", "gate", "name: gate\n", {"name": "gate"})
    client = MlflowClient(tracking_uri=mlflow_sqlite)

    first = gate_and_register(target, good, "seg", "champion", heldout)
    assert first.promoted and first.alias == "champion" and first.old_score is None
    assert first.new_score == pytest.approx(1.0)

    second = gate_and_register(target, bad, "seg", "champion", heldout)
    assert not second.promoted and second.alias == "challenger"
    assert second.old_score == pytest.approx(1.0) and second.new_score < second.old_score
    assert str(client.get_model_version_by_alias("seg", "champion").version) == first.version
    assert str(client.get_model_version_by_alias("seg", "challenger").version) == second.version
    run = client.get_run(target.parent_run_id)
    assert run.data.metrics["gate_champion_score"] == pytest.approx(1.0)
    assert run.data.metrics["gate_new_score"] == pytest.approx(second.new_score)


def test_alias_moves_when_the_new_model_is_better(tmp_path, mlflow_sqlite):
    good, bad = make_model(tmp_path / "good", seed=0), make_model(tmp_path / "bad", seed=1)
    data = write_images(tmp_path / "test", n=1, shape=(64, 96))
    label_with(good, data)
    target = start_parent_run(mlflow_sqlite, "gate", "gate", "name: gate\n", {"name": "gate"})
    gate_and_register(target, bad, "seg", "champion", HeldOut(data))
    better = gate_and_register(target, good, "seg", "champion", HeldOut(data))
    assert better.promoted and better.old_score < better.new_score
    champion = MlflowClient(tracking_uri=mlflow_sqlite).get_model_version_by_alias("seg", "champion")
    assert str(champion.version) == better.version
