"""MLflow layout of a search: one parent run, one nested run per trial, the champion model.

Every call takes the tracking URI explicitly (``MlflowClient(uri)``): trials run in their own
working directories on any node, where an unset URI would silently start a private database.

* parent run (tag ``gigaseg.kind=search``): the search YAML as ``search.yaml`` and flat params;
  at the end the summary (best trial, best metric, counts by status) and the champion version.
* trial run (tags ``mlflow.parentRunId``, ``gigaseg.trial_id``, ``gigaseg.status``): flat params,
  per-epoch metrics with ``step=epoch``; for completed trials the preview PNG, the confusion
  matrix, ``metrics.json`` and the model directory as a pyfunc model (``model``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from segcore import tracking
from segcore.config import flatten

log = logging.getLogger(__name__)

STATUS_TAG = "gigaseg.status"
TRIAL_TAG = "gigaseg.trial_id"
MODEL_URI_TAG = "gigaseg.model_uri"
PARENT_TAG = "mlflow.parentRunId"
COMPLETED, STOPPED, FAILED, INTERRUPTED = "completed", "stopped early", "failed", "interrupted"
RUNNING = "running"
ORPHANED = "orphaned"  # finished after a killed driver's last Tune checkpoint; Tune re-ran its slot
_RUN_STATUS = {COMPLETED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED", INTERRUPTED: "KILLED"}


@dataclass(frozen=True)
class MlflowTarget:
    """Where a search logs: tracking URI, experiment id and the parent run (picklable)."""

    uri: str
    experiment_id: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``; a new SQLite/file experiment stores artifacts under GIGASEG_HOME."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        location = (tracking.artifact_root() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k[:250], ("None" if v is None else str(v))[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def start_parent_run(uri: str, experiment: str, name: str, spec_yaml: str, spec_json: dict) -> MlflowTarget:
    """Create the search's parent run with the config as params and as ``search.yaml``."""
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(uri, experiment)
    run = client.create_run(exp_id, run_name=name, tags={"gigaseg.kind": "search", "gigaseg.search": name})
    flat = {k: v for k, v in flatten(spec_json).items() if not k.startswith("testing.")}
    _log_params(client, run.info.run_id, flat)
    client.log_text(run.info.run_id, spec_yaml, "search.yaml")
    return MlflowTarget(uri, exp_id, run.info.run_id)


def find_trial_run(target: MlflowTarget, trial_id: str) -> str | None:
    """The nested run of ``trial_id`` in this search, if it was created."""
    runs = target.client().search_runs(
        [target.experiment_id],
        filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{target.parent_run_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def trial_model_uri(target: MlflowTarget, trial_id: str) -> str | None:
    """The MLflow URI of the model ``trial_id`` logged, if it completed with one."""
    run_id = find_trial_run(target, trial_id)
    return target.client().get_run(run_id).data.tags.get(MODEL_URI_TAG) if run_id else None


def trial_runs_tagged(target: MlflowTarget, status: str) -> list[str]:
    """Trial ids of this search's runs whose status tag is ``status``."""
    runs = target.client().search_runs(
        [target.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{target.parent_run_id}' and tags.`{STATUS_TAG}` = '{status}'",
    )
    return [r.data.tags[TRIAL_TAG] for r in runs if TRIAL_TAG in r.data.tags]


class TrialRun:
    """The nested MLflow run of one trial, opened (or reopened after a retry) inside the trial."""

    def __init__(self, target: MlflowTarget, trial_id: str, trial_name: str) -> None:
        self.target, self.trial_id, self.trial_name = target, trial_id, trial_name
        self.client = target.client()
        found = find_trial_run(target, trial_id)
        self.reopened = found is not None  # a retry, a resume or a PBT clone of this trial
        self.run_id = found or self._create()
        self.status = self.client.get_run(self.run_id).data.tags.get(STATUS_TAG, RUNNING)

    def _create(self) -> str:
        tags = {PARENT_TAG: self.target.parent_run_id, TRIAL_TAG: self.trial_id, STATUS_TAG: RUNNING}
        run = self.client.create_run(self.target.experiment_id, run_name=self.trial_name, tags=tags)
        return run.info.run_id

    def log_params(self, params: dict[str, Any], train_config: dict[str, Any]) -> None:
        """Sampled dimensions under their YAML names plus the whole TrainConfig, flat. A reopened run
        keeps the params it has (MLflow refuses a changed value; a PBT clone's changes are its
        ``pbt.*`` tags, search/pbt.py) and gets only the missing ones."""
        have = self.client.get_run(self.run_id).data.params if self.reopened else {}
        flat = {**flatten(train_config), **params}
        _log_params(self.client, self.run_id, {k: v for k, v in flat.items() if k[:250] not in have})

    def log_epoch(self, metrics: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=items)

    def log_completed(self, model_dir: Path) -> None:
        """Preview, confusion matrix, metrics and the model (pyfunc); then mark the run completed."""
        import mlflow

        from segcore.mlflow_model import log_model_dir

        for name in ("preview.png", "confusion_matrix.json", "confusion_matrix.png", "metrics.json"):
            if (model_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(model_dir / name))
        with mlflow.tracking._tracking_service.utils._use_tracking_uri(self.target.uri):
            with mlflow.start_run(run_id=self.run_id):
                info = log_model_dir(model_dir, name="model")
        self.client.log_batch(self.run_id, tags=[RunTag(MODEL_URI_TAG, info.model_uri), RunTag(STATUS_TAG, COMPLETED)])
        self.client.set_terminated(self.run_id, "FINISHED")


def mark_trial(target: MlflowTarget, trial_id: str, status: str) -> None:
    """Tag a trial's run with its final status and close it (driver side, from a Tune callback)."""
    run_id = find_trial_run(target, trial_id)
    if run_id is None:
        return
    client = target.client()
    if client.get_run(run_id).data.tags.get(STATUS_TAG) == status:
        return  # already recorded (e.g. by the trial itself): keep its end time
    client.set_tag(run_id, STATUS_TAG, status)
    if status in _RUN_STATUS:  # an orphaned run had finished: keep its end time
        client.set_terminated(run_id, _RUN_STATUS[status])
