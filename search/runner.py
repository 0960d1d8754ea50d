"""Run (or resume) a search: Ray, MLflow parent run, Tuner, summary, champion.

``run_search(spec)`` connects to ``RAY_ADDRESS`` (e.g. inside ``ray job submit``) or starts a
private local Ray, opens the parent MLflow run, writes ``gigaseg_search.json`` next to Tune's
experiment state and fits the Tuner. ``resume_search(path)`` reads that file back and continues
with ``Tuner.restore(path, resume_errored=True)``: finished trials are kept, interrupted ones
resume from their last checkpoint, and the same parent run receives the rest.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.stopper import CombinedStopper

from search.ddp import connect_ray
from search.engines import EpochBudget, build_engine, num_trials
from search.failfast import SameErrorStop
from search.lanes import StepsLedger
from search.mlflow_runs import MlflowTarget, start_parent_run
from search.pg_guard import LedgerSweeper, get_ledger
from search.planned import log_plan, plan_search
from search.preflight import check_search_data
from search.refit import trial_time_budget_s
from search.space import SearchSpace
from search.spec import ResourcesSection, SearchSpec, parse_search_spec
from search.summary import SearchOutcome, TrialStatusCallback, plan_advice, summarize
from search.trial import TrialContext, trial_main
from segcore import tracking
from segcore.config import ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "gigaseg_search.json"
PBT_CHECKPOINTS = 4  # a clone reads its donor's latest checkpoint: keep more than the last two
DRIVER_CPUS = 0.01  # a multi-worker trial's own actor only drives its TorchTrainer


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default spells out every parameter)."""
    return f"trial_{trial.trial_id}"


def make_trainable(ctx: TrialContext, res: ResourcesSection) -> Any:
    """``trial_main`` bound to ``ctx`` with the resources of one trial (its driver, for DDP)."""
    fn = tune.with_parameters(trial_main, ctx=ctx)
    if res.workers_per_trial > 1:
        return tune.with_resources(fn, {"CPU": DRIVER_CPUS})
    return tune.with_resources(fn, {"CPU": res.cpus_per_trial, "GPU": res.gpus_per_trial})


def reuse_actors(spec: SearchSpec) -> bool:
    """Reuse trial processes (saves a torch/MLflow import per trial) only when no trial is stopped
    mid-training: a stopped trial's thread is still in ``train()`` and Tune cannot reset the actor."""
    return not spec.asha.enabled and spec.engine != "pbt" and spec.resources.workers_per_trial == 1


def default_concurrency(spec: SearchSpec) -> int | None:
    """For DDP trials Tune cannot see the workers' needs: cap trials by what the cluster holds."""
    res = spec.resources
    if spec.cluster is not None:
        _check_cluster_fits(spec)
    if spec.engine == "pbt":  # the population runs side by side (Tune limits searchers only)
        return None
    if spec.cluster is not None:  # N trials at a time, in the order N workers would give their results
        return spec.cluster.workers
    if spec.max_concurrent_trials or res.workers_per_trial == 1:
        return spec.max_concurrent_trials
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 0) // (res.cpus_per_trial * res.workers_per_trial + DRIVER_CPUS))
    if res.gpus_per_trial:
        fits = min(fits, int(total.get("GPU", 0) // (res.gpus_per_trial * res.workers_per_trial)))
    return max(1, fits)


def _check_cluster_fits(spec: SearchSpec) -> None:
    """Warn when this Ray cannot run ``cluster.workers`` trials at once: the steps are counted the same,
    but results arrive in another order than N workers would give them to TPE and the schedulers."""
    res, workers = spec.resources, spec.cluster.workers
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    if workers * res.cpus_per_trial > cpus:
        log.warning("cluster: %d workers x resources.cpus_per_trial %g = %g CPUs, but this Ray has %g: fewer "
                    "trials run at once than on %d workers (the worker-steps are the same); set "
                    "resources.cpus_per_trial: %g to run them side by side here", workers, res.cpus_per_trial,
                    workers * res.cpus_per_trial, cpus, workers, cpus / workers)


def _stopper(spec: SearchSpec, same_errors: SameErrorStop) -> Any:
    """The trial-epoch budget (if any) combined with the same-error stop."""
    if spec.max_trial_epochs:
        return CombinedStopper(EpochBudget(spec.max_trial_epochs), same_errors)
    return same_errors


def progress_reporter(spec: SearchSpec, space: SearchSpace) -> Any | None:
    """Tune's legacy table (``RAY_AIR_NEW_OUTPUT=0``) shows each searched dimension once, by its YAML
    name; the default output infers its columns itself (and warns if given a reporter)."""
    if os.environ.get("RAY_AIR_NEW_OUTPUT", "1") != "0":
        return None
    columns = {f"params/{d.key}": d.key for d in space.dims if not d.fixed}
    return tune.CLIReporter(parameter_columns=columns, metric_columns={"training_iteration": "iter",
                                                                       spec.metric: spec.metric})


def _tuner(spec: SearchSpec, space: SearchSpace, trainable: Any, target: MlflowTarget, exp_dir: Path,
           ledger_name: str, same_errors: SameErrorStop) -> tune.Tuner:
    searcher, param_space, scheduler = build_engine(spec, space, target)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
            num_samples=num_trials(spec, space), max_concurrent_trials=default_concurrency(spec),
            time_budget_s=trial_time_budget_s(spec),  # less the refit's share (search/refit.py)
            reuse_actors=reuse_actors(spec), trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=exp_dir.name,
            storage_path=str(exp_dir.parent),
            stop=_stopper(spec, same_errors),
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=PBT_CHECKPOINTS if spec.engine == "pbt" else 2),
            callbacks=[TrialStatusCallback(target), LedgerSweeper(ledger_name), same_errors, StepsLedger(exp_dir)],
            progress_reporter=progress_reporter(spec, space),
            verbose=1,
        ),
    )


def drain_ledger(ledger: Any, timeout_s: float = 60.0) -> None:
    """After the last trial: wait until every Train run's placement group is gone or released
    (stopped trials' controllers die a moment after Tune returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ray.get(ledger.sweep.remote())
        left = ray.get(ledger.size.remote())
        if left == 0:
            return
        if time.monotonic() > deadline:
            log.warning("%d Train placement group(s) still registered after the search", left)
            return
        time.sleep(1.0)


def _fit(spec: SearchSpec, target: MlflowTarget, exp_dir: Path, restore: bool, space: SearchSpace) -> SearchOutcome:
    ledger_name = f"gigaseg-pg-ledger-{target.parent_run_id}"
    ledger = get_ledger(ledger_name)  # held here for the whole fit, so it stays alive
    ctx = TrialContext(
        space=space, train_dir=str(spec.data.train), val_dir=str(spec.data.val) if spec.data.val else None,
        mlflow=target, resources=spec.resources, train_storage=str(exp_dir / "_train"),
        ledger_name=ledger_name, testing=spec.testing, budget=spec.budget,
    )
    trainable = make_trainable(ctx, spec.resources)
    same_errors = SameErrorStop(spec.failure.stop_after_same_errors)
    if restore:  # the restored run config brings back its own stoppers and callbacks
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = _tuner(spec, space, trainable, target, exp_dir, ledger_name, same_errors)
    try:
        results = tuner.fit()
    finally:
        drain_ledger(ledger)
    outcome = summarize(results, spec, target, str(exp_dir), stopped_because=same_errors.reason)
    log.info("search %s: %s; best %s=%s (trial %s)%s", spec.name, outcome.counts, spec.metric,
             outcome.best_value, outcome.best_trial_id,
             f"; champion {outcome.champion_uri}" if outcome.champion_uri else "")
    if advice := plan_advice(spec, results, target):
        log.info(advice)  # the last line: what to run instead
    return outcome


def _announce(uri: str) -> None:
    log.info("MLflow tracking URI: %s", uri)
    log.info("open the MLflow UI with: %s", tracking.mlflow_ui_command(uri))


def run_search(spec: SearchSpec, spec_yaml: str | None = None) -> SearchOutcome:
    """Run a validated search to the end; returns the outcome (also on the parent MLflow run)."""
    exp_dir = spec.folder
    if (exp_dir / STATE_FILE).exists():
        raise ConfigError(f"search {spec.name!r} already exists at {exp_dir}; continue it with "
                          f"`gigaseg search --resume {exp_dir}` or choose another name/storage_path.")
    space = SearchSpace.from_spec(spec, spec.name)
    check_search_data(space, spec.data.train, spec.data.val)  # bad data: DataError before Ray and MLflow
    spec, space, plan = plan_search(spec, space)  # the plan is base (explicit keys win) and trial 0
    started = connect_ray()
    try:
        uri = spec.mlflow.tracking_uri or tracking.default_tracking_uri()
        _announce(uri)
        spec_json = spec.model_dump(mode="json")
        spec_yaml = spec_yaml or yaml.safe_dump(spec_json, sort_keys=False)
        target = start_parent_run(uri, spec.experiment, spec.name, spec_yaml, spec_json)
        log_plan(target, plan)
        exp_dir.mkdir(parents=True, exist_ok=True)
        state = {"spec": spec_json, "mlflow": {"uri": uri, "experiment_id": target.experiment_id,
                                               "parent_run_id": target.parent_run_id}}
        (exp_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
        return _fit(spec, target, exp_dir, restore=False, space=space)
    finally:
        if started:
            ray.shutdown()


def resume_search(path: str | Path) -> SearchOutcome:
    """Continue a search whose driver stopped (killed, crashed, interrupted) from its folder."""
    exp_dir = Path(path).resolve()
    state_file = exp_dir / STATE_FILE
    if not state_file.is_file() or not tune.Tuner.can_restore(str(exp_dir)):
        raise ConfigError(f"{exp_dir}: not a resumable gigaseg search (no {STATE_FILE} or Tune state); "
                          "pass the folder printed when the search started (<storage_path>/<name>).")
    state = json.loads(state_file.read_text())
    spec = parse_search_spec(state["spec"], source=str(state_file))
    target = MlflowTarget(**state["mlflow"])
    space = SearchSpace.from_spec(spec, spec.name)
    check_search_data(space, spec.data.train, spec.data.val)
    started = connect_ray()
    try:
        _announce(target.uri)
        target.client().update_run(target.parent_run_id, status="RUNNING")
        return _fit(spec, target, exp_dir, restore=True, space=space)
    finally:
        if started:
            ray.shutdown()
