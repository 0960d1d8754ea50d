"""A registered model version is downloaded once into <GIGASEG_HOME>/model-cache and reused, not
copied to a new temp folder by every load (each segmenter actor loads the model; the copies filled
a disk). An alias can move, so it is not cached. A version number that is reused after the
registered model was deleted is another model, and gets its own entry."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient
from pipelines_helpers import make_model

from segcore.mlflow_model import log_model_dir
from segcore.modelio.ref import CACHE_DIR, local_dir


def _register(model_dir: Path, name: str, uri: str) -> str:
    """Log and register ``model_dir``; returns the logged model's URI (``models:/m-<id>``)."""
    mlflow.set_tracking_uri(uri)  # this test's store, whatever an earlier test left set
    try:
        with mlflow.start_run():
            return log_model_dir(model_dir, registered_model_name=name).model_uri
    finally:
        mlflow.set_tracking_uri(None)


def _entries(home: Path) -> list[Path]:
    return sorted((home / CACHE_DIR).iterdir())


def test_a_registered_version_is_downloaded_once_and_an_alias_is_not_cached(tmp_path, mlflow_sqlite):
    home = tmp_path / "gigaseg-home"
    model = make_model(tmp_path / "model", seed=0)
    logged = _register(model, "seg", mlflow_sqlite)

    first, again = local_dir("models:/seg/1"), local_dir("models:/seg/1")
    assert first == again and first.is_relative_to(home / CACHE_DIR)
    assert (first / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert len(_entries(home)) == 1  # one complete entry, no partial download left beside it
    assert logged.startswith("models:/m-")  # what trials and refits log: an id, so cached as well
    assert local_dir(logged) == local_dir(logged) and local_dir(logged).is_relative_to(home / CACHE_DIR)
    assert len(_entries(home)) == 2

    MlflowClient(tracking_uri=mlflow_sqlite).set_registered_model_alias("seg", "champion", "1")
    moving = local_dir("models:/seg@champion")
    assert not moving.is_relative_to(home / CACHE_DIR)
    assert (moving / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert len(_entries(home)) == 2


def test_a_reused_version_number_is_not_taken_for_the_deleted_model(tmp_path, mlflow_sqlite):
    home = tmp_path / "gigaseg-home"
    old, new = make_model(tmp_path / "old", seed=0), make_model(tmp_path / "new", seed=1)
    _register(old, "seg", mlflow_sqlite)
    assert (local_dir("models:/seg/1") / "model.safetensors").read_bytes() == \
        (old / "model.safetensors").read_bytes()

    MlflowClient(tracking_uri=mlflow_sqlite).delete_registered_model("seg")
    _register(new, "seg", mlflow_sqlite)  # version 1 again, of another model
    fetched = local_dir("models:/seg/1")
    assert (fetched / "model.safetensors").read_bytes() == (new / "model.safetensors").read_bytes()
    assert len(_entries(home)) == 2
