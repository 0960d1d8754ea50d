"""``engine: pbt``: population-based training (Ray Tune's PBT, synchronous) over the range dimensions.

The population is trial 0 (the plan), then ``seed_configs``, then draws from the space; its
members differ in every dimension, and PBT mutates the range ones (lr, loss weights, augmentation
strength) as they train. At every perturbation (``pbt.perturbation_interval`` of a trial's steps,
after ``pbt.burn_in``) the worst ``quantile_fraction`` of the members copy a best member's weights
and configuration (exploit) and perturb the ranges x 0.8 / 1.2 or resample them (explore), clamped
into the space. Every member trains its whole budget, so every worker ends with a trained model
(ensemble candidates for the champion).

A clone continues from the donor's checkpoint through the ordinary resume path
(``segcore.train`` rescales the lr schedule to the new lr); its MLflow run stays one run, and each
exploit is a tag on it (``pbt.exploit.<n>``), with the member's current params in ``pbt.params``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from search.budget import apply_budget
from search.mlflow_runs import MlflowTarget, find_trial_run
from search.report import IS_LAST
from search.space import Dimension, SearchSpace, draw_random
from search.spec import SearchSpec
from segcore.config import ConfigError
from segcore.steps import steps_per_epoch

log = logging.getLogger(__name__)

RANGE_KINDS = ("uniform", "loguniform")


def population(spec: SearchSpec, space: SearchSpace) -> list[dict[str, Any]]:
    """The starting members: trial 0 and ``seed_configs`` (in order, unset dimensions drawn), then
    draws from the space, all seeded by ``spec.seed``."""
    rng = random.Random(spec.seed)

    def member(seed: dict[str, Any]) -> dict[str, Any]:
        def draw(dim: Dimension, act: Any) -> Any:  # among the active choices (encoders valid for the arch)
            return seed[dim.key] if dim.key in seed else draw_random(replace(dim, values=act.choices), rng)

        return space.sample(draw)

    seeds = [dict(s) for s in spec.seed_configs[: spec.population]]
    return [member(s) for s in seeds] + [member({}) for _ in range(spec.population - len(seeds))]


def mutated_dims(space: SearchSpace, members: list[dict[str, Any]]) -> list[Dimension]:
    """The range dimensions every member holds (a conditional one, e.g. focal_gamma, may be absent)."""
    return [d for d in space.dims if d.kind in RANGE_KINDS and not d.fixed and all(d.key in m for m in members)]


def _domain(dim: Dimension) -> Any:
    lo, hi = dim.values
    return tune.loguniform(lo, hi) if dim.kind == "loguniform" else tune.uniform(lo, hi)


class ClampToSpace:
    """PBT's custom explore: perturbed values are put back into their ranges (x 1.2 may leave them)."""

    def __init__(self, bounds: dict[str, tuple[float, float]]) -> None:
        self.bounds = bounds

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        params = dict(config["params"])
        for key, (lo, hi) in self.bounds.items():
            if key in params:
                params[key] = min(max(float(params[key]), lo), hi)
        return {**config, "params": params}


class LoggedPBT(PopulationBasedTraining):
    """Tune's PBT that writes each exploit onto the cloned trial's MLflow run (from the driver)."""

    def __init__(self, target: MlflowTarget, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.exploits: dict[str, int] = {}

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """No perturbation on a member's final epoch: a clone then would replace the trained model with
        the donor's (and report the donor's result as its own)."""
        if result.get(IS_LAST):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        """Tune's choice, unless every waiting member is already past the next sync point and none runs
        (an epoch longer than the interval): then the next point moves one interval past them."""
        trial = super().choose_trial_to_run(tune_controller)
        trials = tune_controller.get_trials()
        waiting = [t for t in trials if t.status in (Trial.PENDING, Trial.PAUSED)]
        if trial is None and waiting and not any(t.status == Trial.RUNNING for t in trials):
            last = max(self._trial_state[t].last_train_time for t in waiting)
            self._next_perturbation_sync = last + self._perturbation_interval
            trial = super().choose_trial_to_run(tune_controller)
        return trial

    def _exploit(self, tune_controller: Any, trial: Any, trial_to_clone: Any) -> None:
        own, donor = self._trial_state[trial], self._trial_state[trial_to_clone]
        before = dict(trial.config.get("params", {}))
        super()._exploit(tune_controller, trial, trial_to_clone)
        after = trial.config.get("params", {})
        n = self.exploits[trial.trial_id] = self.exploits.get(trial.trial_id, 0) + 1
        changed = ", ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in after.items() if before.get(k) != v)
        text = (f"at {self._time_attr} {own.last_train_time:g}: cloned trial {trial_to_clone.trial_id} "
                f"({self._metric} {self._metric_op * donor.last_score:.4f} vs {self._metric_op * own.last_score:.4f}); "
                f"{changed or 'no change'}")
        try:
            run_id = find_trial_run(self.target, trial.trial_id)
            if run_id is not None:
                client = self.target.client()
                client.set_tag(run_id, f"pbt.exploit.{n}", text[:5000])
                client.set_tag(run_id, "pbt.params", json.dumps(after, sort_keys=True, default=str)[:5000])
        except Exception as exc:  # tracking trouble must not stop the search
            log.warning("pbt: could not tag trial %s's exploit in MLflow: %s", trial.trial_id, exc, exc_info=True)
        log.info("pbt: trial %s %s", trial.trial_id, text)


def whole_epochs(spec: SearchSpec, space: SearchSpace, member: dict[str, Any]) -> tuple[float, float]:
    """``pbt.perturbation_interval`` and ``pbt.burn_in`` in steps, rounded to whole epochs (at least one
    epoch between perturbations): members report at epoch ends, and synchronous PBT waits at every
    perturbation point for all of them, so a point inside an epoch would be passed by all at once."""
    cfg = apply_budget(space.to_train_config(member, source="pbt member"), spec.budget)
    per_epoch = steps_per_epoch(cfg.data.patches_per_epoch, cfg.data.batch_size)
    steps = float(spec.budget.steps)  # a steps budget: checked by SearchSpec, resolved by search.lanes
    interval = max(1, round(spec.pbt.perturbation_interval * steps / per_epoch)) * per_epoch
    return float(interval), float(round(spec.pbt.burn_in * steps / per_epoch) * per_epoch)


def build_pbt(spec: SearchSpec, space: SearchSpace, target: MlflowTarget) -> tuple[LoggedPBT, dict[str, Any]]:
    """The PBT scheduler and the Tuner param space (the population as one grid of ``spec.population``)."""
    members = population(spec, space)
    dims = mutated_dims(space, members)
    if not dims:
        raise ConfigError(f"{spec.name}: engine pbt needs a range dimension to perturb (e.g. lr: {{loguniform: "
                          "[3.0e-4, 3.0e-3]}); the space has none")
    interval, burn_in = whole_epochs(spec, space, members[0])
    scheduler = LoggedPBT(
        target, time_attr="steps", perturbation_interval=interval,
        burn_in_period=burn_in, quantile_fraction=spec.pbt.quantile_fraction,
        resample_probability=spec.pbt.resample_probability, synch=True,
        hyperparam_mutations={"params": {d.key: _domain(d) for d in dims}},
        custom_explore_fn=ClampToSpace({d.key: tuple(map(float, d.values)) for d in dims}),
    )
    log.info("pbt: %d members (trial 0 = the plan), perturbing %s every %.0f steps after %.0f", len(members),
             ", ".join(d.key for d in dims), interval, burn_in)
    return scheduler, {"params": tune.grid_search(members)}
