"""``gigaseg train --workers N``: one model trained by N data-parallel Ray Train workers.

segcore's ``gigaseg train`` finds this launcher through the entry point group
``gigaseg.train_launchers`` (name ``ray``), so segcore itself stays free of Ray. The driver plans on
one worker's resources (a Ray task: a GPU worker is timed on its GPU, a CPU worker with its CPUs as
torch threads), opens the MLflow run and fits :func:`search.ddp.fit_workers`. Each worker runs
``segcore.train.train`` under DDP; rank 0 logs every epoch to that one run, checkpoints every epoch
and measures the halo once; the last checkpoint is the finished model folder, which the driver copies
to ``--out`` and logs as a one-process ``train`` does.

A run is kept in ``<GIGASEG_HOME>/train-runs/<out name>-<hash of out>/``: ``gigaseg_train.json``
(the config, the resources, the MLflow run) and, unless ``--storage`` puts them elsewhere, Ray
Train's checkpoints. ``--resume`` reads it and fits the same Train run again, which restores its
latest checkpoint; a lost worker is replaced by Train itself (``--max-failures``). The folder is
removed when the model is written.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from search.ddp import WorkerResources, WorkerSlot, connect_ray, fit_workers, report
from search.relay import EpochRelay
from segcore import tracking
from segcore.config import TrainConfig, flatten
from segcore.errors import ConfigError
from segcore.tracking import MlflowEpochLogger
from segcore.train_cli import (
    announce_model,
    close_run,
    command_line,
    mlflow_run,
    resolve_config,
)

log = logging.getLogger(__name__)

STATE_FILE = "gigaseg_train.json"
PLAN_COPY = "plan.yaml"
MAX_FAILURES = 3  # default --max-failures: lost workers replaced per run
KEEP_CHECKPOINTS = 2


class TrainState(BaseModel):
    """What a ``--workers`` run needs to be resumed by a new driver (``gigaseg_train.json``)."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any]  # TrainConfig, keys as set (exclude_unset keeps dataset.yaml's normalize in force)
    data: str
    val_data: str | None
    out: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    storage: str
    name: str
    experiment: str | None  # None: --no-mlflow
    tracking_uri: str | None = None
    run_id: str | None = None

    @property
    def resources(self) -> WorkerResources:
        return WorkerResources(self.workers, self.cpus_per_worker, self.gpus_per_worker)


@dataclass(frozen=True)
class WorkersJob:
    """The payload every worker gets."""

    config: TrainConfig
    data: str
    val_data: str | None
    tracking_uri: str | None
    run_id: str | None


def train_worker(slot: WorkerSlot, job: WorkersJob) -> None:
    """One worker: ``train`` under DDP; rank 0 logs epochs to the run, and its last checkpoint is the model.
    The job's tracking URI is the worker's too, so a model URI in the config (a refit's warm start) resolves there."""
    import torch
    from ray.train.v2._internal.execution import context as train_context

    from segcore.cli import setup_logging
    from segcore.train import train

    setup_logging()
    if job.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri
    quiet = [train_context.__file__] + (["segcore", "search"] if slot.rank > 0 else [])  # rank 0 speaks for the run
    for name in quiet:  # Train's context logs every report's whole metrics dict, under its file's name
        logging.getLogger(name).setLevel(logging.WARNING)
    log.info("rank 0 of %d: %d torch threads each%s", slot.world_size, torch.get_num_threads(),
             ", resuming from the last checkpoint" if slot.resume is not None else "")
    loggers = [MlflowEpochLogger(job.tracking_uri, job.run_id)] if job.run_id and job.tracking_uri else []
    relay = EpochRelay(report, None)
    with slot.resume.as_directory() if slot.resume is not None else nullcontext(None) as resume_dir:
        train(job.config, job.data, slot.out_dir, callbacks=[*loggers, relay], resume_from=resume_dir,
              val_dir=job.val_data)
    relay.flush(slot.out_dir if slot.rank == 0 else None)


def run_dir_of(out: str | Path) -> Path:
    """Where the run into ``out`` keeps its state: one folder per output folder."""
    out = Path(out).resolve()
    digest = hashlib.sha1(str(out).encode()).hexdigest()[:8]
    return tracking.gigaseg_home() / "train-runs" / f"{out.name}-{digest}"


def check_capacity(res: WorkerResources, cluster: bool) -> None:
    """Refuse workers that do not fit this machine's Ray; on a cluster (``cluster``: reached through an
    address, which an autoscaler may grow) only warn. Before a private Ray starts, this machine's CPUs count."""
    import ray

    have = ray.cluster_resources() if ray.is_initialized() else {"CPU": float(os.cpu_count() or 1), "GPU": _gpus()}
    short = [f"--workers {res.workers} x {flag} {per:g} = {res.workers * per:g} {key}s, but Ray has "
             f"{have.get(key, 0.0):g}" for key, flag, per in (("CPU", "--cpus-per-worker", res.cpus),
                                                                ("GPU", "--gpus-per-worker", res.gpus))
             if res.workers * per > have.get(key, 0.0)]
    if short and not cluster:
        raise ConfigError("; ".join(short) + ": lower --workers or the per-worker resources, or pass --address "
                          "of a cluster that has them")
    if short:
        log.warning("%s: the run waits until the cluster has them", "; ".join(short))


def _gpus() -> float:
    import torch

    return float(torch.cuda.device_count())


def _planner(res: WorkerResources) -> Callable[..., Any]:
    """``plan_training`` as a Ray task holding one worker's resources, so steps are timed as a worker runs them."""
    import ray

    from segcore.plan import plan_training

    def plan(*args: Any, **kwargs: Any) -> Any:
        threads = max(1, int(res.cpus)) if res.gpus <= 0 else None
        task = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus)(plan_training)
        return ray.get(task.remote(*args, **kwargs, threads=threads))

    return plan


def _device(args: argparse.Namespace, res: WorkerResources) -> str:
    """The workers' device: the one written (flag, ``--set`` or config file) if it fits the resources, else
    ``cuda`` with GPUs per worker and ``cpu`` without."""
    from segcore.train_cli import args_dict

    written = args_dict(args, {}).get("device")
    if written is None:
        return "cuda" if res.gpus > 0 else "cpu"
    if str(written).startswith("cuda") and res.gpus <= 0:
        raise ConfigError(f"device {written}: the workers hold no GPU; add --gpus-per-worker 1, or train on cpu")
    return str(written)


def new_state(args: argparse.Namespace, res: WorkerResources, run_dir: Path) -> TrainState:
    """Plan (on a worker's resources) and configure a new run; its plan is kept in ``run_dir``."""
    from segcore.plan import write_plan

    data, val = str(Path(args.data).resolve()), str(Path(args.val_data).resolve()) if args.val_data else None
    args = argparse.Namespace(**{**vars(args), "data": data, "device": _device(args, res)})
    cfg, plan = resolve_config(args, planner=_planner(res), workers=res.workers)
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        write_plan(plan, run_dir / PLAN_COPY)
    return TrainState(config=cfg.model_dump(mode="json", exclude_unset=True), data=data, val_data=val,
                      out=str(Path(args.out).resolve()), workers=res.workers, cpus_per_worker=res.cpus,
                      gpus_per_worker=res.gpus, storage=args.storage or str(run_dir.parent), name=run_dir.name,
                      experiment=None if args.no_mlflow else args.experiment)


def refuse_stopped_run(args: argparse.Namespace, run_dir: Path) -> None:
    """A new run into an ``--out`` whose earlier run was stopped would lose it: say to resume or delete it."""
    if (run_dir / STATE_FILE).exists():
        raise ConfigError(f"--out {args.out}: a `gigaseg train --workers` run into it was stopped before it "
                          f"finished ({run_dir / STATE_FILE}); continue it with --resume, or delete {run_dir}")


def resumed_state(args: argparse.Namespace, run_dir: Path) -> TrainState:
    """The stopped run's state; flags that would change it are refused."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: no stopped `gigaseg train --workers` run writes {args.out} (no {path}); "
                          "start it without --resume")
    state = TrainState.model_validate_json(path.read_text())
    changed = [flag for flag, given in (("--config", args.config), ("--steps", args.steps),
                                        ("--budget-min", args.budget_min), ("config flags or --set", command_line(args)))
               if given]
    wanted = {"--workers": (args.workers, state.workers), "--cpus-per-worker": (args.cpus_per_worker,
              state.cpus_per_worker), "--gpus-per-worker": (args.gpus_per_worker, state.gpus_per_worker),
              "--data": (str(Path(args.data).resolve()), state.data),
              "--val-data": (str(Path(args.val_data).resolve()) if args.val_data else None, state.val_data)}
    changed += [f"{flag} {now} (it ran with {then})" for flag, (now, then) in wanted.items()
                if now is not None and now != then]
    if changed:
        raise ConfigError(f"--resume continues the run as it started ({path}); drop or match {', '.join(changed)}")
    return state


def copy_model(result: Any, name: str, out: Path) -> Path:
    """The Train run ``name``'s last checkpoint (the finished model folder) into ``out``, without the train state."""
    from segcore.train import STATE_FILE as TRAIN_STATE

    if result.checkpoint is None:
        raise RuntimeError(f"Train run {name} finished without a checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as ckpt:
        for path in Path(ckpt).iterdir():
            if path.is_file() and path.name != TRAIN_STATE:
                shutil.copy2(path, out / path.name)
    return out


def write_model(result: Any, state: TrainState, run_dir: Path) -> Path:
    """The last checkpoint (the finished model folder) into ``--out``, without the train state; plus the plan."""

    out = copy_model(result, state.name, Path(state.out))
    if (run_dir / PLAN_COPY).is_file():
        shutil.copy2(run_dir / PLAN_COPY, out / PLAN_COPY)
    return out


def _fit(state: TrainState, max_failures: int) -> Any:
    job = WorkersJob(TrainConfig.model_validate(state.config), state.data, state.val_data, state.tracking_uri,
                     state.run_id)
    log.info("training on %d worker(s) (%g CPU, %g GPU each, %s); checkpoints in %s/%s", state.workers,
             state.cpus_per_worker, state.gpus_per_worker, state.resources.backend, state.storage, state.name)
    return fit_workers(train_worker, job, state.resources, name=state.name, storage=state.storage,
                       max_failures=max_failures, keep_checkpoints=KEEP_CHECKPOINTS)


def _params(state: TrainState) -> dict[str, Any]:
    return flatten(state.config) | {"data": state.data, "workers": state.workers, "backend": state.resources.backend,
                                    "cpus_per_worker": state.cpus_per_worker, "gpus_per_worker": state.gpus_per_worker}


def train_and_log(state: TrainState, run_dir: Path, max_failures: int, run_name: str | None) -> Path:
    """Fit the workers inside the run's MLflow run (new or reopened), write and log the model folder."""
    def save(current: TrainState) -> None:
        (run_dir / STATE_FILE).write_text(current.model_dump_json(indent=2))

    if state.experiment is None:
        save(state)
        return write_model(_fit(state, max_failures), state, run_dir)
    params = None if state.run_id else _params(state)
    with mlflow_run(state.experiment, run_name, params, run_id=state.run_id, uri=state.tracking_uri) as (uri, run_id):
        state = state.model_copy(update={"tracking_uri": uri, "run_id": run_id})
        save(state)
        t0 = time.perf_counter()
        out = write_model(_fit(state, max_failures), state, run_dir)
        close_run(out, time.perf_counter() - t0)
    return out


def run(args: argparse.Namespace) -> int:
    """Entry point ``gigaseg.train_launchers: ray``: ``gigaseg train --workers N`` (new or ``--resume``)."""
    import json

    import ray

    run_dir = run_dir_of(args.out)
    if args.resume:
        state = resumed_state(args, run_dir)
    else:
        refuse_stopped_run(args, run_dir)
        state = None
    res = state.resources if state else WorkerResources(args.workers, args.cpus_per_worker or 1.0,
                                                        args.gpus_per_worker or 0.0)  # flags' defaults: 1 CPU, 0 GPU
    check_capacity(res, cluster=bool(args.address or os.environ.get("RAY_ADDRESS")))
    started = connect_ray(args.address)
    try:
        state = state or new_state(args, res, run_dir)
        out = train_and_log(state, run_dir, MAX_FAILURES if args.max_failures is None else args.max_failures,
                            args.run_name)
    except BaseException:
        if (run_dir / STATE_FILE).is_file():
            log.error("the run stopped before it finished; continue it from its last epoch with the same command "
                      "and --resume (state: %s)", run_dir / STATE_FILE)
        raise
    finally:
        if started:
            ray.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)
    return announce_model(out, json.loads((out / "metrics.json").read_text())["final"])
