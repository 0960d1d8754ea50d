"""Epoch reports from ``segcore.train.train`` to Ray: log, checkpoint, report, the last one held back.

Used by every Ray caller of the training loop: a single-worker Tune trial (``tune.report``), a
multi-worker trial and ``gigaseg train --workers N`` (``ray.train.report``, :mod:`search.ddp`).
The final epoch's report is held back until the caller's last work is done (a trial logs its model,
``train --workers`` puts the finished model folder into the final checkpoint), because Tune may stop
a trial as soon as it sees a result, and nothing after the last report is guaranteed to run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

ReportFn = Callable[[dict[str, Any], Any], None]  # (metrics, ray Checkpoint | None)


class EpochLog(Protocol):
    """Where rank 0 logs each epoch's metrics (an MLflow run)."""

    def log_epoch(self, metrics: dict[str, float], step: int) -> None: ...


class EpochRelay:
    """EpochCallback: metrics to ``run`` (rank 0), the ``before`` hook, checkpoint, report; holds the last one."""

    def __init__(self, report: ReportFn, run: EpochLog | None, before: Callable[[int], None] | None = None,
                 extra: dict[str, float] | None = None) -> None:
        self.report, self.run, self.before, self.extra = report, run, before, extra or {}
        self.pending: tuple[dict[str, Any], Path | None] | None = None

    def __call__(self, rep: Any) -> None:
        if self.before is not None:
            self.before(rep.epoch)
        metrics = {**rep.metrics, "epoch": rep.epoch, "is_last": float(rep.is_last),
                   "world_size": rep.world_size, **self.extra}
        if self.run is not None and rep.rank == 0:
            self.run.log_epoch({k: v for k, v in metrics.items() if k != "is_last"}, rep.epoch)
        ckpt_dir = None
        if rep.rank == 0:
            ckpt_dir = Path(tempfile.mkdtemp(prefix="gigaseg-ckpt-"))
            rep.save_checkpoint(ckpt_dir)
        if rep.is_last:
            self.pending = (metrics, ckpt_dir)
        else:
            self._send(metrics, ckpt_dir)

    def flush(self, outputs: Path | None = None) -> None:
        """Send the held final report. ``outputs`` (rank 0: the folder ``train`` wrote) is copied into
        its checkpoint first, so the last checkpoint is the finished model folder plus the train state."""
        if self.pending is None:
            return
        metrics, ckpt_dir = self.pending
        if outputs is not None and ckpt_dir is not None:
            shutil.copytree(outputs, ckpt_dir, dirs_exist_ok=True)
        self.pending = None
        self._send(metrics, ckpt_dir)

    def _send(self, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        from ray.tune import Checkpoint

        try:
            self.report(metrics, Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)
        finally:
            if ckpt_dir is not None:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
