"""The plan's third job: the step timing. A few real forward/backward steps of the planned model
at the planned patch are timed on this machine (:func:`measure_speed`), and the steps that fit the
time budget follow from them (:func:`decide_steps`, :func:`fit_to_steps`, :func:`bound_by_minutes`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from segcore.config import TrainConfig
from segcore.plan.decisions import MIN_PATCH, Decision, object_classes, round_to
from segcore.plan.fingerprints import Fingerprint

MAX_EPOCHS = 40
VAL_SHARE = 0.2  # at most this share of the budget goes to validation
OVERHEAD_SHARE = 0.15  # data loading, halo measurement, model writing
EPOCH_HEADROOM = 3  # a minutes-bound plan may run this many times the epochs its timing planned
MIN_STEPS = 200  # a budget buys at least this many optimizer steps: smaller batches, then patches, first
MEASURE_CPU_PX = 8 * 256 * 256  # on CPU a batch up to this many px is timed as it is (a few seconds a step)
MIN_FIT_BATCH = 4  # ... but batches stay at least this big (batch norm)


@dataclass
class Speed:
    """Measured seconds per training step (planned batch) and per forward px (validation)."""

    device: str
    step_s: float
    forward_px_s: float
    measured_batch: int
    threads: int = 0  # torch CPU threads it was timed with
    bf16: bool = False  # timed under bf16 autocast, as training will run


def measure_speed(cfg: TrainConfig, channels: int, classes: int, device: str = "auto", steps: int = 2) -> Speed:
    """Time ``steps`` real forward/backward/optimizer steps (after two warm-ups; the fastest counts) of
    ``cfg``'s model at its patch size and memory format, as training runs it, and one forward pass.
    On CPU a batch beyond :data:`MEASURE_CPU_PX` is timed at 4 and scaled linearly (which
    overestimates: a bigger batch costs less per patch)."""
    import torch

    from segcore.device import pick_device, train_autocast
    from segcore.losses import build_loss
    from segcore.models import build_model

    dev = pick_device(device if device != "auto" else cfg.device)
    batch, patch = cfg.data.batch_size, cfg.data.patch_size
    measured = batch if dev.type == "cuda" or batch * patch * patch <= MEASURE_CPU_PX else min(batch, 4)
    torch.manual_seed(0)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.model.model_copy(update={"in_channels": channels, "classes": classes}))
    model = model.to(dev, memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    weights = None if cfg.loss.class_weighting == "none" else torch.ones(max(classes, 2))  # a step costs the same
    loss_fn = build_loss(cfg.loss, classes, weights).to(dev)  # with any weights (no 'unweighted' warning)
    x = torch.randn(measured, channels, patch, patch, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (measured, patch, patch), device=dev)
    use_amp = train_autocast(dev, cfg.amp)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        loss_fn(logits.float(), y).backward()
        optimizer.step()

    for _ in range(3):  # allocator, huge pages and oneDNN kernels (bf16: AMX) settle
        step()
    _sync(dev)
    times = []
    for _ in range(max(1, steps)):  # the fastest step: other processes on a shared machine only slow steps down
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    step_s = min(times) * batch / measured
    model.eval()
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" and cfg.amp):
        t0 = time.perf_counter()
        model(x)
        _sync(dev)
        forward_px_s = (time.perf_counter() - t0) / (measured * patch * patch)
    return Speed(str(dev), step_s, forward_px_s, measured, torch.get_num_threads(), use_amp)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` inside (unchanged for None), restored after."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _usable_seconds(budget_min: float) -> float:
    """The budget's seconds for training and validation, after :data:`OVERHEAD_SHARE`."""
    return budget_min * 60.0 * (1 - OVERHEAD_SHARE)


def decide_steps(fp: Fingerprint, cfg: TrainConfig, speed: Speed, budget_min: float) -> tuple[dict[str, int], str]:
    """epochs x patches_per_epoch / batch_size steps that fit ``budget_min`` at the measured speed,
    after validation (tiled, at most VAL_SHARE of the budget) and fixed overhead."""
    budget = _usable_seconds(budget_min)
    val_px = min(fp.total_pixels * cfg.data.val_fraction, cfg.data.val_pixels) * 1.3  # + halo overlap
    val_s = max(val_px * speed.forward_px_s, 1e-3)
    train_s = budget * (1 - VAL_SHARE)
    steps = max(1, int(train_s / speed.step_s))
    epochs = int(max(1, min(MAX_EPOCHS, budget * VAL_SHARE / val_s, steps // 10 or 1)))
    steps = max(epochs, int((budget - epochs * val_s) / speed.step_s))
    per_epoch = max(1, steps // epochs)
    chosen = {"epochs": epochs, "patches_per_epoch": per_epoch * cfg.data.batch_size}
    why = (f"{epochs} epochs x {per_epoch} steps = {epochs * per_epoch} steps fill {budget_min:g} min on "
           f"{speed.device}{_threads(speed)}: {speed.step_s:.3f} s/step measured (batch {speed.measured_batch}"
           f"{', scaled to ' + str(cfg.data.batch_size) if speed.measured_batch != cfg.data.batch_size else ''}), "
           f"{val_s:.1f} s validation per epoch, {100 * OVERHEAD_SHARE:.0f} % kept for overhead")
    return chosen, why


def _threads(speed: Speed) -> str:
    """" (2 threads, bf16)" for a CPU timing: what the step time was measured with."""
    parts = [f"{speed.threads} thread{'s' if speed.threads != 1 else ''}"] if speed.device == "cpu" and speed.threads \
        else []
    parts += ["bf16"] if speed.bf16 else []
    return f" ({', '.join(parts)})" if parts else ""


def fit_to_steps(fp: Fingerprint, cfg: TrainConfig, speed: Speed, budget_min: float,
                 multiple: int) -> tuple[int, int, str] | None:
    """(patch, batch, why) that buy :data:`MIN_STEPS` steps in the budget when the planned ones buy
    fewer (a short budget, a slow machine): the batch first (down to :data:`MIN_FIT_BATCH`), then
    the patch (down to one typical object extent, at least :data:`MIN_PATCH`), assuming a step's
    time scales with its pixels; None when the planned patch and batch already fit."""
    train_s = _usable_seconds(budget_min) * (1 - VAL_SHARE)
    steps = train_s / speed.step_s
    patch, batch = cfg.data.patch_size, cfg.data.batch_size
    if steps >= MIN_STEPS:
        return None
    share = steps / MIN_STEPS  # of the planned pixels per step
    new_batch = max(min(batch, MIN_FIT_BATCH), min(batch, int(batch * share) or 1))
    extent = max((c.extent_px for c in object_classes(fp)), default=MIN_PATCH)
    floor = min(patch, max(MIN_PATCH, round_to(extent, multiple)))
    new_patch = max(floor, round_to(patch * math.sqrt(share * batch / new_batch), multiple, up=False))
    if (new_patch, new_batch) == (patch, batch):
        return None
    return new_patch, new_batch, (
        f"{patch}^2 x {batch} buys only {steps:.0f} steps in {budget_min:g} min at {speed.step_s:.2f} s/step; "
        f"{new_patch}^2 x {new_batch} (patch at least one object extent, {floor} px) aims at {MIN_STEPS}")


def timed_speed(cfg: TrainConfig, fp: Fingerprint, classes: int, dev: str, steps: int,
                threads: int | None) -> Speed:
    """:func:`measure_speed` with ``threads`` torch threads on CPU."""
    with torch_threads(threads if dev == "cpu" else None):
        return measure_speed(cfg, fp.channels, classes, dev, steps=steps)


def bound_by_minutes(over: dict[str, Any], budget_min: float) -> Decision:
    """Make the budget, not the timing, end the run: ``max_minutes`` = the budget less overhead, and
    :data:`EPOCH_HEADROOM` x the planned epochs as a cap. The one-cycle schedule then anneals to the
    minutes (:class:`segcore.schedules.BudgetedOneCycle`), so steps timed on a busy machine (3.5x
    slow once here: a 10-minute plan trained 3 minutes) or a faster epoch than timed no longer cut
    or stretch the run."""
    minutes = round(_usable_seconds(budget_min) / 60.0, 3)
    planned = over["epochs"]
    over["epochs"], over["max_minutes"] = planned * EPOCH_HEADROOM, minutes
    return Decision("max_minutes", f"{minutes:g}", f"the run ends at the first epoch end after {minutes:g} min of "
                    f"training ({100 * (1 - OVERHEAD_SHARE):.0f} % of {budget_min:g}), its one-cycle annealing to "
                    f"the minutes; epochs = {planned * EPOCH_HEADROOM}, {EPOCH_HEADROOM} x the {planned} timed, is "
                    "only a cap")
