"""Multi-worker trials: a Ray Train (V2) TorchTrainer launched from inside the Tune trial.

The trial function builds ``TorchTrainer(...).fit()``; each worker calls ``segcore.train.train``
unchanged (it sees the process group that Train initialised: gloo on CPU, NCCL on GPU) and
reports every epoch with ``ray.train.report``; ``TuneReportCallback`` relays rank 0's metrics to
Tune, so ASHA sees them. Restarting a trial restores the Train run from its checkpoints because
its (storage_path, name) is stable: ``<storage>/<search>/_train/train-<trial_id>``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from search.pg_guard import LedgerCallback
from search.quiet_exit import guard_current_thread
from search.trial import TrialContext, run_epochs


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Train worker."""
    import ray.train

    guard_current_thread()  # see search.quiet_exit: a stopped run's workers end without a stack dump
    ctx: TrialContext = config["ctx"]
    rank = ray.train.get_context().get_world_rank()

    def report(metrics: dict[str, Any], checkpoint: Any) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)

    out_dir = Path(tempfile.mkdtemp(prefix="gigaseg-ddp-model-"))  # rank 0 logs the model to MLflow from here
    try:
        relay = run_epochs(ctx, config["params"], report, trial_id=config["trial_id"],
                           trial_name=config["trial_name"], rank=rank, resume=ray.train.get_checkpoint(),
                           trial_dir=None, out_dir=out_dir, extra=config["extra"])
        relay.flush()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def run_ddp_trial(ctx: TrialContext, params: dict[str, Any], trial_id: str, trial_name: str,
                  extra: dict[str, float]) -> None:
    """Fit a TorchTrainer with ``workers_per_trial`` workers for this trial's configuration."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = ctx.resources
    use_gpu = res.gpus_per_trial > 0
    per_worker = {"CPU": res.cpus_per_trial, **({"GPU": res.gpus_per_trial} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"ctx": ctx, "params": params, "trial_id": trial_id, "trial_name": trial_name,
                           "extra": extra},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=ctx.train_storage,
            failure_config=ray.train.FailureConfig(max_failures=0),  # Tune retries the whole trial
            callbacks=[TuneReportCallback(), LedgerCallback(ctx.ledger_name)],
        ),
    )
    trainer.fit()
