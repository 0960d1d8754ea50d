"""A gigaseg model directory logged as an MLflow pyfunc model: the layer above :mod:`segcore.modelio`.

``mlflow.pytorch.log_model`` in MLflow 3 exports with ``torch.export`` and static shapes; a
segmentation model must take any batch and any tile size, so instead the model directory
(``config.json`` + ``model.safetensors``) is logged as a pyfunc *artifact* and rebuilt with
:func:`segcore.modelio.ref.load_model_dir`. The pyfunc is logged "from code" (a two-line entry
file), so nothing is pickled. Its signature is a float32 NCHW tensor with free N, H and W.
The way back, an MLflow URI to a local directory, is :func:`segcore.modelio.ref.download_model_dir`.

This module stays outside the package on purpose: its path is written into every logged model
(:data:`ENTRY_CODE`), so models logged earlier load only while ``segcore.mlflow_model.GigasegPyfunc``
exists.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from segcore.modelio.ref import MODEL_DIR_ARTIFACT, load_model_dir, read_card

log = logging.getLogger(__name__)

ENTRY_CODE = (
    "# gigaseg pyfunc entry point (MLflow 'models from code'): rebuilds the model directory.\n"
    "import mlflow\n"
    "from segcore.mlflow_model import GigasegPyfunc\n"
    "mlflow.models.set_model(GigasegPyfunc())\n"
)


class GigasegPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts class probabilities (N, K, H, W) for a float32 (N, C, H, W) batch of any size."""

    def load_context(self, context: Any) -> None:
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
