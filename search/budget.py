"""Per-trial budgets in epochs, optimizer steps or minutes, and ASHA's clock in the same unit.

* ``epochs`` (no ``budget:``): the TrainConfig's ``epochs``; ASHA counts ``training_iteration``.
* ``budget: {steps: N}``: :func:`apply_budget` sets ``epochs`` and ``data.patches_per_epoch`` so a
  trial makes at least N and fewer than N + epochs optimizer steps (:func:`segcore.steps.fit_steps`); ASHA
  counts the reported ``steps``, so trials with different batch sizes meet at equal steps.
* ``budget: {minutes: M}``: ``max_minutes = M`` (``segcore.train`` stops at the first epoch end
  after M minutes of training wall time); ASHA counts the reported ``train_minutes``.

``asha.grace_period`` and ``asha.max_t`` are written in epochs and converted with the base
configuration's epoch length in that unit (:func:`asha_clock`). Without a ``grace_period`` a
one-cycle base is first judged when its warm-up ends (30 % of ``max_t``): before that every trial
still predicts the majority class, and halving on that is a coin toss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from search.spec import Budget, MinutesBudget, SearchSpec, StepsBudget
from segcore.config import ConfigError, TrainConfig
from segcore.schedules import PCT_START
from segcore.steps import fit_steps, steps_per_epoch, with_steps

log = logging.getLogger(__name__)

TIME_ATTR = {"epochs": "training_iteration", "steps": "steps", "minutes": "train_minutes"}


def apply_budget(cfg: TrainConfig, budget: Budget | None, world_size: int = 1) -> TrainConfig:
    """The trial's TrainConfig under ``budget`` (unchanged without one)."""
    if isinstance(budget, StepsBudget):
        return with_steps(cfg, budget.steps, world_size)
    if isinstance(budget, MinutesBudget):
        return cfg.model_copy(update={"max_minutes": budget.minutes})
    return cfg


def plan_steps(plan: Any, minutes: float) -> int:
    """The optimizer steps ``plan`` makes in ``minutes`` on one worker, by its own step timing (the
    epochs x steps per epoch that ``gigaseg train --budget-min`` would plan for those minutes)."""
    from segcore.plan import decide_steps

    chosen, _ = decide_steps(plan.fingerprint, plan.config, plan.speed, minutes)
    return chosen["epochs"] * max(1, chosen["patches_per_epoch"] // plan.config.data.batch_size)


def resolve_plan_steps(spec: SearchSpec, plan: Any) -> SearchSpec:
    """``steps: plan`` (budget, cluster) replaced by the plan's steps; then, with a cluster, the trial
    budget checked against a worker's trial share (or set to it when not written)."""
    budget, cluster = spec.budget, spec.cluster
    wants_plan = [k for k, v in (("budget.steps", getattr(budget, "steps", None)),
                                 ("cluster.steps_per_worker", getattr(cluster, "steps_per_worker", None)))
                  if v == "plan"]
    if wants_plan and plan is None:
        raise ConfigError(f"{spec.name}: {' and '.join(wants_plan)}: plan needs the plan (plan.enabled: true); "
                          "write a number of steps instead")
    update: dict[str, Any] = {}
    if isinstance(budget, StepsBudget) and budget.steps == "plan":
        update["budget"] = StepsBudget(steps=plan_steps(plan, budget.minutes))
        log.info("budget: steps plan = %d optimizer steps per trial (the plan's in %g min on one worker)",
                 update["budget"].steps, budget.minutes)
    if cluster is not None and cluster.steps_per_worker == "plan":
        update["cluster"] = cluster.model_copy(update={"steps_per_worker": plan_steps(plan, cluster.minutes),
                                                       "minutes": None})
        log.info("cluster: steps_per_worker plan = %d optimizer steps (the plan's in %g min on one worker)",
                 update["cluster"].steps_per_worker, cluster.minutes)
    spec = spec.model_copy(update=update)
    return _fit_trials_to_workers(spec) if spec.cluster is not None else spec


def trial_share(spec: SearchSpec) -> int:
    """Steps of each worker that trials may use: C less the refit's share (``refit.budget_fraction``)."""
    per_worker = int(spec.cluster.steps_per_worker) if spec.cluster else 0  # resolved: a number by now
    return max(1, int(per_worker * (1.0 - spec.refit.budget_fraction)))


def _fit_trials_to_workers(spec: SearchSpec) -> SearchSpec:
    """A cluster's trial budget: the written one if a worker's trial share holds it, else refused; when
    none is written, the whole share (one trial per worker, e.g. a PBT population of N)."""
    share = trial_share(spec)
    if spec.budget is None:
        log.info("cluster: no trial budget written; each trial gets a worker's trial share, %d steps", share)
        return spec.model_copy(update={"budget": StepsBudget(steps=share)})
    if spec.budget.steps > share:
        raise ConfigError(f"{spec.name}: budget.steps {spec.budget.steps} exceeds a worker's share for trials, "
                          f"{share} (cluster.steps_per_worker {spec.cluster.steps_per_worker} less "
                          f"refit.budget_fraction {spec.refit.budget_fraction:g}); lower budget.steps or raise "
                          "cluster.steps_per_worker")
    return spec


@dataclass(frozen=True)
class AshaClock:
    """ASHA's ``time_attr`` and its ``grace_period`` / ``max_t`` in that unit, and how they were made."""

    time_attr: str
    grace_period: float
    max_t: float
    why: str


def asha_clock(spec: SearchSpec, base: TrainConfig, max_epochs: int) -> AshaClock:
    """ASHA's clock for ``spec.budget``; ``base`` is the base configuration (plan merged in).

    One epoch is converted with the base configuration: under a steps budget its steps per epoch
    after :func:`fit_steps`; under a minutes budget M / base epochs (the plan fits the base's
    epochs to the budget's minutes). ``max_t`` defaults to the whole budget.
    """
    asha, budget = spec.asha, spec.budget
    if budget is None:
        max_t = asha.max_t or max_epochs
        grace, why = _grace(asha.grace_period, base, 1.0, max_t)
        return AshaClock(TIME_ATTR["epochs"], math.ceil(grace), max_t, "epochs" + why)
    if isinstance(budget, StepsBudget):
        world = spec.resources.workers_per_trial
        epochs, ppe = fit_steps(budget.steps, base.data.patches_per_epoch, base.data.batch_size, world)
        per_epoch: float = steps_per_epoch(ppe, base.data.batch_size, world)
        total: float = budget.steps
        why = f"1 epoch = {per_epoch:g} steps of the base config ({epochs} epochs for {budget.steps} steps)"
    else:
        per_epoch, total = budget.minutes / base.epochs, budget.minutes
        why = f"1 epoch = {per_epoch:.3g} min ({budget.minutes:g} min over the base's {base.epochs} epochs)"
    max_t = min(asha.max_t * per_epoch, total) if asha.max_t else total
    grace, grace_why = _grace(asha.grace_period, base, per_epoch, max_t)
    return AshaClock(TIME_ATTR[budget.unit], grace, max_t, why + grace_why)


def _grace(grace_epochs: int | None, base: TrainConfig, per_epoch: float, max_t: float) -> tuple[float, str]:
    """ASHA's first rung in the clock's unit: the configured epochs, else the end of a one-cycle
    warm-up (at least one epoch), else one epoch."""
    if grace_epochs is not None:
        return grace_epochs * per_epoch, ""
    if base.optim.schedule == "one_cycle":
        return max(per_epoch, PCT_START * max_t), f"; grace = the one-cycle warm-up, {PCT_START:.0%} of max_t"
    return per_epoch, "; grace = 1 epoch"
