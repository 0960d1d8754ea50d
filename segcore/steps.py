"""Optimizer steps per epoch, and the epochs x patches that make a given number of steps.

One copy of the rounding for every step count in gigaseg: ``gigaseg train --steps S`` and a
search's ``budget: {steps: N}`` (search/budget.py) both go through :func:`fit_steps`.
"""

from __future__ import annotations

import math
from typing import Literal

from segcore.config import TrainConfig

Rounding = Literal["at_least", "at_most"]  # a step count met or exceeded, or never exceeded


def steps_per_epoch(patches_per_epoch: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch on each rank, as segcore.train's loader makes them (drop_last
    when a rank holds at least one full batch, else one short batch)."""
    per_rank = math.ceil(patches_per_epoch / world_size)
    return max(1, per_rank // batch_size)


def fit_steps(steps: int, patches_per_epoch: int, batch_size: int, world_size: int = 1,
              rounding: Rounding = "at_least") -> tuple[int, int]:
    """``(epochs, patches_per_epoch)`` that make about ``steps`` optimizer steps per rank.

    Rounding: epochs = max(1, round(steps / steps per epoch at the configured patches_per_epoch)),
    so validation keeps about the configured cadence; then each epoch gets ceil(steps / epochs)
    steps (``at_least``: overshoots by less than one step per epoch) or floor (``at_most``, a
    cluster's worker-steps: falls short by less than one per epoch), i.e. patches_per_epoch = that
    x batch_size x world_size.
    """
    epochs = max(1, round(steps / steps_per_epoch(patches_per_epoch, batch_size, world_size)))
    per_epoch = math.ceil(steps / epochs) if rounding == "at_least" else steps // epochs
    return epochs, per_epoch * batch_size * world_size


def with_steps(cfg: TrainConfig, steps: int, world_size: int = 1, rounding: Rounding = "at_least") -> TrainConfig:
    """``cfg`` with the ``epochs`` and ``data.patches_per_epoch`` of :func:`fit_steps`: about
    ``steps`` optimizer steps on each of ``world_size`` ranks, at ``cfg``'s validation cadence."""
    epochs, ppe = fit_steps(steps, cfg.data.patches_per_epoch, cfg.data.batch_size, world_size, rounding)
    return cfg.model_copy(update={"epochs": epochs, "data": cfg.data.model_copy(update={"patches_per_epoch": ppe})})


def worker_lr(lr: float, workers: int) -> float:
    """The peak lr for ``workers`` data-parallel workers that each keep one worker's batch: x sqrt(N)
    (square-root scaling, the rule for Adam-type optimizers, Malladi et al. 2022; linear scaling
    overshoots with Adam), reached through the one-cycle's warm-up. Three significant digits."""
    return float(f"{lr * math.sqrt(workers):.3g}")
