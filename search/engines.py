"""Search algorithms, the ASHA scheduler (its clock in the trial budget's unit) and the
trial-epoch budget for one search.

* ``tpe``: Optuna TPE (multivariate, grouped for the conditional space) via Ray Tune's
  OptunaSearch with a define-by-run space; seed configurations are enqueued first.
* ``random``: the same define-by-run space with Optuna's RandomSampler.
* ``grid``: every combination of the choice dimensions (``SearchSpace.grid``) as one
  ``tune.grid_search``; ranges drawn once per grid point from ``seed``.

Ray 2.60's OptunaSearch tells Optuna COMPLETE with the last value for a trial that ASHA stopped
early; :class:`PruningAwareOptunaSearch` tells such trials as PRUNED instead (see docs/search.md).
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from search.dimensions import Dimension
from search.mlflow_runs import MlflowTarget
from search.planned import trial0_of
from search.report import IS_LAST
from search.space import Active, SearchSpace
from search.spec import SearchSpec
from search.validate import seed_to_optuna

log = logging.getLogger(__name__)



class DefineByRun:
    """Optuna define-by-run space (picklable, so Tuner.restore brings it back)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        def draw(dim: Dimension, act: Active) -> Any:
            if dim.kind == "choice":
                return _suggest_choice(trial, act.name, act.choices)
            lo, hi = dim.values
            if dim.kind == "int":
                return trial.suggest_int(act.name, lo, hi)
            return trial.suggest_float(act.name, lo, hi, log=dim.kind == "loguniform")

        return {"params": self.space.sample(draw)}


def _suggest_choice(trial: Any, name: str, choices: tuple[Any, ...]) -> Any:
    """Optuna takes only None/bool/int/float/str choices; others (dicts, lists) go by JSON label."""
    if all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
        return trial.suggest_categorical(name, list(choices))
    labels = {json.dumps(c, sort_keys=True): c for c in choices}
    return labels[trial.suggest_categorical(name, list(labels))]


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED (not COMPLETE) for trials stopped before their last epoch.

    A trial is complete only if its last result carries ``is_last``; one stopped by ASHA (or by
    the time/epoch budget) is reported with its final value as an intermediate value and state
    PRUNED, which is how Optuna's own pruners record it, so TPE ranks it below finished trials.
    """

    def _suggest_from_define_by_run_func(self, func: Any, ot_trial: Any) -> dict:
        """The trial config is what :class:`DefineByRun` returns (``{"params": {...}}``) only.

        Ray merges Optuna's raw parameters (``lr``, ``encoder__Unet``, JSON labels of dict
        choices) into the config too, so every parameter appeared twice in Tune's output
        (``lr`` and ``params/lr``); Optuna still holds them in its own trial.
        """
        config = super()._suggest_from_define_by_run_func(func, ot_trial)
        return {"params": config["params"]} if "params" in config else config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not result or result.get(IS_LAST) or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        from optuna.trial import TrialState

        ot_trial = self._ot_trials[trial_id]
        value, step = result.get(self.metric), result.get("training_iteration")
        if value is not None and step is not None:  # the stopping result never reached on_trial_result
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna warns if this step was already reported
                ot_trial.report(float(value), int(step))
        try:
            self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
        except Exception as exc:  # e.g. the study already knows the trial
            log.warning("optuna: could not tell trial %s as pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


def build_searcher(spec: SearchSpec, space: SearchSpace) -> tuple[Searcher, dict[str, Any]]:
    """The search algorithm and Tuner param_space for ``spec.engine``."""
    import optuna

    if spec.engine == "grid":
        points = space.grid(seed=spec.seed)
        log.info("grid search over %d configurations", len(points))
        return BasicVariantGenerator(random_state=spec.seed), {"params": tune.grid_search(points)}
    if spec.engine == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    else:
        sampler = optuna.samplers.TPESampler(
            seed=spec.seed, n_startup_trials=spec.tpe_startup_trials, multivariate=True, group=True,
            constant_liar=True,
        )
    seeds = [seed_to_optuna(space, s) for s in spec.seed_configs]
    searcher = PruningAwareOptunaSearch(
        space=DefineByRun(space), metric=spec.metric, mode=spec.mode, sampler=sampler,
        points_to_evaluate=seeds or None, study_name=spec.name,
    )
    return searcher, {}


def build_scheduler(spec: SearchSpec, space: SearchSpace) -> TrialScheduler:
    """ASHA on the metric in the budget's unit (``training_iteration`` for epochs, ``steps`` or
    ``train_minutes``; see :func:`search.budget.asha_clock`), or FIFO when disabled."""
    from search.budget import asha_clock

    if not spec.asha.enabled:
        return FIFOScheduler()
    clock = asha_clock(spec, space.to_train_config({}, source="base"), space.max_epochs())
    log.info("ASHA on %s: grace_period %.4g, max_t %.4g (%s)", clock.time_attr, clock.grace_period, clock.max_t,
             clock.why)
    plan_point = trial0_of(spec)
    if spec.asha.keep_plan and plan_point:
        log.info("ASHA never stops trial 0 (the plan): asha.keep_plan")
    return PlanKeepingASHA(
        plan_point if spec.asha.keep_plan else None,
        time_attr=clock.time_attr,
        max_t=clock.max_t,
        grace_period=clock.grace_period,
        reduction_factor=spec.asha.reduction_factor,
    )


class PlanKeepingASHA(ASHAScheduler):
    """ASHA that lets the trial whose params are ``plan_point`` (trial 0, the plan) run to its end.

    The search must beat the plan; judged on its first epochs (the warm-up, a noisy validation) the
    plan is often stopped for a trial that looked better early and ends worse.
    """

    def __init__(self, plan_point: dict[str, Any] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan_point = dict(plan_point or {})

    def is_plan(self, trial: Any) -> bool:
        params = (trial.config or {}).get("params", {})
        return bool(self.plan_point) and all(params.get(k) == v for k, v in self.plan_point.items())

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and self.is_plan(trial) and result.get(self._time_attr, 0) < self._max_t:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return decision


def num_trials(spec: SearchSpec, space: SearchSpace) -> int:
    """Tuner num_samples: the grid (and PBT's population, one grid) once; tpe/random run ``num_samples``
    trials, or with a cluster as many as its worker-steps hold (``num_samples``, if written, caps them)."""
    if spec.engine in ("grid", "pbt"):
        return 1
    if spec.num_samples is None:
        return UNBOUNDED_TRIALS if spec.cluster is not None else DEFAULT_TRIALS
    return spec.num_samples


DEFAULT_TRIALS = 8
UNBOUNDED_TRIALS = 100_000  # the worker-steps end a cluster's search (search.lanes.LaneSearcher)


def build_engine(spec: SearchSpec, space: SearchSpace,
                 target: MlflowTarget) -> tuple[Searcher | BasicVariantGenerator, dict[str, Any], TrialScheduler]:
    """Search algorithm, Tuner param space and scheduler for ``spec.engine``; with a cluster, tpe and
    random trials start only on a worker that still holds their steps (:class:`search.lanes.LaneSearcher`)."""
    if spec.engine == "pbt":
        from search.pbt import build_pbt

        scheduler, param_space = build_pbt(spec, space, target)
        return BasicVariantGenerator(random_state=spec.seed), param_space, scheduler
    searcher, param_space = build_searcher(spec, space)
    if spec.cluster is not None and isinstance(searcher, Searcher):
        from search.lanes import LaneSearcher, trial_share

        searcher = LaneSearcher(searcher, spec.cluster.workers, trial_share(spec), int(spec.budget.steps))
        log.info("cluster: %d workers x %d steps; trials of %d steps on %d steps of each worker",
                 spec.cluster.workers, spec.cluster.steps_per_worker, spec.budget.steps, trial_share(spec))
    return searcher, param_space, build_scheduler(spec, space)


class EpochBudget(Stopper):
    """Stops the whole search once ``budget`` epochs (summed over trials) have been reported.

    Counts distinct (trial, iteration) pairs: Tune passes a trial's last result again when its
    function returns, and a restored trial may repeat an iteration.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.seen: set[tuple[str, int]] = set()

    def __call__(self, trial_id: str, result: dict) -> bool:
        if "training_iteration" in result:
            self.seen.add((trial_id, int(result["training_iteration"])))
        return False

    def stop_all(self) -> bool:
        return len(self.seen) >= self.budget
