"""A gigaseg model directory as an MLflow pyfunc model, and the way back to a directory.

``mlflow.pytorch.log_model`` in MLflow 3 exports with ``torch.export`` and static shapes; a
segmentation model must take any batch and any tile size, so instead the model directory
(``config.json`` + ``model.safetensors``) is logged as a pyfunc *artifact* and rebuilt with
:func:`segcore.modeldir.load_model_dir`. The pyfunc is logged "from code" (a two-line entry
file), so nothing is pickled. Its signature is a float32 NCHW tensor with free N, H and W.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import yaml

from segcore.errors import ModelError

log = logging.getLogger(__name__)

MODEL_DIR_ARTIFACT = "model_dir"
ENTRY_CODE = (
    "# gigaseg pyfunc entry point (MLflow 'models from code'): rebuilds the model directory.\n"
    "import mlflow\n"
    "from segcore.mlflow_model import GigasegPyfunc\n"
    "mlflow.models.set_model(GigasegPyfunc())\n"
)


class GigasegPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts class probabilities (N, K, H, W) for a float32 (N, C, H, W) batch of any size."""

    def load_context(self, context: Any) -> None:
        from segcore.modeldir import load_model_dir

        self.loaded = load_model_dir(context.artifacts[MODEL_DIR_ARTIFACT])

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        batch = np.asarray(model_input, dtype=np.float32)
        if batch.ndim == 3:  # a single (C, H, W) image
            batch = batch[None]
        return self.loaded.predict_proba(batch)


def _signature(model_dir: Path) -> Any:
    """float32 (-1, C, -1, -1) in, float32 (-1, K, -1, -1) out: batch and tile size are free."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from segcore.modeldir import read_card

    card = read_card(model_dir)
    c, k = card.train.model.in_channels, max(len(card.class_names), 2)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k, -1, -1))]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("gigaseg", "torch", "segmentation-models-pytorch", "safetensors", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_model_dir(model_dir: str | Path, name: str = "model", registered_model_name: str | None = None) -> Any:
    """Log ``model_dir`` as a pyfunc model in the active run; returns MLflow's ``ModelInfo``."""
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="gigaseg-pyfunc-") as tmp, warnings.catch_warnings():
        # the signature is explicit; an input example would pin one tile size and cost a prediction
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        entry = Path(tmp) / "gigaseg_pyfunc.py"
        entry.write_text(ENTRY_CODE)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(entry),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
            signature=_signature(model_dir),
            pip_requirements=_requirements(),
            registered_model_name=registered_model_name,
        )


def _model_dir_in(local: Path) -> Path:
    """The gigaseg model directory inside a downloaded MLflow model (or ``local`` itself)."""
    if (local / "config.json").is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        artifact = (flavor.get("artifacts") or {}).get(MODEL_DIR_ARTIFACT, {})
        if artifact.get("path") and (local / artifact["path"] / "config.json").is_file():
            return local / artifact["path"]
    found = sorted(p.parent for p in local.rglob("config.json") if (p.parent / "model.safetensors").is_file())
    if not found:
        raise ModelError(f"{local}: no gigaseg model directory (config.json + model.safetensors) inside.")
    return found[0]


CACHE_DIR = "model-cache"  # under GIGASEG_HOME: one copy of each immutable model a process downloaded
_COMPLETE = ".complete"  # written last into a cache entry, before it is renamed into place


def download_model_dir(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Download ``models:/...`` or ``runs:/...`` and return the local gigaseg model directory.

    ``tracking_uri`` defaults to gigaseg's (MLFLOW_TRACKING_URI, else the SQLite store under
    GIGASEG_HOME, where searches register their champions). It is made the
    current URI while downloading, because MLflow 3 resolves logged models behind ``runs:/``
    and ``models:/`` URIs with the default client.

    Without ``dst``, a registered version (``models:/name/3``), a logged model (``models:/m-<id>``,
    what trials and refits log) or a run's artifacts (``runs:/...``) go to
    ``<GIGASEG_HOME>/model-cache`` once and are reused: every segmenter actor of a pipeline loads
    the model, and a fresh temp copy each (43-95 MB) filled a disk. Other URIs (an alias,
    ``latest``) can move, so they go to a temp directory removed when the process exits.
    """
    from segcore.tracking import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    if dst is not None:
        return _download(uri, Path(dst), tracking_uri)
    key = _cache_key(uri, tracking_uri)
    if key is None:
        tmp = Path(tempfile.mkdtemp(prefix="gigaseg-model-"))
        atexit.register(shutil.rmtree, tmp, True)
        return _download(uri, tmp, tracking_uri)
    return _cached(uri, key, tracking_uri)


def _download(uri: str, dst: Path, tracking_uri: str | None) -> Path:
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(tracking_uri) if tracking_uri else nullcontext():
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
    model_dir = _model_dir_in(Path(local))
    log.info("downloaded %s to %s", uri, model_dir)
    return model_dir


def _cache_key(uri: str, tracking_uri: str | None) -> str | None:
    """A key for a URI whose artifacts do not change, else None. A registered version's key holds
    its source and creation time, so a version 3 in a recreated store is not taken for the old one."""
    from segcore.modelref import is_immutable, registered_version

    if not is_immutable(uri):
        return None
    parts = [tracking_uri or "", uri]
    if (name_version := registered_version(uri)) is not None:
        from mlflow import MlflowClient

        version = MlflowClient(tracking_uri=tracking_uri).get_model_version(*name_version)
        parts += [str(version.source), str(version.creation_timestamp)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _cached(uri: str, key: str, tracking_uri: str | None) -> Path:
    """The cache entry ``key`` for ``uri``: downloaded beside it, then renamed into place, so that
    processes downloading the same model at once never see half a copy."""
    from segcore.tracking import gigaseg_home

    root = gigaseg_home() / CACHE_DIR
    entry = root / key
    if not (entry / _COMPLETE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            _download(uri, part, tracking_uri)
            (part / _COMPLETE).write_text(uri + "\n")
            os.rename(part, entry)
        except OSError:
            if not (entry / _COMPLETE).is_file():  # not another process's copy in place: a real failure
                raise
        finally:
            shutil.rmtree(part, ignore_errors=True)
    return _model_dir_in(entry)
