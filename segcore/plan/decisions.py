"""The plan's second job: the decisions a fingerprint makes, each with its stated reason (patch,
batch, model, loss, class balance, normalisation, optimiser), before anything is timed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from segcore.config import ModelConfig
from segcore.data.spec import DatasetSpec
from segcore.plan.fingerprints import ClassStats, Fingerprint
from segcore.steps import worker_lr

THIN_PX = 6.0  # objects at most this thick are thin structures
RARE_FRACTION = 0.05  # classes below this share of labelled px are rare
WEIGHT_FRACTION = 0.01  # ... and below this they also get inverse-frequency class weights
# thin lines: a residual U-Net whose last block has a full-resolution skip (segcore.models.resunet). 10 min on 2
# CPUs, Unet -> this: seed003 0.958 -> 0.974 (line IoU 0.914 -> 0.949), lines (varied) 0.929 -> 0.924 (line
# 0.916 -> 0.926), shapes 0.990 -> 0.991; for small compact objects it did not pay: sem (pores 2 px) 0.965 -> 0.955, ccd 0.953 -> 0.952
THIN_MODEL: dict[str, Any] = {"arch": "ResUNet", "arch_kwargs": {"full_res_channels": 16}}
LINE_ELONGATION = 5.0  # a thin class whose typical extent is at least this many times its thickness is a line
EXTENTS_PER_PATCH = 4  # a patch holds at least this many typical object extents per side
MIN_PATCH, MAX_PATCH = 64, 1024
TRAIN_BYTES_PER_PX = 4096  # activations + gradients per input px of a resnet18 U-Net (fp32 estimate)
MIN_BATCH, MAX_BATCH_CPU, MAX_BATCH_GPU = 2, 8, 16


@dataclass
class Decision:
    """One planned setting: the TrainConfig keys it sets and why."""

    what: str
    value: str
    reason: str


def object_classes(fp: Fingerprint) -> list[ClassStats]:
    """The object classes: all but a dominant background (> 50 % of px, or class 0 at > 30 %)."""
    ranked = sorted(fp.classes, key=lambda c: c.fraction, reverse=True)
    background = ranked[0] if ranked and (ranked[0].fraction > 0.5 or (ranked[0] is fp.classes[0]
                                                                       and ranked[0].fraction > 0.3)) else None
    return [c for c in fp.classes if c is not background and c.extent_px is not None]


def round_to(value: float, multiple: int, up: bool = True) -> int:
    return int((math.ceil if up else math.floor)(value / multiple) * multiple)


def memory_budget(device: str) -> int:
    """Bytes a training batch may use: half the GPU, else a quarter of RAM (at most 8 GiB)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory // 2)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(ram // 4, 8 << 30))


def decide_patch(fp: Fingerprint, multiple: int, memory: int) -> tuple[int, str]:
    """Patch side: >= EXTENTS_PER_PATCH x the largest typical object extent, capped by the images
    and memory, a multiple of the model's size multiple."""
    objects = object_classes(fp)
    extent = max((c.extent_px for c in objects), default=fp.min_side / EXTENTS_PER_PATCH)
    widest = max(objects, key=lambda c: c.extent_px).name if objects else "images"
    mem_cap = int(math.sqrt(memory / (MIN_BATCH * TRAIN_BYTES_PER_PX)))
    cap = max(multiple, round_to(min(fp.min_side, mem_cap, MAX_PATCH), multiple, up=False))
    want = max(MIN_PATCH, EXTENTS_PER_PATCH * extent)
    patch = min(round_to(want, multiple), cap)
    capped = ("the smallest image side" if cap == round_to(fp.min_side, multiple, up=False)
              else "memory" if cap < MAX_PATCH else f"{MAX_PATCH}")
    why = (f"{EXTENTS_PER_PATCH} x the typical extent of {widest} ({extent:.0f} px) = {want:.0f}"
           f"{f', capped by {capped} ({cap})' if patch == cap and want > cap else ''}"
           f", a multiple of {multiple} (the model's size multiple)")
    return patch, why


def decide_batch(patch: int, memory: int, device: str) -> tuple[int, str]:
    """Batch size from the patch and the memory budget (estimated bytes per training px)."""
    cap = MAX_BATCH_GPU if device.startswith("cuda") else MAX_BATCH_CPU
    fits = int(memory // (patch * patch * TRAIN_BYTES_PER_PX))
    batch = max(MIN_BATCH, min(cap, 2 ** int(math.log2(max(fits, 1)))))
    return batch, (f"{fits} patches of {patch}^2 fit in {memory / 2**30:.1f} GiB at ~{TRAIN_BYTES_PER_PX} B/px; "
                   f"capped at {cap} on {device.split(':')[0]} (more updates per minute), a power of two")


def thin_classes(fp: Fingerprint) -> list[ClassStats]:
    """Object classes at most :data:`THIN_PX` thick (lines, fibres, cracks)."""
    return [c for c in object_classes(fp) if c.thickness_px is not None and c.thickness_px <= THIN_PX]


def decide_model(fp: Fingerprint, base_model: dict[str, Any]) -> tuple[dict[str, Any], Decision | None]:
    """The model to plan for: the base's when it names an architecture or its kwargs (the user's or
    the search's choice); for thin lines (thin classes at least :data:`LINE_ELONGATION` times as long as
    thick) :data:`THIN_MODEL`, since smp's encoders start at stride 2 and their U-Net places every edge
    from 1/2-resolution features, about a pixel off at each border of a 3-5 px line; else the base's
    (TrainConfig's default U-Net)."""
    lines = [c for c in thin_classes(fp) if c.extent_px >= LINE_ELONGATION * c.thickness_px]
    if {"arch", "arch_kwargs"} & base_model.keys() or not lines:
        return base_model, None
    model = {**base_model, **THIN_MODEL}
    encoder = model.get("encoder", ModelConfig().encoder)
    names = ", ".join(f"{c.name} {c.thickness_px:.1f} px thick, {c.extent_px:.0f} px long" for c in lines)
    channels = THIN_MODEL["arch_kwargs"]["full_res_channels"]
    return model, Decision("model", f"{THIN_MODEL['arch']} ({encoder}) + a full-resolution skip of {channels} ch",
                           f"thin lines ({names}): a skip at full resolution keeps both borders, which a "
                           "stride-2 encoder's U-Net places about a pixel off")


def decide_loss(fp: Fingerprint) -> tuple[dict[str, Any], list[Decision]]:
    """Thin or rare classes: recall-weighted Tversky + Focal, class-balanced patches (and inverse-frequency
    weights when very rare); large blobs: Dice + CE."""
    thin = thin_classes(fp)
    rare = [c for c in fp.classes if 0 < c.fraction < RARE_FRACTION]
    very_rare = [c for c in fp.classes if 0 < c.fraction < WEIGHT_FRACTION]
    describe = ", ".join([f"{c.name} {c.thickness_px:.1f} px thick" for c in thin]
                         + [f"{c.name} {100 * c.fraction:.1f} % of px" for c in rare if c not in thin])
    if thin or rare:
        loss = {"terms": {"tversky": 1.0, "focal": 1.0}, "tversky_alpha": 0.3, "tversky_beta": 0.7}
        why = (f"thin or rare classes ({describe}; thin <= {THIN_PX:g} px, rare < {100 * RARE_FRACTION:g} %): "
               "Tversky alpha 0.3 / beta 0.7 (Dice weighted toward recall) + Focal for the hard pixels")
    else:
        loss = {"terms": {"dice": 1.0, "ce": 1.0}}
        why = f"no thin (<= {THIN_PX:g} px) or rare (< {100 * RARE_FRACTION:g} %) class: Dice + CE for large blobs"
    weighting = "inverse_frequency" if very_rare else "none"
    loss["class_weighting"] = weighting
    decisions = [Decision("loss", _terms_text(loss["terms"]), why), Decision(
        "loss.class_weighting", weighting,
        f"{', '.join(c.name for c in very_rare)} below {100 * WEIGHT_FRACTION:g} % of px" if very_rare
        else f"no class below {100 * WEIGHT_FRACTION:g} % of px")]
    return loss, decisions


def _terms_text(terms: dict[str, float]) -> str:
    return " + ".join(f"{w:g} {name}" for name, w in terms.items())


def decide_normalize(fp: Fingerprint, spec: DatasetSpec) -> tuple[dict[str, Any], str]:
    """fits_header for FITS with PEDESTAL; dtype_range for integers that use their range; else percentile."""
    if "normalize" in spec.model_fields_set:
        return spec.normalize.model_dump(exclude_defaults=True) | {"mode": spec.normalize.mode}, \
            "dataset.yaml sets it"
    if fp.has_pedestal:
        return {"mode": "fits_header"}, "the FITS headers carry PEDESTAL (ADU baseline): (x - PEDESTAL) x GAIN"
    if not np.issubdtype(np.dtype(fp.dtype), np.integer):
        return {"mode": "percentile"}, f"{fp.dtype} pixels: robust 0.5/99.5 percentiles"
    if fp.dtype_fraction < 0.25:
        return {"mode": "percentile"}, (f"{fp.dtype} pixels span only {100 * fp.dtype_fraction:.1f} % of the "
                                        "dtype's range: 0.5/99.5 percentiles")
    return {"mode": "dtype_range"}, (f"{fp.dtype} pixels span {100 * fp.dtype_fraction:.0f} % of the dtype's "
                                     "range: divide by the range")


def decide_workers(over: dict[str, Any], workers: int) -> Decision:
    """N data-parallel workers: each keeps the planned batch and steps, so a step costs what was timed,
    the global batch and the patches per epoch grow N x, and the budget's minutes buy about N x the
    samples. The peak lr grows by sqrt(N) (square-root scaling, the rule for Adam-type optimizers,
    Malladi et al. 2022), reached through the one-cycle's warm-up."""
    data, optim = over["data"], over["optim"]
    data["patches_per_epoch"] *= workers
    optim["lr"] = worker_lr(optim["lr"], workers)
    return Decision("workers", f"{workers}: global batch {workers * data['batch_size']}, lr {optim['lr']:g}",
                    f"each of the {workers} data-parallel workers keeps the planned batch {data['batch_size']} and "
                    f"steps (patches_per_epoch x {workers} = {data['patches_per_epoch']}), so the minutes buy "
                    f"~{workers}x the samples of one; lr x sqrt({workers}) (square-root scaling for AdamW: linear "
                    "scaling overshoots with Adam), warmed up by the one-cycle's first 30 %")


def decide_sampling(fp: Fingerprint) -> tuple[bool, Decision]:
    """Class-balanced patches when a class is rare or a class has no objects of its own (a dominant background)."""
    balanced = any(0 < c.fraction < RARE_FRACTION for c in fp.classes) or len(object_classes(fp)) < len(fp.classes)
    why = ("patches centred on a uniformly drawn class, so rare and small objects are seen as often as background"
           if balanced else "no rare class and no dominant background: uniform patches keep the true class mix")
    return balanced, Decision("data.class_balanced", str(balanced).lower(), why)


def data_decisions(fp: Fingerprint, spec: DatasetSpec, model: ModelConfig, multiple: int,
                    dev: str) -> tuple[dict[str, Any], list[Decision]]:
    """The plan's overrides that the data decides before any timing: patch, batch, loss, sampling,
    normalisation, optimiser and validation tile, for ``model``."""
    memory = memory_budget(dev)
    patch, patch_why = decide_patch(fp, multiple, memory)
    batch, batch_why = decide_batch(patch, memory, dev)
    loss, loss_decisions = decide_loss(fp)
    normalize, norm_why = decide_normalize(fp, spec)
    balanced, balanced_decision = decide_sampling(fp)
    val_tile = min(512, round_to(2 * patch, multiple))
    over: dict[str, Any] = {
        "model": {"arch": model.arch, "encoder": model.encoder} | (
            {"arch_kwargs": model.arch_kwargs} if model.arch_kwargs else {}),
        "loss": loss, "normalize": normalize,
        "data": {"patch_size": patch, "batch_size": batch, "class_balanced": balanced, "val_tile": val_tile},
        "optim": {"name": "adamw", "lr": 2e-3, "schedule": "one_cycle"},
    }
    decisions = [
        Decision("data.patch_size", str(patch), patch_why),
        Decision("data.batch_size", str(batch), batch_why),
        *loss_decisions,
        balanced_decision,
        Decision("normalize", normalize["mode"], norm_why),
        Decision("optim", "adamw, lr 0.002, one_cycle", "one-cycle warm-up and anneal suits a fixed step budget"),
        Decision("data.val_tile", str(val_tile), "2 x the patch (fewer tile seams), at most 512"),
    ]
    return over, decisions


def apply_fit(over: dict[str, Any], decisions: list[Decision], fitted: tuple[int, int, str], multiple: int) -> None:
    """Put a step-budget fit's patch and batch (and the val tile that follows the patch) into the plan's
    overrides, and say on each earlier decision it changes what it was."""
    patch, batch, why = fitted
    val_tile = min(512, round_to(2 * patch, multiple))
    over["data"].update(patch_size=patch, batch_size=batch, val_tile=val_tile)
    fitted_values = {"data.patch_size": str(patch), "data.batch_size": str(batch), "data.val_tile": str(val_tile)}
    for d in decisions:
        if d.what in fitted_values and d.value != fitted_values[d.what]:
            d.reason = f"{d.reason} (was {d.value}; fitted to the step budget, below)"
            d.value = fitted_values[d.what]
    decisions.append(Decision("data.patch_size x data.batch_size", f"{patch} x {batch}", why))
