"""Refit: retrain the best trial's configuration for longer with the share of the budget the search kept back.

``refit: {budget_fraction: f}``:

* the trials get ``(1 - f) x time_budget_s`` (Tune's ``time_budget_s``, :func:`trial_time_budget_s`);
  the refit gets the other ``f x time_budget_s``. Without ``time_budget_s`` the refit gets
  ``f / (1 - f)`` x the trials' wall time, i.e. the share ``f`` of trials + refit.
* After the trials, the best completed trial's TrainConfig (its model card, i.e. what it really
  trained with, budgets applied) is trained again from scratch on the same data and validation
  split, with ``epochs`` = as many of the trial's measured epochs (training + validation) as fit the
  reserved time, less the trial's measured start/finish overhead. ``max_minutes`` caps it in case
  epochs run slower. It runs as one Ray task with a trial's resources, in a nested MLflow run
  tagged ``gigaseg.kind=refit``.
* The refit is kept only if its final ``metric`` (as the trials report it: the last epoch's
  ``val_miou`` by default) beats the best trial's; the log says which was kept, with both scores,
  and the refit run gets the tag ``refit.kept``. A kept refit is one more candidate for the
  champion (search/champion.py): ensemble selection sees it beside the trials.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag

from search.mlflow_runs import (
    COMPLETED,
    FAILED,
    MODEL_URI_TAG,
    PARENT_TAG,
    RUNNING,
    STATUS_TAG,
    MlflowTarget,
    _log_params,
)
from search.spec import ResourcesSection, SearchSpec
from segcore.config import TrainConfig, flatten

log = logging.getLogger(__name__)

KIND_TAG = "gigaseg.kind"
REFIT = "refit"
KEPT_TAG = "refit.kept"
REFIT_OF_TAG = "gigaseg.refit_of"
SLACK = 0.9  # of the reserved time planned as epochs; the rest absorbs slower epochs and logging


@dataclass(frozen=True)
class RefitPlan:
    """What the refit will train and why: the best trial's config with more epochs."""

    trial_id: str
    config: TrainConfig
    reserved_s: float
    trial_epochs: int
    epoch_s: float
    overhead_s: float
    best_score: float


@dataclass
class RefitOutcome:
    """The refit's score against the best trial's, and its model URI when it was kept."""

    run_id: str
    score: float
    best_score: float
    kept: bool
    epochs: int
    seconds: float
    model_uri: str | None = None


def trial_time_budget_s(spec: SearchSpec) -> float | None:
    """Tune's ``time_budget_s``: the search's, less the share reserved for the refit."""
    if spec.time_budget_s is None:
        return None
    return spec.time_budget_s * (1.0 - spec.refit.budget_fraction)


def trials_wall_s(results: Any) -> float:
    """Wall time the trials spanned: first start (last report time - its running time) to last report."""
    spans = [(r.metrics["timestamp"] - r.metrics.get("time_total_s", 0.0), r.metrics["timestamp"])
             for r in results if r.metrics and "timestamp" in r.metrics]
    return max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0


def reserved_seconds(spec: SearchSpec, results: Any) -> float:
    """The refit's time: ``f x time_budget_s``, else ``f / (1 - f)`` x the trials' wall time."""
    f = spec.refit.budget_fraction
    if spec.time_budget_s is not None:
        return f * spec.time_budget_s
    return f / (1.0 - f) * trials_wall_s(results)


def beats(new: float, old: float, mode: str) -> bool:
    """``new`` strictly better than ``old`` for ``mode`` (max or min); NaN never beats."""
    if math.isnan(new):
        return False
    return new > old if mode == "max" else new < old


def plan_refit(spec: SearchSpec, best: Any, model_dir: Path, reserved_s: float) -> RefitPlan | None:
    """The best trial's config with the epochs that fit ``reserved_s``; None (logged) when that is
    not more epochs than the trial trained."""
    from segcore.modeldir import read_card

    history = _history(model_dir)
    epoch_times = [h["epoch_time_s"] for h in history if "epoch_time_s" in h]
    trial_id = best.metrics["trial_id"]
    if not epoch_times:
        log.warning("refit: trial %s recorded no epoch times; no refit", trial_id)
        return None
    epoch_s = sum(epoch_times) / len(epoch_times)
    overhead_s = max(0.0, float(best.metrics.get("time_total_s", 0.0)) - sum(epoch_times))
    usable_s = max(0.0, reserved_s - overhead_s)
    epochs = int(usable_s * SLACK // epoch_s)
    if epochs <= len(history):
        log.warning("refit: the reserved %.0f s (refit.budget_fraction %.2f) fit %d epochs of %.1f s (+ %.0f s "
                    "overhead), not more than trial %s's %d; no refit", reserved_s, spec.refit.budget_fraction,
                    epochs, epoch_s, overhead_s, trial_id, len(history))
        return None
    cfg = read_card(model_dir).train
    update: dict[str, Any] = {"epochs": epochs}
    if "max_minutes" in TrainConfig.model_fields:  # the time cap, where segcore.train has one
        update["max_minutes"] = usable_s / 60.0
    return RefitPlan(trial_id, cfg.model_copy(update=update), reserved_s, len(history), epoch_s, overhead_s,
                     float(best.metrics[spec.metric]))


def _history(model_dir: Path) -> list[dict[str, float]]:
    import json

    path = model_dir / "metrics.json"
    return json.loads(path.read_text()).get("history", []) if path.is_file() else []


def task_resources(res: ResourcesSection) -> dict[str, float]:
    """One trial's resources for the refit task (a DDP trial's: one worker's)."""
    gpus = (1.0 if res.gpus_per_trial else 0.0) if res.workers_per_trial > 1 else res.gpus_per_trial
    return {"num_cpus": res.cpus_per_trial, "num_gpus": gpus}


def open_refit_run(target: MlflowTarget, plan: RefitPlan) -> str:
    """The nested refit run under the parent, with the refit's config and plan as params."""
    client = target.client()
    tags = {PARENT_TAG: target.parent_run_id, KIND_TAG: REFIT, REFIT_OF_TAG: plan.trial_id, STATUS_TAG: RUNNING}
    run_id = client.create_run(target.experiment_id, run_name=f"refit-{plan.trial_id}", tags=tags).info.run_id
    params = {**flatten(plan.config.model_dump(mode="json")), "refit.of_trial": plan.trial_id,
              "refit.reserved_s": round(plan.reserved_s, 1), "refit.trial_epochs": plan.trial_epochs,
              "refit.trial_epoch_s": round(plan.epoch_s, 2)}
    _log_params(client, run_id, params)
    return run_id


class EpochLogger:
    """EpochCallback: the refit's per-epoch metrics on its MLflow run (``step=epoch``)."""

    def __init__(self, target: MlflowTarget, run_id: str) -> None:
        self.client, self.run_id = target.client(), run_id

    def __call__(self, rep: Any) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, rep.epoch) for k, v in rep.metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=items)


def refit_train(plan: RefitPlan, train_dir: str, val_dir: str | None, target: MlflowTarget, run_id: str,
                metric: str, mode: str) -> dict[str, Any]:
    """The Ray task: train ``plan.config`` from scratch; log the model on the refit run only when it
    beats the best trial (the driver downloads it from there, on any node)."""
    from segcore.mlflow_model import log_model_dir
    from segcore.train import train

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gigaseg-refit-") as tmp:
        result = train(plan.config, train_dir, Path(tmp) / "model", callbacks=[EpochLogger(target, run_id)],
                       val_dir=val_dir)
        score = float(result.metrics[metric])
        uri = None
        if beats(score, plan.best_score, mode):
            import mlflow
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri

            with _use_tracking_uri(target.uri), mlflow.start_run(run_id=run_id):
                uri = log_model_dir(result.model_dir, name="model").model_uri
    return {"score": score, "epochs": len(result.history), "seconds": time.perf_counter() - start, "model_uri": uri}


def close_refit_run(target: MlflowTarget, run_id: str, out: RefitOutcome) -> None:
    """Tag the refit run (kept or not, model URI) and put the comparison on the parent run."""
    client = target.client()
    tags = [RunTag(KEPT_TAG, str(out.kept).lower()), RunTag(STATUS_TAG, COMPLETED)]
    tags += [RunTag(MODEL_URI_TAG, out.model_uri)] if out.model_uri else []
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, "FINISHED")
    now = int(time.time() * 1000)
    client.log_batch(target.parent_run_id, metrics=[Metric("refit_score", out.score, now, 0),
                                                    Metric("refit_best_trial_score", out.best_score, now, 0)],
                     tags=[RunTag(KEPT_TAG, str(out.kept).lower()), RunTag("gigaseg.refit_run", run_id)])


def run_refit(spec: SearchSpec, target: MlflowTarget, results: Any, best: Any, model_dir: Path) -> RefitOutcome | None:
    """Plan, train (one Ray task) and judge the refit of ``best`` (a ``ray.tune.Result`` whose model
    directory is ``model_dir``); None when there is nothing to refit."""
    import ray

    plan = plan_refit(spec, best, model_dir, reserved_seconds(spec, results))
    if plan is None:
        return None
    run_id = open_refit_run(target, plan)
    log.info("refit: trial %s's configuration for %d epochs (it trained %d of %.1f s) in the reserved %.0f s, "
             "MLflow run %s", plan.trial_id, plan.config.epochs, plan.trial_epochs, plan.epoch_s, plan.reserved_s,
             run_id)
    task = ray.remote(**task_resources(spec.resources))(refit_train)
    try:
        got = ray.get(task.remote(plan, str(spec.data.train), str(spec.data.val) if spec.data.val else None, target,
                                  run_id, spec.metric, spec.mode))
    except Exception:
        target.client().log_batch(run_id, tags=[RunTag(STATUS_TAG, FAILED)])
        target.client().set_terminated(run_id, "FAILED")
        raise
    out = RefitOutcome(run_id, got["score"], plan.best_score, got["model_uri"] is not None, got["epochs"],
                       got["seconds"], got["model_uri"])
    close_refit_run(target, run_id, out)
    log.info("refit kept: %s (refit %s %.4f after %d epochs in %.0f s vs best trial %s %.4f)",
             "the refit" if out.kept else f"best trial {plan.trial_id} (refit discarded)", spec.metric, out.score,
             out.epochs, out.seconds, plan.trial_id, out.best_score)
    return out


def refit_candidate(spec: SearchSpec, target: MlflowTarget, results: Any, best: Any) -> Any | None:
    """Refit the best trial when ``refit.budget_fraction`` > 0; the kept refit as a champion
    :class:`search.champion.Candidate` (trial id ``refit``), else None."""
    from search.champion import Candidate, trial_models
    from segcore.modelref import local_dir

    if spec.refit.budget_fraction <= 0:
        return None
    found = trial_models(target, [best.metrics["trial_id"]])
    if not found:
        log.warning("refit: best trial %s has no logged model to read its configuration from; no refit",
                    best.metrics["trial_id"])
        return None
    out = run_refit(spec, target, results, best, found[0].model_dir)
    if out is None or not out.kept or out.model_uri is None:
        return None
    return Candidate(REFIT, local_dir(out.model_uri, target.uri))
