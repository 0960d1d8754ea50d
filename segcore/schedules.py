"""A one-cycle learning-rate schedule that ends when a time budget does.

A run under ``max_minutes`` (a search trial's ``budget: {minutes: M}``, a refit's cap) stops at
the first epoch end after M minutes. With torch's ``OneCycleLR`` sized from the planned epochs, a
run slower than planned (a trial given 1 of the 2 cores the plan was timed on, a busy node) is cut
while its learning rate is still high, and is judged on an unannealed model. Budgeted training
(Li et al., ICLR 2020) anneals to the budget instead: :class:`BudgetedOneCycle` has the shape of
``OneCycleLR`` (cosine warm-up over the first 30 %, cosine anneal to lr / 2.5e5; no momentum
cycling) and, at every epoch end, re-fits its length to the steps that the minutes left allow at
the speed measured so far, never beyond the configured epochs.
"""

from __future__ import annotations

import math

import torch

PCT_START, DIV_FACTOR, FINAL_DIV_FACTOR = 0.3, 25.0, 1e4  # OneCycleLR's defaults


def _cos(start: float, end: float, t: float) -> float:
    return end + (start - end) * (1.0 + math.cos(math.pi * t)) / 2.0


def one_cycle_factor(progress: float) -> float:
    """The one-cycle multiplier of the peak lr at ``progress`` in [0, 1] (clamped)."""
    p = min(max(progress, 0.0), 1.0)
    if p < PCT_START:
        return _cos(1.0 / DIV_FACTOR, 1.0, p / PCT_START)
    return _cos(1.0, 1.0 / (DIV_FACTOR * FINAL_DIV_FACTOR), (p - PCT_START) / (1.0 - PCT_START))


class BudgetedOneCycle(torch.optim.lr_scheduler.LambdaLR):
    """One-cycle over ``total_steps``, which :meth:`fit_to_budget` re-fits to a time budget."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int) -> None:
        self.max_steps = max(1, int(max_steps))
        self.total_steps = self.max_steps
        super().__init__(optimizer, lambda step: one_cycle_factor(step / self.total_steps))

    def fit_to_budget(self, steps_done: float, seconds_used: float, seconds_budget: float) -> int:
        """Set the cycle's length to the steps that fit ``seconds_budget`` at the speed so far
        (``steps_done`` in ``seconds_used``), between one more step and ``max_steps``; return it.

        Call it with values that are equal on every rank (DDP replicas must share one lr).
        ``total_steps`` is in the state dict (LambdaLR saves its attributes), so a resume keeps it."""
        if steps_done > 0 and seconds_used > 0:
            fit = steps_done + max(0.0, seconds_budget - seconds_used) * steps_done / seconds_used
            self.total_steps = int(min(self.max_steps, max(steps_done + 1, round(fit))))
        return self.total_steps
