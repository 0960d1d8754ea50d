"""Per-trial budgets in epochs, optimizer steps or minutes, and ASHA's clock in the same unit.

The ``budget:`` section's models (:class:`StepsBudget`, :class:`MinutesBudget`) live here, below
the search spec and its validation, which both import them.

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
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from segcore.config import Strict, TrainConfig
from segcore.schedules import PCT_START
from segcore.steps import Rounding, fit_steps, steps_per_epoch, with_steps

log = logging.getLogger(__name__)

TIME_ATTR = {"epochs": "training_iteration", "steps": "steps", "minutes": "train_minutes"}


PlanSteps = Annotated[int, Field(ge=1)] | Literal["plan"]


def check_plan_steps(steps: int | str, minutes: float | None, steps_key: str, minutes_key: str) -> None:
    """``steps: plan`` needs ``minutes`` (the plan's steps in that many minutes on one worker);
    a number of steps takes no minutes (write ``{minutes: M}`` for a wall-clock budget)."""
    if steps == "plan" and minutes is None:
        raise ValueError(f"{steps_key}: plan needs {minutes_key}: T (the optimizer steps the plan makes in T "
                         "minutes on one worker, timed before the first trial)")
    if steps != "plan" and minutes is not None:
        raise ValueError(f"{minutes_key} goes with {steps_key}: plan only; write a number of steps or "
                         f"{steps_key}: plan with {minutes_key}")


class StepsBudget(Strict):
    """Each trial trains for ``steps`` optimizer steps (search/budget.py sets epochs and patches per epoch);
    ``{steps: plan, minutes: T}``: the steps the plan makes in T minutes on one worker (its own timing)."""

    unit: Literal["steps"] = "steps"
    steps: PlanSteps = Field(description="optimizer steps per trial (per worker with DDP), or plan")
    minutes: float | None = Field(None, gt=0, description="with steps: plan, the minutes the plan's steps fill")
    rounding: Rounding = Field("at_least", description="whole epochs: at least the steps, or at most (a cluster's "
                               "trials, so no worker passes its steps_per_worker)")

    @model_validator(mode="after")
    def _check_plan(self) -> StepsBudget:
        check_plan_steps(self.steps, self.minutes, "steps", "minutes")
        return self


class MinutesBudget(Strict):
    """Each trial stops training at the first epoch end after ``minutes`` of wall time (``max_minutes``)."""

    unit: Literal["minutes"] = "minutes"
    minutes: float = Field(gt=0, description="training wall time per trial, epochs' validation included")


def _budget_kind(value: Any) -> str | None:
    """``{steps: N}`` -> steps, ``{minutes: M}`` -> minutes (a ``unit`` key, if written, decides)."""
    if isinstance(value, dict):
        if "unit" in value:
            return value["unit"]
        if "steps" in value:  # {steps: plan, minutes: T} is a steps budget
            return "steps"
        return "minutes" if "minutes" in value else None
    return getattr(value, "unit", None)


Budget = Annotated[
    Annotated[StepsBudget, Tag("steps")] | Annotated[MinutesBudget, Tag("minutes")],
    Discriminator(_budget_kind, custom_error_type="budget_kind",
                  custom_error_message="write {steps: N}, {steps: plan, minutes: T} or {minutes: M}"),
]


def apply_budget(cfg: TrainConfig, budget: Budget | None, world_size: int = 1) -> TrainConfig:
    """The trial's TrainConfig under ``budget`` (unchanged without one)."""
    if isinstance(budget, StepsBudget):
        return with_steps(cfg, budget.steps, world_size, budget.rounding)
    if isinstance(budget, MinutesBudget):
        return cfg.model_copy(update={"max_minutes": budget.minutes})
    return cfg


def plan_steps(plan: Any, minutes: float) -> int:
    """The optimizer steps ``plan`` makes in ``minutes`` on one worker, by its own step timing (the
    epochs x steps per epoch that ``gigaseg train --budget-min`` would plan for those minutes)."""
    from segcore.plan import decide_steps

    chosen, _ = decide_steps(plan.fingerprint, plan.config, plan.speed, minutes)
    return chosen["epochs"] * steps_per_epoch(chosen["patches_per_epoch"], plan.config.data.batch_size)


@dataclass(frozen=True)
class AshaClock:
    """ASHA's ``time_attr`` and its ``grace_period`` / ``max_t`` in that unit, and how they were made."""

    time_attr: str
    grace_period: float
    max_t: float
    why: str


def asha_clock(spec: Any, base: TrainConfig, max_epochs: int) -> AshaClock:
    """ASHA's clock for ``spec.budget``; ``spec`` is the :class:`search.spec.SearchSpec` (typed ``Any``:
    budgets sit below specs), ``base`` the base configuration (plan merged in).

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
        epochs, ppe = fit_steps(budget.steps, base.data.patches_per_epoch, base.data.batch_size, world,
                                budget.rounding)
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
