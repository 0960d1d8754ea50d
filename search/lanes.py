"""Worker-steps: a search sized for N workers of C optimizer steps each (``cluster:``, issue 23).

:func:`resolve_plan_steps` turns ``steps: plan`` (in ``budget:`` and ``cluster:``) into the plan's
steps and gives a cluster's trials their share of each worker (:func:`trial_share`).

A cluster of N workers runs N trials at a time; each worker trains one trial after another, at
most C optimizer steps in all. :class:`LaneSearcher` keeps that ledger while the search runs:
every worker is a *lane*; a trial starts on an idle lane only if the lane still holds the trial's
budget, and the search ends when no lane does. A trial that ASHA stops early frees its lane for
the next one. Counting steps rather than seconds makes the ledger the same on any hardware: on N
GPUs it is the wall time, on 2 CPUs the same search runs longer and reaches the same model.

After the trials, :func:`worker_steps` reads what each trial really trained from the ledger that
:class:`StepsLedger` keeps on the driver; :meth:`WorkerSteps.refit_steps` is what is left for a data-parallel refit on all N
workers (it starts when the busiest worker is free).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from search.budget import StepsBudget, plan_steps
from search.report import creation_order, epoch_steps
from search.spec import SearchSpec
from segcore.config import ConfigError

log = logging.getLogger(__name__)

LANES_FILE = "lanes.json"  # beside the inner searcher's checkpoint, so Tuner.restore keeps the ledger
STEPS_FILE = "worker_steps.json"  # in the experiment folder: steps each trial trained (StepsLedger)


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
        return spec.model_copy(update={"budget": StepsBudget(steps=share, rounding="at_most")})
    if spec.budget.rounding != "at_most" and "rounding" in spec.budget.model_fields_set:
        raise ConfigError(f"{spec.name}: budget.rounding {spec.budget.rounding} with a cluster: a cluster's trials "
                          "train at most their steps, so no worker passes cluster.steps_per_worker; leave it out")
    if spec.budget.steps > share:
        raise ConfigError(f"{spec.name}: budget.steps {spec.budget.steps} exceeds a worker's share for trials, "
                          f"{share} (cluster.steps_per_worker {spec.cluster.steps_per_worker} less "
                          f"refit.budget_fraction {spec.refit.budget_fraction:g}); lower budget.steps or raise "
                          "cluster.steps_per_worker")
    return spec.model_copy(update={"budget": spec.budget.model_copy(update={"rounding": "at_most"})})


@dataclass
class Lanes:
    """Steps used per worker and which trial runs on which worker."""

    capacity: int
    used: list[float]
    running: dict[str, int] = field(default_factory=dict)  # trial id -> lane
    trained: dict[str, float] = field(default_factory=dict)  # trial id -> steps so far

    def idle_with_room(self, need: int) -> int | None:
        """The idle lane with the most room, if it holds ``need`` more steps."""
        idle = [i for i in range(len(self.used)) if i not in self.running.values()]
        best = min(idle, key=lambda i: self.used[i], default=None)
        return best if best is not None and self.used[best] + need <= self.capacity else None

    def finish(self, trial_id: str) -> None:
        lane = self.running.pop(trial_id, None)
        if lane is not None:
            self.used[lane] += self.trained.get(trial_id, 0.0)


class LaneSearcher(Searcher):
    """Wraps a searcher: a trial starts only on an idle worker that still holds its ``trial_steps``.

    Returns None (wait) while a running trial may still free a lane with room, and
    ``Searcher.FINISHED`` once no lane can take another trial."""

    def __init__(self, searcher: Searcher, workers: int, capacity: int, trial_steps: int) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher, self.trial_steps = searcher, trial_steps
        self.lanes = Lanes(capacity, [0.0] * workers)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | str | None:
        lane = self.lanes.idle_with_room(self.trial_steps)
        if lane is None:
            if self.lanes.running:
                return None  # a running trial may end early (ASHA) and leave room
            log.info("worker-steps: no worker holds another trial of %d steps (used %s of %d each); "
                     "no more trials", self.trial_steps, [round(u) for u in self.lanes.used], self.lanes.capacity)
            return Searcher.FINISHED
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.lanes.running[trial_id] = lane
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.lanes.trained[trial_id] = self.lanes.trained.get(trial_id, 0.0) + epoch_steps(result)
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.lanes.finish(trial_id)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)
        state = {"capacity": self.lanes.capacity, "used": self.lanes.used, "trained": self.lanes.trained}
        Path(checkpoint_path).with_name(LANES_FILE).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
        path = Path(checkpoint_path).with_name(LANES_FILE)
        if path.is_file():  # trials that were running when the driver died are run again from checkpoints
            state = json.loads(path.read_text())
            self.lanes = Lanes(state["capacity"], state["used"], trained=state["trained"])


@dataclass(frozen=True)
class WorkerSteps:
    """What a finished search's trials trained, per trial and per worker, against N x C."""

    per_trial: dict[str, float]  # in creation order
    workers: int
    per_worker: int

    @property
    def trials(self) -> float:
        return sum(self.per_trial.values())

    @property
    def budget(self) -> int:
        return self.workers * self.per_worker

    @property
    def lanes(self) -> list[float]:
        """Each worker's steps, trials placed in creation order on the worker that frees first (in
        steps), as :class:`LaneSearcher` placed them and as a cluster of equal workers would."""
        lanes = [0.0] * self.workers
        for steps in self.per_trial.values():
            i = min(range(self.workers), key=lanes.__getitem__)
            lanes[i] += steps
        return lanes

    def refit_steps(self) -> int:
        """Steps per worker left for a refit on all N workers: it starts when the busiest worker is
        free, so no worker trains more than C."""
        return max(0, int(self.per_worker - max(self.lanes, default=0.0)))


class StepsLedger(tune.Callback):
    """Driver side: the optimizer steps each trial trained, summed over every result Tune received and
    kept in ``<experiment>/worker_steps.json`` (so a resumed search goes on counting).

    Tune's own result files are no ledger: a trial that restarts (a PBT exploit, a restore) copies its
    ``result.json`` back from storage, which may lag behind, and the epochs since are lost."""

    def __init__(self, exp_dir: str | Path) -> None:
        self.path = Path(exp_dir) / STEPS_FILE
        self.steps: dict[str, float] | None = None  # loaded on the first result

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.steps is None:
            self.steps = read_steps_ledger(self.path.parent)
        self.steps[trial.trial_id] = self.steps.get(trial.trial_id, 0.0) + epoch_steps(result)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.steps))
        tmp.replace(self.path)


def read_steps_ledger(exp_dir: str | Path) -> dict[str, float]:
    """Trial id -> steps trained, as :class:`StepsLedger` wrote them (empty before the first result)."""
    path = Path(exp_dir) / STEPS_FILE
    return {k: float(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def worker_steps(exp_dir: str | Path, workers: int, per_worker: int) -> WorkerSteps:
    """Steps each trial trained (a PBT clone's included), from the driver's :class:`StepsLedger`."""
    per_trial = read_steps_ledger(exp_dir)
    ordered = dict(sorted(per_trial.items(), key=lambda kv: creation_order(kv[0])))
    return WorkerSteps(ordered, workers, per_worker)
