"""Self-configuration before training or search (nnU-Net style): ``gigaseg plan DATA``.

:func:`fingerprint` reads a bounded sample of a dataset (at most ``max_pixels`` image pixels
from at most ``max_images`` images, a centred window of each) and measures what a recipe
depends on: image sizes, channels, dtype and value range, class frequencies and, per class, the
size of its objects (thickness = 2 x the median of the distance transform on the ridge of its
connected components, extent = median of the components' larger bounding-box side).

:func:`plan_training` turns it into a :class:`TrainConfig` with one stated reason per decision
(patch, batch, loss, class balance, normalisation, schedule, steps). The step count fits a time
budget on this machine's measured speed: a few real forward/backward steps of the planned model
at the planned patch are timed. :func:`write_plan` writes the plan as a YAML that
``gigaseg train --config`` accepts, the reasons as comments.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segcore.config import ModelConfig, TrainConfig, load_yaml_config, parse_config
from segcore.data.errors import DataError
from segcore.data.spec import IGNORE, DatasetSpec, load_spec
from segcore.steps import worker_lr

log = logging.getLogger(__name__)

PLAN_FILE = "plan.yaml"
MAX_PIXELS = 16 << 20  # image px read by a fingerprint
MAX_IMAGES = 32  # images opened by a fingerprint
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
MAX_EPOCHS = 40
VAL_SHARE = 0.2  # at most this share of the budget goes to validation
OVERHEAD_SHARE = 0.15  # data loading, halo measurement, model writing
EPOCH_HEADROOM = 3  # a minutes-bound plan may run this many times the epochs its timing planned
MIN_STEPS = 200  # a budget buys at least this many optimizer steps: smaller batches, then patches, first
MEASURE_CPU_PX = 8 * 256 * 256  # on CPU a batch up to this many px is timed as it is (a few seconds a step)
MIN_FIT_BATCH = 4  # ... but batches stay at least this big (batch norm)


# ----------------------------------------------------------------------------- fingerprint


@dataclass
class ClassStats:
    """One class in the sample: share of labelled px and the size of its connected components."""

    name: str
    fraction: float
    components: int = 0
    thickness_px: float | None = None
    extent_px: float | None = None


@dataclass
class Fingerprint:
    """What a dataset looks like, measured on a bounded sample (see the module doc)."""

    data_dir: str
    n_images: int
    sampled_images: int
    pixels_read: int
    median_size: tuple[int, int]
    min_side: int
    total_pixels: int
    channels: int
    dtype: str
    value_range: tuple[float, float]  # (0.5, 99.5) percentiles of the sampled pixels
    dtype_fraction: float  # share of an integer dtype's range the sample spans (1 for floats)
    has_pedestal: bool
    mask_scale: float
    classes: list[ClassStats] = field(default_factory=list)

    def summary(self) -> str:
        """One line per fact, for the CLI."""
        h, w = self.median_size
        lines = [f"{self.n_images} images ({self.sampled_images} sampled, {self.pixels_read:,} px read), "
                 f"median {h} x {w} px, {self.channels} channel(s), {self.dtype}, "
                 f"values {self.value_range[0]:g}..{self.value_range[1]:g}"]
        for c in self.classes:
            size = (f"thickness {c.thickness_px:.1f} px, extent {c.extent_px:.0f} px ({c.components} objects)"
                    if c.thickness_px is not None else "no objects in the sample")
            lines.append(f"class {c.name}: {100 * c.fraction:.2f} % of px, {size}")
        return "\n".join(lines)


def object_sizes(binary: np.ndarray) -> tuple[int, float | None, float | None]:
    """(components, thickness, extent) of the objects in a boolean mask.

    Thickness: 2 x the median distance-transform value on the ridge (local maxima) of the
    components, i.e. their typical width; extent: the median larger bounding-box side.
    """
    from scipy import ndimage

    labels, n = ndimage.label(binary)
    if n == 0:
        return 0, None, None
    dist = ndimage.distance_transform_edt(binary)
    ridge = binary & (dist >= ndimage.maximum_filter(dist, size=3))
    thickness = 2.0 * float(np.median(dist[ridge]))
    sides = [max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndimage.find_objects(labels)]
    return n, thickness, float(np.median(sides))


def _image_files(data_dir: Path) -> list[Path]:
    from segcore.data.dataset import _index_files

    return [p for paths in _index_files(data_dir / "images").values() for p in paths]


def _spread_pick(items: list[Any], n: int) -> list[Any]:
    """``n`` items evenly spread over ``items`` (deterministic)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] if n > 1 else items[0] for i in range(n)]


def _window(shape: tuple[int, int], max_px: int) -> tuple[slice, slice]:
    """A centred window of at most ``max_px`` pixels."""
    h, w = shape
    side = max(16, int(math.sqrt(max_px)))
    wh, ww = min(h, side), min(w, side)
    if wh * ww > max_px and wh < side:  # a thin image: widen the other side
        ww = min(w, max_px // max(wh, 1))
    if ww * wh > max_px and ww < side:
        wh = min(h, max_px // max(ww, 1))
    top, left = (h - wh) // 2, (w - ww) // 2
    return slice(top, top + wh), slice(left, left + ww)


@dataclass
class _Reading:
    """Accumulated sample of several images."""

    values: list[np.ndarray] = field(default_factory=list)
    counts: np.ndarray | None = None
    masks: list[np.ndarray] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    pixels: int = 0
    channels: int = 1
    dtype: str = "uint8"
    pedestal: bool = False
    mask_scale: float = 1.0


def _read_one(image: Path, spec: DatasetSpec, masks: dict[str, list[Path]], budget: int, acc: _Reading) -> None:
    """Read a window of each image of ``image`` (FITS: each HDU) and its mask into ``acc``."""
    from segcore.data.dataset import _find_mask, _mask_stem, _read_mask_for
    from segcore.data.io import RawImage, open_image_sources

    stem = _mask_stem(image, spec, masks)
    sources = open_image_sources(image)
    try:
        for src in sources:
            raw = RawImage(src.name, np.empty(0), src.header, max(src.index, 0), getattr(src, "extname", None))
            mask_path, from_fits = _find_mask(image, raw, len(sources), stem, masks)
            mask = _read_mask_for(raw, mask_path, from_fits, spec)
            scale = spec.mask_scale_for(src.shape, mask.shape, f"{image} (mask {mask_path.name})")
            rows, cols = _window(src.shape, max(256, budget // len(sources)))
            pixels = np.asarray(src.read(rows, cols))
            mrows = slice(int(rows.start / scale), max(int(rows.start / scale) + 1, int(rows.stop / scale)))
            mcols = slice(int(cols.start / scale), max(int(cols.start / scale) + 1, int(cols.stop / scale)))
            acc.values.append(pixels.reshape(-1, src.channels)[:: max(1, pixels.size // (1 << 18))])
            acc.masks.append(mask[mrows, mcols])
            acc.shapes.append(tuple(int(v) for v in src.shape))
            acc.pixels += int(pixels.shape[0] * pixels.shape[1])
            acc.channels, acc.dtype, acc.mask_scale = src.channels, str(src.dtype), scale
            acc.pedestal |= bool(src.header and "PEDESTAL" in src.header)
    finally:
        for src in sources:
            src.close()


def _class_stats(spec: DatasetSpec, masks: list[np.ndarray], scale: float) -> list[ClassStats]:
    """Per class: labelled share and object sizes (in image px: mask px x ``scale``)."""
    k = spec.num_classes
    counts = sum(np.bincount(m[m != IGNORE].ravel().astype(np.int64), minlength=k)[:k] for m in masks)
    total = max(int(np.sum(counts)), 1)
    out = []
    for cid, name in enumerate(spec.class_names):
        n, thick, extent = 0, [], []
        for m in masks:
            c, t, e = object_sizes(m == cid)
            if c:
                n, thick, extent = n + c, thick + [t], extent + [e]
        out.append(ClassStats(name, float(counts[cid]) / total, n,
                              float(np.median(thick)) * scale if thick else None,
                              float(np.median(extent)) * scale if extent else None))
    return out


def fingerprint(data_dir: str | Path, max_pixels: int = MAX_PIXELS, max_images: int = MAX_IMAGES) -> Fingerprint:
    """Measure a dataset on at most ``max_pixels`` image px of at most ``max_images`` images."""
    from segcore.data.dataset import _index_files

    data_dir = Path(data_dir)
    spec = load_spec(data_dir)
    files = _image_files(data_dir)
    if not files:
        raise DataError(data_dir / "images", "no images (PNG, JPEG, TIFF or FITS) found", "add images")
    picked = _spread_pick(files, max_images)
    masks, acc = _index_files(data_dir / "masks"), _Reading()
    for image in picked:
        _read_one(image, spec, masks, max_pixels // len(picked), acc)
    values = np.concatenate(acc.values).astype(np.float64)
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    heights, widths = zip(*acc.shapes)
    per_image = float(np.mean([h * w for h, w in acc.shapes]))
    return Fingerprint(
        data_dir=str(data_dir), n_images=len(files), sampled_images=len(picked), pixels_read=acc.pixels,
        median_size=(int(np.median(heights)), int(np.median(widths))), min_side=int(min(min(heights), min(widths))),
        total_pixels=int(per_image * len(files) * len(acc.shapes) / len(picked)), channels=acc.channels,
        dtype=acc.dtype, value_range=(low, high), dtype_fraction=_dtype_fraction(acc.dtype, low, high),
        has_pedestal=acc.pedestal, mask_scale=acc.mask_scale, classes=_class_stats(spec, acc.masks, acc.mask_scale),
    )


def _dtype_fraction(dtype: str, low: float, high: float) -> float:
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.integer):
        return 1.0
    info = np.iinfo(dt)
    return (high - low) / (float(info.max) - float(info.min))


# ----------------------------------------------------------------------------- decisions


@dataclass
class Decision:
    """One planned setting: the TrainConfig keys it sets and why."""

    what: str
    value: str
    reason: str


@dataclass
class Speed:
    """Measured seconds per training step (planned batch) and per forward px (validation)."""

    device: str
    step_s: float
    forward_px_s: float
    measured_batch: int
    threads: int = 0  # torch CPU threads it was timed with
    bf16: bool = False  # timed under bf16 autocast, as training will run


@dataclass
class Plan:
    """A planned TrainConfig, the partial dict the plan decided, the fingerprint and the reasons."""

    config: TrainConfig
    overrides: dict[str, Any]
    fingerprint: Fingerprint
    decisions: list[Decision]
    speed: Speed | None = None
    budget_min: float = 5.0
    base: dict[str, Any] = field(default_factory=dict)  # the partial config planned on top of

    def lines(self) -> list[str]:
        """``what = value: reason``, one per decision."""
        return [f"{d.what} = {d.value}: {d.reason}" for d in self.decisions]


def _objects(fp: Fingerprint) -> list[ClassStats]:
    """The object classes: all but a dominant background (> 50 % of px, or class 0 at > 30 %)."""
    ranked = sorted(fp.classes, key=lambda c: c.fraction, reverse=True)
    background = ranked[0] if ranked and (ranked[0].fraction > 0.5 or (ranked[0] is fp.classes[0]
                                                                       and ranked[0].fraction > 0.3)) else None
    return [c for c in fp.classes if c is not background and c.extent_px is not None]


def _round_to(value: float, multiple: int, up: bool = True) -> int:
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
    objects = _objects(fp)
    extent = max((c.extent_px for c in objects), default=fp.min_side / EXTENTS_PER_PATCH)
    widest = max(objects, key=lambda c: c.extent_px).name if objects else "images"
    mem_cap = int(math.sqrt(memory / (MIN_BATCH * TRAIN_BYTES_PER_PX)))
    cap = max(multiple, _round_to(min(fp.min_side, mem_cap, MAX_PATCH), multiple, up=False))
    want = max(MIN_PATCH, EXTENTS_PER_PATCH * extent)
    patch = min(_round_to(want, multiple), cap)
    capped = ("the smallest image side" if cap == _round_to(fp.min_side, multiple, up=False)
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
    return [c for c in _objects(fp) if c.thickness_px is not None and c.thickness_px <= THIN_PX]


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


# ----------------------------------------------------------------------------- speed and steps


def measure_speed(cfg: TrainConfig, channels: int, classes: int, device: str = "auto", steps: int = 2) -> Speed:
    """Time ``steps`` real forward/backward/optimizer steps (after two warm-ups; the fastest counts) of
    ``cfg``'s model at its patch size and memory format, as training runs it, and one forward pass.
    On CPU a batch beyond :data:`MEASURE_CPU_PX` is timed at 4 and scaled linearly (which
    overestimates: a bigger batch costs less per patch)."""
    import torch

    from segcore.losses import build_loss
    from segcore.modeldir import pick_device, train_autocast
    from segcore.models import build_model

    dev = pick_device(device if device != "auto" else cfg.device)
    batch, patch = cfg.data.batch_size, cfg.data.patch_size
    measured = batch if dev.type == "cuda" or batch * patch * patch <= MEASURE_CPU_PX else min(batch, 4)
    torch.manual_seed(0)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.model.model_copy(update={"in_channels": channels, "classes": classes}))
    model = model.to(dev, memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    loss_fn = build_loss(cfg.loss, classes, None).to(dev)
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
    extent = max((c.extent_px for c in _objects(fp)), default=MIN_PATCH)
    floor = min(patch, max(MIN_PATCH, _round_to(extent, multiple)))
    new_patch = max(floor, _round_to(patch * math.sqrt(share * batch / new_batch), multiple, up=False))
    if (new_patch, new_batch) == (patch, batch):
        return None
    return new_patch, new_batch, (
        f"{patch}^2 x {batch} buys only {steps:.0f} steps in {budget_min:g} min at {speed.step_s:.2f} s/step; "
        f"{new_patch}^2 x {new_batch} (patch at least one object extent, {floor} px) aims at {MIN_STEPS}")


# ----------------------------------------------------------------------------- plan


def _time_steps(cfg: TrainConfig, fp: Fingerprint, classes: int, dev: str, steps: int, threads: int | None) -> Speed:
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
    balanced = any(0 < c.fraction < RARE_FRACTION for c in fp.classes) or len(_objects(fp)) < len(fp.classes)
    why = ("patches centred on a uniformly drawn class, so rare and small objects are seen as often as background"
           if balanced else "no rare class and no dominant background: uniform patches keep the true class mix")
    return balanced, Decision("data.class_balanced", str(balanced).lower(), why)


def _data_decisions(fp: Fingerprint, spec: DatasetSpec, model: ModelConfig, multiple: int,
                    dev: str) -> tuple[dict[str, Any], list[Decision]]:
    """The plan's overrides that the data decides before any timing: patch, batch, loss, sampling,
    normalisation, optimiser and validation tile, for ``model``."""
    memory = memory_budget(dev)
    patch, patch_why = decide_patch(fp, multiple, memory)
    batch, batch_why = decide_batch(patch, memory, dev)
    loss, loss_decisions = decide_loss(fp)
    normalize, norm_why = decide_normalize(fp, spec)
    balanced, balanced_decision = decide_sampling(fp)
    val_tile = min(512, _round_to(2 * patch, multiple))
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


def _fit_steps(over: dict[str, Any], decisions: list[Decision], base: dict[str, Any], fp: Fingerprint,
               budget_min: float, multiple: int, timing: tuple[int, str, int, int | None]) -> Speed:
    """Time the planned steps, refit patch x batch where the budget holds too few steps
    (:func:`fit_to_steps`), and put the epochs x patches that fill ``budget_min`` into ``over``.
    ``timing`` = (classes, device, steps to time, torch threads)."""
    classes, dev, time_steps, threads = timing
    cfg = parse_config(_merge(base, over), TrainConfig, source="plan")
    speed = _time_steps(cfg, fp, classes, dev, time_steps, threads)
    fitted = fit_to_steps(fp, cfg, speed, budget_min, multiple)
    if fitted is not None:
        apply_fit(over, decisions, fitted, multiple)
        cfg = parse_config(_merge(base, over), TrainConfig, source="plan")
        speed = _time_steps(cfg, fp, classes, dev, time_steps, threads)
    steps, steps_why = decide_steps(fp, cfg, speed, budget_min)
    over["epochs"] = steps["epochs"]
    over["data"]["patches_per_epoch"] = steps["patches_per_epoch"]
    decisions.append(Decision("epochs x data.patches_per_epoch", f"{steps['epochs']} x {steps['patches_per_epoch']}",
                              steps_why))
    return speed


def plan_training(data_dir: str | Path, budget_min: float = 5.0, *, base: dict[str, Any] | None = None,
                  device: str = "auto", fp: Fingerprint | None = None, time_steps: int = 4,
                  threads: int | None = None, until_minutes: bool = False, workers: int = 1) -> Plan:
    """Fingerprint ``data_dir`` (unless given) and plan a TrainConfig for ``budget_min`` minutes.

    ``threads``: time the steps with this many torch CPU threads (a search trial's CPUs), not the
    process's; ignored on a GPU.

    ``until_minutes``: the run stops when the budget's minutes end (:func:`bound_by_minutes`), not
    after the epochs the timing planned (``gigaseg train --budget-min``, ``gigaseg plan``; a search
    sets its trials' minutes itself).

    ``workers``: the run trains on this many data-parallel workers, each timed as one
    (:func:`decide_workers`: same per-worker batch and steps, N x the patches, lr x sqrt(N)).

    ``base`` (a partial TrainConfig dict) supplies the model to plan for; the plan's own keys
    are in ``Plan.overrides`` (what a search merges under its explicit ``base``).
    """
    from segcore.modeldir import pick_device
    from segcore.models.validity import input_multiple

    fp = fp or fingerprint(data_dir)
    spec = load_spec(data_dir)
    model, model_decision = decide_model(fp, dict((base or {}).get("model", {})))
    given, base = dict(base or {}), {**(base or {}), "model": model}
    base_cfg = parse_config(base, TrainConfig, source="plan base")
    dev = str(pick_device(device if device != "auto" else base_cfg.device))
    m = base_cfg.model
    multiple = input_multiple(m.arch, m.encoder, m.arch_kwargs)
    over, decisions = _data_decisions(fp, spec, m, multiple, dev)
    decisions[:0] = [model_decision] if model_decision else []
    speed = _fit_steps(over, decisions, base, fp, budget_min, multiple,
                       (max(len(spec.class_names), 2), dev, time_steps, threads))
    if workers > 1:
        decisions.append(decide_workers(over, workers))
    if until_minutes:
        decisions.append(bound_by_minutes(over, budget_min))
    cfg = parse_config(_merge(base, over), TrainConfig, source="plan")
    return Plan(cfg, over, fp, decisions, speed, budget_min, given)


def apply_fit(over: dict[str, Any], decisions: list[Decision], fitted: tuple[int, int, str], multiple: int) -> None:
    """Put a step-budget fit's patch and batch (and the val tile that follows the patch) into the plan's
    overrides, and say on each earlier decision it changes what it was."""
    patch, batch, why = fitted
    val_tile = min(512, _round_to(2 * patch, multiple))
    over["data"].update(patch_size=patch, batch_size=batch, val_tile=val_tile)
    fitted_values = {"data.patch_size": str(patch), "data.batch_size": str(batch), "data.val_tile": str(val_tile)}
    for d in decisions:
        if d.what in fitted_values and d.value != fitted_values[d.what]:
            d.reason = f"{d.reason} (was {d.value}; fitted to the step budget, below)"
            d.value = fitted_values[d.what]
    decisions.append(Decision("data.patch_size x data.batch_size", f"{patch} x {batch}", why))


# Free dicts inside a TrainConfig are values (a base's loss.terms replaces the plan's mix whole).
_SECTIONS = {"model", "loss", "freeze", "augment", "data", "optim", "normalize", "loss.adversarial"}


def merge_under(explicit: dict[str, Any], planned: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``planned`` with every key of ``explicit`` on top, key by key inside config sections."""
    out = dict(planned)
    for key, value in explicit.items():
        path = f"{prefix}{key}"
        if path in _SECTIONS and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_under(value, out[key], path + ".")
        else:
            out[key] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """The plan on top of the model base (planning itself decides the listed keys)."""
    return merge_under(over, base)


# ----------------------------------------------------------------------------- YAML


def plan_yaml(plan: Plan) -> str:
    """The plan as a TrainConfig YAML; the fingerprint and each decision's reason as comments."""
    head = [f"# gigaseg plan {plan.fingerprint.data_dir} (budget {plan.budget_min:g} min)"]
    head += [f"#   {line}" for line in plan.fingerprint.summary().splitlines()]
    head += [f"# {line}" for line in plan.lines()]
    body = yaml.safe_dump(_merge(plan.base, plan.overrides), sort_keys=False, default_flow_style=None, width=100)
    return "\n".join(head) + "\n" + body


def write_plan(plan: Plan, path: str | Path) -> Path:
    """Write :func:`plan_yaml` to ``path`` and check it loads back as the same TrainConfig."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan_yaml(plan))
    if load_yaml_config(path) != plan.config:
        raise DataError(path, "the written plan does not load back as the planned config", "report this bug")
    return path


# ----------------------------------------------------------------------------- CLI


def run_plan(args: argparse.Namespace) -> int:
    """``gigaseg plan DATA``: print the fingerprint and the plan, write the YAML."""
    base = load_yaml_config(args.base).model_dump(mode="json", exclude_unset=True) if args.base else None
    fp = fingerprint(args.data, max_pixels=args.max_pixels)
    plan = plan_training(args.data, args.budget_min, base=base, device=args.device, fp=fp, until_minutes=True)
    out = write_plan(plan, args.out or Path(args.data) / PLAN_FILE)
    print(fp.summary())
    print(f"plan for {args.budget_min:g} min:")
    for line in plan.lines():
        print(f"  {line}")
    print(f"written to {out} (train with: gigaseg train --data {args.data} --config {out} --out MODEL)")
    return 0


def register_plan(sub: argparse._SubParsersAction) -> None:
    """Entry point ``gigaseg.commands: plan``."""
    p = sub.add_parser("plan", help="fingerprint a dataset and plan a training config for a time budget")
    p.add_argument("data", help="dataset folder with images/, masks/, dataset.yaml")
    p.add_argument("--out", type=Path, help=f"plan YAML to write (default DATA/{PLAN_FILE})")
    p.add_argument("--budget-min", type=float, default=5.0, help="training time budget in minutes (default 5)")
    p.add_argument("--base", help="train.yaml whose model (and other keys) the plan starts from")
    p.add_argument("--device", default="auto", help="device to time steps on (default: auto)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="image px the fingerprint reads at most")
    p.set_defaults(func=run_plan)
