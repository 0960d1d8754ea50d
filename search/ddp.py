"""The one Ray Train launcher: N data-parallel workers of ``segcore.train.train`` (Ray Train V2).

Both multi-worker search trials (:func:`search.trial.run_ddp_trial`) and ``gigaseg train --workers N``
(:mod:`search.train_workers`) call :func:`fit_workers` with their own worker function (the
*body*), so this module knows neither Tune trials nor the CLI. Every worker gets the process group
Train initialised (gloo on CPU, NCCL on GPU), so ``train`` runs unchanged under DDP; it reports
every epoch with :func:`report` (``ray.train.report``). A run's ``(storage, name)`` is its identity:
fitting the same pair again restores the run from its latest checkpoint (``WorkerSlot.resume``),
and so does Train itself after a worker is lost (``max_failures``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.quiet_exit import guard_current_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerResources:
    """How many workers, and each one's Ray resources (GPUs > 0: NCCL and one device each)."""

    workers: int
    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus > 0 else "gloo"


@dataclass(frozen=True)
class WorkerSlot:
    """What a body learns about its worker: rank, world size, the checkpoint to resume from
    (a ``ray.train.Checkpoint`` or None) and a private folder, removed when the body returns."""

    rank: int
    world_size: int
    resume: Any
    out_dir: Path


WorkerBody = Callable[[WorkerSlot, Any], None]  # (slot, payload); a module-level function (pickled by name)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Train worker: calls the body with its slot and payload."""
    import ray.train

    guard_current_thread()  # see search.quiet_exit: a stopped run's workers end without a stack dump
    ctx = ray.train.get_context()
    out_dir = Path(tempfile.mkdtemp(prefix="gigaseg-ddp-model-"))
    try:
        slot = WorkerSlot(ctx.get_world_rank(), ctx.get_world_size(), ray.train.get_checkpoint(), out_dir)
        config["body"](slot, config["payload"])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def report(metrics: dict[str, Any], checkpoint: Any) -> None:
    """A Train worker's report (every rank calls it the same number of times)."""
    import ray.train

    ray.train.report(metrics, checkpoint=checkpoint)


def fit_workers(body: WorkerBody, payload: Any, res: WorkerResources, *, name: str, storage: str,
                max_failures: int = 0, callbacks: Sequence[Any] = (), keep_checkpoints: int | None = None) -> Any:
    """Run ``body(slot, payload)`` on ``res.workers`` workers as the Train run ``storage/name``;
    returns Train's ``Result`` (its ``checkpoint`` is the last one reported)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus > 0 else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"body": body, "payload": payload},
        torch_config=TorchConfig(backend=res.backend),
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.gpus > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )
    return trainer.fit()


def connect_ray(address: str | None = None) -> bool:
    """Use the running Ray (``ray.init`` done), else ``address`` or ``RAY_ADDRESS`` (as inside
    ``ray job submit``), else start a private local one. True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    log.info("Ray: %s", f"connecting to {address}" if address else "starting a local instance")
    ray.init(address=address or "local")
    return not address
