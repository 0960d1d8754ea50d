"""Where MLflow runs go by default, and small helpers to log a training run.

Default: an embedded SQLite store plus a local artifact folder, both under ``GIGASEG_HOME``
(``~/.gigaseg`` unless set). ``MLFLOW_TRACKING_URI`` always wins, so a cluster points every
worker at one tracking server.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def gigaseg_home() -> Path:
    """The project-chosen directory for embedded state (MLflow DB, artifacts, Tune results)."""
    home = Path(os.environ.get("GIGASEG_HOME", Path.home() / ".gigaseg")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def artifact_root() -> Path:
    return gigaseg_home() / "mlartifacts"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<GIGASEG_HOME>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{gigaseg_home() / 'mlflow.db'}"


def mlflow_ui_command(uri: str | None = None) -> str:
    """The exact command that opens these runs in the MLflow UI (bound to localhost only)."""
    uri = uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return (
        f"mlflow ui --backend-store-uri {uri} --default-artifact-root {artifact_root()} "
        "--host 127.0.0.1 --port 5000"
    )


def setup_mlflow(experiment: str, uri: str | None = None) -> str:
    """Point the mlflow client at ``uri`` (default store) and select ``experiment``.

    For a SQLite store the experiment is created with an artifact location under
    GIGASEG_HOME, so runs and artifacts live side by side in one directory.
    """
    import mlflow

    uri = uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        if uri.startswith("sqlite:") or uri.startswith("file:"):
            location = (artifact_root() / experiment).as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except Exception:  # created concurrently by another trial: fine
            log.debug("experiment %s already exists", experiment)
    mlflow.set_experiment(experiment)
    return uri


def log_flat_params(params: dict[str, Any]) -> None:
    """Log params (already flat), stringifying values and trimming to MLflow's 6000-char limit."""
    import mlflow

    clean = {k: ("None" if v is None else str(v))[:6000] for k, v in params.items()}
    items = list(clean.items())
    for i in range(0, len(items), 100):  # MLflow batches at most 100 params
        mlflow.log_params(dict(items[i : i + 100]))


class MlflowEpochLogger:
    """Epoch callback: rank 0's numeric per-epoch metrics with ``step`` into the MLflow run ``run_id``
    at ``uri`` (the driver's run, whether training runs in its process or on Ray Train workers; a
    search's refit run too). The client is made on the first epoch, where the callback runs."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._client: Any = None

    def __call__(self, report: Any) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        if report.rank != 0:
            return
        self._client = self._client or MlflowClient(self.uri)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, report.epoch) for k, v in report.metrics.items()
                   if isinstance(v, (int, float))]
        self._client.log_batch(self.run_id, metrics=metrics)
