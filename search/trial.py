"""The Tune trial function: one sampled configuration -> ``segcore.train.train`` -> reports.

Single-worker trials train inside the trial actor; ``workers_per_trial > 1`` runs
:func:`run_epochs` on every worker of a TorchTrainer (:func:`run_ddp_trial`, through the launcher
:func:`search.ddp.fit_workers`). Either way every epoch is relayed by a
:class:`search.relay.EpochRelay`: logged to the trial's MLflow run (rank 0), checkpointed, and reported
(``tune.report`` or ``ray.train.report``), with segcore.train's cumulative ``steps`` (optimizer
steps) and ``train_minutes``, the clocks of step and minute budgets (:mod:`search.budget`). The
final epoch's report is held back until the model, preview and confusion matrix are logged,
because Tune may stop the trial actor as soon as it sees a result (ASHA at ``max_t``), and
nothing after the last report is guaranteed to run.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.ddp import WorkerResources, WorkerSlot, fit_workers
from search.ddp import report as train_report
from search.hooks import FailOnce, barrier_arrive, barrier_done
from search.mlflow_runs import COMPLETED, MlflowTarget, TrialRun
from search.quiet_exit import guard_current_thread
from search.relay import EpochRelay, ReportFn
from search.space import SearchSpace
from search.spec import Budget, ResourcesSection, TestingSection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled params; passed explicitly to every trial."""

    space: SearchSpace
    train_dir: str
    val_dir: str | None
    mlflow: MlflowTarget
    resources: ResourcesSection
    train_storage: str  # Ray Train run storage for multi-worker trials (shared on a cluster)
    ledger_name: str
    testing: TestingSection | None = None
    budget: Budget | None = None  # per trial: steps or minutes (None: the config's epochs)


def run_epochs(ctx: TrialContext, params: dict[str, Any], report: ReportFn, *, trial_id: str, trial_name: str,
               rank: int, resume: Any, trial_dir: Path | None, out_dir: Path, extra: dict[str, float]) -> EpochRelay:
    """Train one configuration (one rank of it); rank 0 logs the finished model.

    Returns the relay still holding the final report: the caller sends it with ``flush()`` as
    its very last action.
    """
    from search.budget import apply_budget
    from segcore.train import train

    cfg = ctx.space.to_train_config(params, source=f"trial {trial_id}")
    cfg = apply_budget(cfg, ctx.budget, ctx.resources.workers_per_trial)
    if "measure_halo" not in cfg.data.model_fields_set:  # measured once, on the champion (search/champion.py)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"measure_halo": False})})
    run = TrialRun(ctx.mlflow, trial_id, trial_name) if rank == 0 else None
    if run is not None:
        run.log_params(params, cfg.model_dump(mode="json"))
    relay = EpochRelay(report, run, FailOnce(ctx.testing, trial_dir), extra)
    with resume.as_directory() if resume is not None else nullcontext(None) as resume_dir:
        result = train(cfg, ctx.train_dir, out_dir, callbacks=[relay], resume_from=resume_dir, val_dir=ctx.val_dir)
    if run is not None and run.status != COMPLETED:  # a resumed, already logged trial: don't log twice
        run.log_completed(Path(result.model_dir))
    return relay


def _ddp_body(slot: WorkerSlot, payload: dict[str, Any]) -> None:
    """One worker of a multi-worker trial (:func:`search.ddp.fit_workers` calls it); rank 0 logs the model."""
    relay = run_epochs(payload["ctx"], payload["params"], train_report, trial_id=payload["trial_id"],
                       trial_name=payload["trial_name"], rank=slot.rank, resume=slot.resume, trial_dir=None,
                       out_dir=slot.out_dir, extra=payload["extra"])
    relay.flush()


def run_ddp_trial(ctx: TrialContext, params: dict[str, Any], trial_id: str, trial_name: str,
                  extra: dict[str, float]) -> None:
    """Fit ``workers_per_trial`` Train workers for this trial's configuration. Restarting a trial restores
    its Train run from its checkpoints, because its (storage, name) is stable:
    ``<storage>/<search>/_train/train-<trial_id>``; Tune, not Train, retries a failed trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from search.pg_guard import LedgerCallback

    res = ctx.resources
    payload = {"ctx": ctx, "params": params, "trial_id": trial_id, "trial_name": trial_name, "extra": extra}
    fit_workers(_ddp_body, payload, WorkerResources(res.workers_per_trial, res.cpus_per_trial, res.gpus_per_trial),
                name=f"train-{trial_id}", storage=ctx.train_storage, max_failures=0,
                callbacks=[TuneReportCallback(), LedgerCallback(ctx.ledger_name)])


def _tune_report(metrics: dict[str, Any], checkpoint: Any) -> None:
    from ray import tune

    tune.report(metrics, checkpoint=checkpoint)


def trial_main(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable (bound to ``ctx`` with ``tune.with_parameters``)."""
    from ray import tune

    guard_current_thread()  # a stop while this thread is in torch/Ray code must not abort the actor
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    params = config["params"]
    live = barrier_arrive(ctx.testing, trial_id)
    extra = {"barrier_live": float(live)} if live is not None else {}
    try:
        if ctx.resources.workers_per_trial > 1:
            run_ddp_trial(ctx, params, trial_id, trial_name, extra)
        else:
            trial_dir = Path(tctx.get_trial_dir())
            relay = run_epochs(ctx, params, _tune_report, trial_id=trial_id, trial_name=trial_name, rank=0,
                               resume=tune.get_checkpoint(), trial_dir=trial_dir, out_dir=trial_dir / "model",
                               extra=extra)
            barrier_done(ctx.testing, trial_id)
            relay.flush()
    finally:
        barrier_done(ctx.testing, trial_id)
