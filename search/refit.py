"""Refit: retrain the best trial's configuration for longer with the share of the budget the search kept back.

``refit: {budget_fraction: f}``:

* the trials get ``(1 - f) x time_budget_s`` (Tune's ``time_budget_s``, :func:`trial_time_budget_s`);
  the refit gets the other ``f x time_budget_s``. Without ``time_budget_s`` the refit gets
  ``f / (1 - f)`` x the trials' wall time, i.e. the share ``f`` of trials + refit.
* After the trials, the best completed trial's TrainConfig (its model card, i.e. what it really
  trained with, budgets applied) is trained again on the same data and validation split, with
  ``epochs`` = as many of the trial's measured epochs (training + validation) as fit the reserved
  time, less the trial's measured start/finish overhead. With ``refit.warm_start`` (default) it
  starts from the trial's weights (``model.init_weights``) with a fresh schedule, like a warm
  restart, so the trial's training is built on rather than repeated; else from scratch.
  ``max_minutes`` caps it in case epochs run slower. ``refit.top_k`` refits the best k trials
  side by side, each as one Ray task with a trial's resources, in a nested MLflow run tagged
  ``gigaseg.kind=refit``.
* The refit is kept only if its final ``metric`` (as the trials report it: the last epoch's
  ``val_miou`` by default) beats the best trial's; the log says which was kept, with both scores,
  and the refit run gets the tag ``refit.kept``. A kept refit is one more candidate for the
  champion (search/champion.py): ensemble selection sees it beside the trials.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
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
    trial_model_uri,
)
from search.spec import ResourcesSection, SearchSpec
from segcore.config import TrainConfig, flatten
from segcore.modelio.ref import local_dir, read_card
from segcore.steps import steps_per_epoch, with_steps, worker_lr
from segcore.tracking import MlflowEpochLogger

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
    start_from: str | None = None  # the trial's model URI (warm start), resolved where the task runs
    cpus: float = 1.0  # the refit task's CPUs (and torch threads): a trial's, or the idle CPUs' share
    workers: int = 1  # > 1: data-parallel on a cluster's workers (search.ddp), steps_per_worker each
    steps_per_worker: int = 0


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
    trial_id: str = ""
    worker_steps: float = 0.0  # optimizer steps x workers (a cluster's refit)


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


def plan_refit(spec: SearchSpec, best: Any, model_dir: Path, reserved_s: float,
               start_from: str | None = None) -> RefitPlan | None:
    """The best trial's config with the epochs that fit ``reserved_s`` (warm-started from the model
    URI ``start_from`` if given); None (logged) when no epoch fits, or from scratch, when that is not
    more epochs than the trial trained."""
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
    needed = 1 if start_from else len(history) + 1  # from scratch it must outlast the trial; warm, any epoch adds
    if epochs < needed:
        log.warning("refit: the reserved %.0f s (refit.budget_fraction %.2f) fit %d epochs of %.1f s (+ %.0f s "
                    "overhead), fewer than the %d a refit of trial %s %s needs; no refit", reserved_s,
                    spec.refit.budget_fraction, epochs, epoch_s, overhead_s, needed, trial_id,
                    "from its weights" if start_from else "from scratch")
        return None
    cfg = read_card(model_dir).train
    update: dict[str, Any] = {"epochs": epochs}
    if "max_minutes" in TrainConfig.model_fields:  # the time cap, where segcore.train has one
        update["max_minutes"] = usable_s / 60.0
    return RefitPlan(trial_id, cfg.model_copy(update=update), reserved_s, len(history), epoch_s, overhead_s,
                     float(best.metrics[spec.metric]), start_from)


def _history(model_dir: Path) -> list[dict[str, float]]:
    import json

    path = model_dir / "metrics.json"
    return json.loads(path.read_text()).get("history", []) if path.is_file() else []


def task_resources(res: ResourcesSection, cpus: float | None = None) -> dict[str, float]:
    """One trial's resources for the refit task (a DDP trial's: one worker's), with ``cpus`` CPUs if given."""
    gpus = (1.0 if res.gpus_per_trial else 0.0) if res.workers_per_trial > 1 else res.gpus_per_trial
    return {"num_cpus": cpus or res.cpus_per_trial, "num_gpus": gpus}


def refit_cpus(res: ResourcesSection, refits: int) -> float:
    """CPUs for each of ``refits`` CPU refit tasks: the CPUs Ray has free after the trials, shared
    evenly, at least a trial's and at most one node's (a task runs on one node). A trial of 1 CPU on
    a 2-CPU machine leaves one CPU idle while the single best trial is refitted; this gives it to
    the refit. GPU and DDP refits keep a trial's resources."""
    import ray

    if res.gpus_per_trial or res.workers_per_trial > 1 or refits < 1:
        return res.cpus_per_trial
    free = float(ray.available_resources().get("CPU", 0.0))
    node_max = max((float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")), default=0.0)
    return float(max(res.cpus_per_trial, min(math.floor(free / refits), node_max)))


def with_cpus(plan: RefitPlan, cpus: float, per_trial: float) -> RefitPlan:
    """``plan`` on ``cpus`` CPUs. A one-cycle refit under ``max_minutes`` may run up to cpus / per_trial
    times the epochs: its schedule follows the minutes (segcore.schedules.BudgetedOneCycle), so the
    extra speed buys steps; other schedules keep their epochs (a cut cosine_restarts would stop mid-cycle)."""
    cfg = plan.config
    if cpus > per_trial and cfg.optim.schedule == "one_cycle" and cfg.max_minutes:
        cfg = cfg.model_copy(update={"epochs": math.ceil(cfg.epochs * cpus / per_trial)})
    return replace(plan, config=cfg, cpus=cpus)


def open_refit_run(target: MlflowTarget, plan: RefitPlan) -> str:
    """The nested refit run under the parent, with the refit's config and plan as params."""
    client = target.client()
    tags = {PARENT_TAG: target.parent_run_id, KIND_TAG: REFIT, REFIT_OF_TAG: plan.trial_id, STATUS_TAG: RUNNING}
    run_id = client.create_run(target.experiment_id, run_name=f"refit-{plan.trial_id}", tags=tags).info.run_id
    params = {**flatten(plan.config.model_dump(mode="json")), "refit.of_trial": plan.trial_id,
              "refit.reserved_s": round(plan.reserved_s, 1), "refit.trial_epochs": plan.trial_epochs,
              "refit.trial_epoch_s": round(plan.epoch_s, 2), "refit.start_from": plan.start_from or "scratch",
              "refit.cpus": plan.cpus, "refit.workers": plan.workers, "refit.steps_per_worker": plan.steps_per_worker}
    _log_params(client, run_id, params)
    return run_id


@contextmanager
def _tracking_env(uri: str) -> Iterator[None]:
    """``MLFLOW_TRACKING_URI`` = ``uri`` inside (a model URI in the config resolves there), then as before."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def refit_train(plan: RefitPlan, train_dir: str, val_dir: str | None, target: MlflowTarget, run_id: str,
                metric: str, mode: str) -> dict[str, Any]:
    """The Ray task: train ``plan.config`` (from the trial's weights when warm-started); log the model
    on the refit run only when it beats the best trial (the driver downloads it from there, on any node)."""
    import torch

    from segcore.mlflow_model import log_model_dir
    from segcore.plan.timing import torch_threads
    from segcore.train import train

    start = time.perf_counter()
    cfg = plan.config
    if plan.start_from:  # the card records the URI; this task resolves it against the search's store
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_weights": plan.start_from})})
    with tempfile.TemporaryDirectory(prefix="gigaseg-refit-") as tmp, _tracking_env(target.uri), \
            torch_threads(max(1, int(plan.cpus))):
        target.client().log_metric(run_id, "torch_threads", torch.get_num_threads())
        result = train(cfg, train_dir, Path(tmp) / "model", callbacks=[MlflowEpochLogger(target.uri, run_id)],
                       val_dir=val_dir)
        score = float(result.metrics[metric])
        uri = None
        if beats(score, plan.best_score, mode):
            import mlflow
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri

            with _use_tracking_uri(target.uri), mlflow.start_run(run_id=run_id):
                uri = log_model_dir(result.model_dir, name="model").model_uri
    return {"score": score, "epochs": len(result.history), "seconds": time.perf_counter() - start, "model_uri": uri}


def close_refit_run(target: MlflowTarget, run_id: str, out: RefitOutcome, on_parent: bool = True) -> None:
    """Tag the refit run (kept or not, model URI) and, ``on_parent``, put the comparison on the parent run."""
    client = target.client()
    tags = [RunTag(KEPT_TAG, str(out.kept).lower()), RunTag(STATUS_TAG, COMPLETED)]
    tags += [RunTag(MODEL_URI_TAG, out.model_uri)] if out.model_uri else []
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, "FINISHED")
    if not on_parent:
        return
    now = int(time.time() * 1000)
    client.log_batch(target.parent_run_id, metrics=[Metric("refit_score", out.score, now, 0),
                                                    Metric("refit_best_trial_score", out.best_score, now, 0)],
                     tags=[RunTag(KEPT_TAG, str(out.kept).lower()), RunTag("gigaseg.refit_run", run_id)])


def run_refits(spec: SearchSpec, target: MlflowTarget, results: Any, top: list[tuple[Any, str]],
               best_id: str) -> list[RefitOutcome]:
    """Plan, train side by side (one Ray task each, a trial's resources) and judge the refits of
    ``top``: (``ray.tune.Result``, its logged model's URI) pairs; the refit of ``best_id`` (the
    search's best trial) is noted on the parent run. A refit that fails is logged and closed as
    failed; the others go on."""
    import ray


    reserved = reserved_seconds(spec, results)
    plans = [p for trial, uri in top
             if (p := plan_refit(spec, trial, local_dir(uri, target.uri), reserved,
                                 uri if spec.refit.warm_start else None))]
    cpus = refit_cpus(spec.resources, len(plans))
    plans = [with_cpus(p, cpus, spec.resources.cpus_per_trial) for p in plans]
    task = ray.remote(**task_resources(spec.resources, cpus))(refit_train)
    val = str(spec.data.val) if spec.data.val else None
    launched = []
    for plan in plans:
        run_id = open_refit_run(target, plan)
        log.info("refit: trial %s's configuration for up to %d epochs from %s (it trained %d of %.1f s) in the "
                 "reserved %.0f s on %g CPU(s), MLflow run %s", plan.trial_id, plan.config.epochs,
                 "its weights" if plan.start_from else "scratch", plan.trial_epochs, plan.epoch_s, plan.reserved_s,
                 plan.cpus, run_id)
        ref = task.remote(plan, str(spec.data.train), val, target, run_id, spec.metric, spec.mode)
        launched.append((plan, run_id, ref))
    return [out for plan, run_id, ref in launched
            if (out := _judge(spec, target, plan, run_id, partial(ray.get, ref),
                               on_parent=plan.trial_id == best_id)) is not None]


def _judge(spec: SearchSpec, target: MlflowTarget, plan: RefitPlan, run_id: str, get: Callable[[], dict[str, Any]],
           on_parent: bool) -> RefitOutcome | None:
    """Wait for one refit (``get()``: its result), close its run (and, for the best trial's, note it on the parent)."""
    try:
        got = get()
    except Exception as exc:
        target.client().log_batch(run_id, tags=[RunTag(STATUS_TAG, FAILED)])
        target.client().set_terminated(run_id, "FAILED")
        log.warning("refit of trial %s failed (%s: %s)", plan.trial_id, type(exc).__name__, exc, exc_info=True)
        return None
    out = RefitOutcome(run_id, got["score"], plan.best_score, got["model_uri"] is not None, got["epochs"],
                       got["seconds"], got["model_uri"], plan.trial_id, got.get("steps", 0.0))
    close_refit_run(target, run_id, out, on_parent)
    log.info("refit kept: %s (refit %s %.4f after %d epochs in %.0f s vs trial %s %.4f)",
             "the refit" if out.kept else f"trial {plan.trial_id} (refit discarded)", spec.metric, out.score,
             out.epochs, out.seconds, plan.trial_id, out.best_score)
    return out


def plan_worker_refit(spec: SearchSpec, best: Any, model_dir: Path, used: Any,
                      start_from: str | None) -> RefitPlan | None:
    """The best trial's config for the steps each of a cluster's N workers has left (``used``:
    :class:`search.lanes.WorkerSteps`), data-parallel on all N: each keeps the trial's batch and
    validation cadence, the peak lr grows by sqrt(N) (segcore.steps.worker_lr, as ``gigaseg train
    --workers N`` plans it), a fresh one-cycle from the trial's weights. None (logged) when the steps
    left do not make one epoch of the trial."""
    steps, workers = used.refit_steps(), used.workers
    cfg = read_card(model_dir).train
    trial_id = best.metrics["trial_id"]
    per_epoch = steps_per_epoch(cfg.data.patches_per_epoch, cfg.data.batch_size)
    if steps < per_epoch:
        log.warning("refit: the workers have %d steps each left after the trials (%d x %d worker-steps, the "
                    "busiest trained %.0f), less than one epoch of trial %s (%d); no refit", steps, workers,
                    used.per_worker, max(used.lanes), trial_id, per_epoch)
        return None
    optim = cfg.optim.model_copy(update={"lr": worker_lr(cfg.optim.lr, workers)})
    data = cfg.data.model_copy(update={"patches_per_epoch": cfg.data.patches_per_epoch * workers})
    scaled = with_steps(cfg.model_copy(update={"optim": optim, "data": data, "max_minutes": None}), steps, workers,
                        rounding="at_most")  # no worker passes C
    history = _history(model_dir)
    return RefitPlan(trial_id, scaled, 0.0, len(history), 0.0, 0.0, float(best.metrics[spec.metric]), start_from,
                     spec.resources.cpus_per_trial, workers, steps)


def refit_on_workers(spec: SearchSpec, target: MlflowTarget, plan: RefitPlan, run_id: str,
                     storage: str) -> dict[str, Any]:
    """Train ``plan`` on its workers (Ray Train, :func:`search.ddp.fit_workers`; rank 0 logs every epoch
    on the refit run); log the model there only when it beats the best trial."""
    from search.ddp import WorkerResources, fit_workers
    from search.train_workers import WorkersJob, copy_model, train_worker
    from segcore.mlflow_model import log_model_dir

    start = time.perf_counter()
    cfg = plan.config
    if plan.start_from:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_weights": plan.start_from})})
    val = str(spec.data.val) if spec.data.val else None
    job = WorkersJob(cfg, str(spec.data.train), val, target.uri, run_id)
    res = WorkerResources(plan.workers, plan.cpus, 1.0 if spec.resources.gpus_per_trial else 0.0)
    result = fit_workers(train_worker, job, res, name=f"refit-{plan.trial_id}", storage=storage,
                         max_failures=spec.failure.max_failures)
    score, uri = float(result.metrics[spec.metric]), None
    if beats(score, plan.best_score, spec.mode):
        import mlflow
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with tempfile.TemporaryDirectory(prefix="gigaseg-refit-") as tmp, _use_tracking_uri(target.uri), \
                mlflow.start_run(run_id=run_id):
            uri = log_model_dir(copy_model(result, f"refit-{plan.trial_id}", Path(tmp) / "model"), name="model").model_uri
    return {"score": score, "epochs": int(result.metrics["epoch"]) + 1, "seconds": time.perf_counter() - start,
            "model_uri": uri, "steps": float(result.metrics["steps"]) * plan.workers}


def run_worker_refit(spec: SearchSpec, target: MlflowTarget, top: tuple[Any, str], used: Any) -> list[RefitOutcome]:
    """The best trial (``(result, model URI)``) refitted on all of a cluster's workers in the worker-steps
    left; its worker-steps go on the parent run beside the trials'."""

    best, uri = top
    plan = plan_worker_refit(spec, best, local_dir(uri, target.uri), used,
                             uri if spec.refit.warm_start else None)
    if plan is None:
        return []
    run_id = open_refit_run(target, plan)
    log.info("refit: trial %s's configuration on %d workers x %d steps (%d worker-steps; lr %.3g, global batch %d) "
             "from %s, MLflow run %s", plan.trial_id, plan.workers, plan.steps_per_worker,
             plan.workers * plan.steps_per_worker, plan.config.optim.lr, plan.workers * plan.config.data.batch_size,
             "its weights" if plan.start_from else "scratch", run_id)
    storage = str(spec.folder / "_train")
    out = _judge(spec, target, plan, run_id, lambda: refit_on_workers(spec, target, plan, run_id, storage),
                 on_parent=True)
    if out is not None:
        now = int(time.time() * 1000)
        target.client().log_batch(target.parent_run_id, metrics=[
            Metric("worker_steps_refit", out.worker_steps, now, 0),
            Metric("worker_steps_used", used.trials + out.worker_steps, now, 0)])
    return [out] if out is not None else []


def refit_candidates(spec: SearchSpec, target: MlflowTarget, results: Any, ranked: list[Any],
                     used: Any = None) -> list[Any]:
    """Refit the best ``refit.top_k`` of ``ranked`` (completed trials, best first) when
    ``refit.budget_fraction`` > 0; the kept refits as champion :class:`search.champion.Candidate`
    (trial id ``refit-<trial id>``)."""
    from search.champion import Candidate

    if spec.refit.budget_fraction <= 0:
        return []
    uris = {r.metrics["trial_id"]: trial_model_uri(target, r.metrics["trial_id"]) for r in ranked[: spec.refit.top_k]}
    missing = [trial_id for trial_id, uri in uris.items() if not uri]
    if missing:
        log.warning("refit: trial(s) %s have no logged model to read the configuration from; not refitted",
                    ", ".join(missing))
    top = [(r, uris[r.metrics["trial_id"]]) for r in ranked if uris.get(r.metrics["trial_id"])]
    if used is not None:  # a cluster: the best trial on all its workers, in the worker-steps left
        outs = run_worker_refit(spec, target, top[0], used) if top else []
    else:
        outs = run_refits(spec, target, results, top, best_id=ranked[0].metrics["trial_id"])
    return [Candidate(f"{REFIT}-{o.trial_id}", local_dir(o.model_uri, target.uri))
            for o in outs if o.kept and o.model_uri is not None]
