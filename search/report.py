"""What a trial reports every epoch (search/trial.py) and what the driver reads from it.

Each report carries segcore.train's metrics plus ``epoch``, the cumulative optimizer ``steps`` and
``train_minutes``, and ``is_last`` (1.0 on a trial's final epoch): ASHA, PBT, Optuna and the
worker-steps ledger all read these keys.
"""

from __future__ import annotations

from typing import Any

IS_LAST = "is_last"  # 1.0 on a trial's final epoch, else 0.0


def epoch_steps(result: dict[str, Any]) -> float:
    """Optimizer steps one reported epoch trained: ``steps`` is cumulative, and every epoch of a run
    makes the same number. Robust to restores and PBT clones, whose ``steps`` start at the clone's."""
    steps, epoch = result.get("steps"), result.get("epoch")
    if steps is None or epoch is None:
        return 0.0
    return float(steps) / (int(epoch) + 1)


def creation_order(trial_id: str) -> tuple[int, str]:
    """Sort key: Tune's trial ids end in a creation counter (``abc12_00003``); trial 0 comes first."""
    tail = trial_id.rsplit("_", 1)[-1]
    return (int(tail), trial_id) if tail.isdigit() else (0, trial_id)
