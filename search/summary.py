"""End of a search: trial statuses in MLflow, the summary on the parent run, the champion model."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Metric, RunTag
from ray import tune

from search.failfast import error_message, most_common_error
from search.mlflow_runs import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    MODEL_URI_TAG,
    ORPHANED,
    RUNNING,
    STOPPED,
    MlflowTarget,
    find_trial_run,
    mark_trial,
    trial_runs_tagged,
)
from search.report import IS_LAST, creation_order

log = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    """What a finished search produced (also logged on the parent run)."""

    name: str
    path: str
    parent_run_id: str
    counts: dict[str, int]
    best_trial_id: str | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    champion_uri: str | None = None
    failure: str | None = None  # why the search produced nothing usable (the CLI then exits 1)


class TrialStatusCallback(tune.Callback):
    """Driver side: tag each finished trial's run completed / stopped early / failed."""

    def __init__(self, target: MlflowTarget) -> None:
        self.target = target

    def _mark(self, trial: Any, status: str) -> None:
        try:
            mark_trial(self.target, trial.trial_id, status)
        except Exception as exc:  # tracking trouble must not stop the search
            log.warning("could not tag trial %s as %s in MLflow: %s", trial.trial_id, status, exc)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark(trial, COMPLETED if (trial.last_result or {}).get(IS_LAST) else STOPPED)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark(trial, FAILED)


def trial_status(result: Any) -> str:
    """completed / stopped early / failed for one ``ray.tune.Result``."""
    if result.error is not None:
        return FAILED
    return COMPLETED if (result.metrics or {}).get(IS_LAST) else STOPPED


def ranked_completed(results: Any, metric: str, mode: str) -> list[Any]:
    """The completed trials that reported ``metric``, best first."""
    done = [r for r in results if trial_status(r) == COMPLETED and r.metrics.get(metric) is not None]
    return sorted(done, key=lambda r: r.metrics[metric], reverse=mode == "max")


def close_orphans(target: MlflowTarget, known: set[str]) -> dict[str, int]:
    """Runs of trials Tune no longer knows (started after a killed driver's last experiment
    checkpoint, so Tune re-suggested their slot on resume): a half-run is tagged interrupted, one
    that finished before the kill orphaned (kept, but neither counted nor a champion candidate).
    Returns how many of each."""
    counts = {}
    for was, now in ((RUNNING, INTERRUPTED), (COMPLETED, ORPHANED)):
        orphans = [t for t in trial_runs_tagged(target, was) if t not in known]
        for trial_id in orphans:
            mark_trial(target, trial_id, now)
        if orphans:
            counts[now] = len(orphans)
    return counts


def register_champion(target: MlflowTarget, trial_id: str, name: str, alias: str) -> str | None:
    """Register the trial's logged model under ``name`` and point ``alias`` at the new version."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    client = target.client()
    run_id = find_trial_run(target, trial_id)
    model_uri = client.get_run(run_id).data.tags.get(MODEL_URI_TAG) if run_id else None
    if not model_uri:
        log.warning("best trial %s has no logged model; nothing registered", trial_id)
        return None
    with _use_tracking_uri(target.uri):
        version = mlflow.register_model(model_uri, name, tags={"gigaseg.trial_id": trial_id})
    client.set_registered_model_alias(name, alias, version.version)
    log.info("registered %s version %s as models:/%s@%s", model_uri, version.version, name, alias)
    return f"models:/{name}@{alias}"


def _refits(results: Any, spec: Any, target: MlflowTarget, ranked: list[Any], used: Any) -> list[Any]:
    """The kept refits of the best trials (search.refit) as champion candidates (with a cluster, in the
    worker-steps ``used`` left); a refit that breaks is logged and skipped, so the trials still yield a
    champion."""
    from search.refit import refit_candidates

    try:
        return refit_candidates(spec, target, results, ranked, used)
    except Exception as exc:
        log.warning("refit failed (%s: %s); the champion is chosen from the trials alone", type(exc).__name__, exc,
                    exc_info=True)
        return []


def _champion(ranked: list[Any], spec: Any, target: MlflowTarget, refits: list[Any]) -> str | None:
    """Ensemble / calibrate / TTA / gate the completed trials (``ranked``, best first) and the kept
    refits (search.champion); if that breaks, register the best trial as before, so a finished
    search still yields a champion."""
    from search.champion import finish_champion

    best_trial_id = ranked[0].metrics["trial_id"]
    try:
        return finish_champion(spec, target, [r.metrics["trial_id"] for r in ranked], extra=refits)
    except Exception as exc:  # the trials are done; don't lose them to a post-processing bug
        log.warning("champion selection failed (%s: %s); registering the best trial %s as is", type(exc).__name__,
                    exc, best_trial_id, exc_info=True)
        return register_champion(target, best_trial_id, spec.mlflow.registered_model_name, spec.mlflow.alias)


def failure_reason(results: Any, outcome: SearchOutcome, spec: Any, stopped_because: str | None) -> str | None:
    """None if the search produced what it was asked for (a completed best trial, and the champion
    when a registered model name is set); else why not, with the commonest trial error."""
    if stopped_because:
        return stopped_because
    if outcome.best_trial_id is None:
        errors = [m for r in results if r.error is not None and (m := error_message(r.error))]
        counts = ", ".join(f"{n} {s}" for s, n in outcome.counts.items() if n)
        why = f"no trial completed ({counts or 'no trials ran'})"
        common = most_common_error(errors)
        return f"{why}; trials failed with: {common}" if common else why
    if spec.mlflow.registered_model_name and outcome.champion_uri is None:
        return f"the best trial {outcome.best_trial_id} has no logged model, so no champion was registered"
    return None


def summarize(results: Any, spec: Any, target: MlflowTarget, path: str,
              stopped_because: str | None = None) -> SearchOutcome:
    """Counts by status, best completed trial and champion; all logged on the parent run.

    ``stopped_because``: why the search was stopped early (e.g. the same error in every trial).
    """
    counts = dict(Counter(trial_status(r) for r in results))
    counts = {s: counts.get(s, 0) for s in (COMPLETED, STOPPED, FAILED)}
    counts.update(close_orphans(target, {r.metrics.get("trial_id") for r in results}))
    outcome = SearchOutcome(spec.name, path, target.parent_run_id, counts)
    ranked = ranked_completed(results, spec.metric, spec.mode)
    used = log_worker_steps(path, spec, target)
    if ranked:
        best = ranked[0]
        outcome.best_trial_id = best.metrics["trial_id"]
        outcome.best_value = float(best.metrics[spec.metric])
        outcome.best_params = dict(best.config.get("params", {}))
        refits = _refits(results, spec, target, ranked, used)
        if spec.mlflow.registered_model_name:
            outcome.champion_uri = _champion(ranked, spec, target, refits)
    outcome.failure = failure_reason(results, outcome, spec, stopped_because)
    _log_outcome(target, outcome, spec.metric)
    return outcome


PLAN_MARGIN = 0.002  # a champion this close to the plan's own trial is the plan, trained for fewer steps


def plan_advice(spec: Any, results: Any, target: MlflowTarget) -> str | None:
    """The search's last log line when its champion is within :data:`PLAN_MARGIN` of the plan's own
    trial (trial 0) on validation: for this data, more steps on the plan pay more than the search."""
    if not spec.plan.enabled or spec.engine == "grid" or not spec.mlflow.registered_model_name:
        return None
    done = [r for r in results if r.metrics and r.metrics.get(spec.metric) is not None]
    champion = target.client().get_run(target.parent_run_id).data.metrics.get("ensemble_val_miou")
    if not done or champion is None or spec.metric != "val_miou":
        return None
    plan_score = float(min(done, key=lambda r: creation_order(str(r.metrics.get("trial_id", "")))).metrics[spec.metric])
    if champion - plan_score > PLAN_MARGIN:
        return None
    workers = spec.cluster.workers if spec.cluster else 1
    steps = spec.cluster.steps_per_worker if spec.cluster else getattr(spec.budget, "steps", None)
    command = f"gigaseg train --data {spec.data.train}" + (f" --workers {workers}" if workers > 1 else "") + (
        f" --steps {steps}" if steps else "")
    return (f"for this data, train the plan longer: the champion's validation mIoU {champion:.4f} is within "
            f"{PLAN_MARGIN} of the plan's own trial ({plan_score:.4f}); `{command}` spends the same "
            f"{'worker-' if workers > 1 else ''}steps on the plan alone")


def log_worker_steps(exp_dir: str, spec: Any, target: MlflowTarget) -> Any:
    """With a cluster: the trials' worker-steps (:func:`search.lanes.worker_steps`) on the parent run
    and in the log; returns them (the refit spends what is left), else None."""
    if spec.cluster is None:
        return None
    from search.lanes import worker_steps

    used = worker_steps(exp_dir, spec.cluster.workers, int(spec.cluster.steps_per_worker))
    metrics = {"worker_steps_trials": used.trials, "worker_steps_budget": float(used.budget),
               "worker_steps_used": used.trials}
    target.client().log_batch(target.parent_run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    log.info("worker-steps: the trials trained %.0f of %d x %d = %d (per worker %s); %d per worker left for a "
             "refit on all %d", used.trials, used.workers, used.per_worker, used.budget,
             [round(x) for x in used.lanes], used.refit_steps(), used.workers)
    return used


def _log_outcome(target: MlflowTarget, outcome: SearchOutcome, metric: str) -> None:
    client, run_id = target.client(), target.parent_run_id
    metrics = {f"n_{k.replace(' ', '_')}": float(v) for k, v in outcome.counts.items()}
    metrics["n_trials"] = float(sum(outcome.counts.values()))
    if outcome.best_value is not None:
        metrics[f"best_{metric}"] = outcome.best_value
    tags = {"gigaseg.best_trial_id": outcome.best_trial_id or "", "gigaseg.champion": outcome.champion_uri or ""}
    if outcome.failure:
        tags["gigaseg.failure"] = outcome.failure[:5000]
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run_id, "FAILED" if outcome.failure else "FINISHED")
