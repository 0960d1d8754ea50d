"""The one training function: ``gigaseg train`` and every search trial call :func:`train`.

It draws random (optionally class-balanced) patches for training, validates on whole
images tiled exactly like inference, and writes a model directory. Hooks:

* ``callbacks`` receive an :class:`EpochReport` after every epoch (Tune, MLflow, logging);
* ``resume_from`` continues from a checkpoint written by ``EpochReport.save_checkpoint``;
* when a ``torch.distributed`` process group is initialised (e.g. by a Ray Train worker),
  the model is wrapped in DDP, patches are sharded per rank, and validation confusion
  matrices are summed across ranks. segcore itself never imports Ray.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from segcore.adversarial import AdversarialTerm, build_adversarial
from segcore.config import ModelConfig, TrainConfig
from segcore.data import PatchDataset, Sample, build_augmentation, load_samples, load_spec
from segcore.data.lazy import LazyPatchDataset, TrainData, build_lazy_data, use_lazy
from segcore.data.normalize import input_range
from segcore.data.spec import DatasetSpec
from segcore.device import pick_device, train_autocast
from segcore.halo import card_halo
from segcore.losses import build_loss, inverse_frequency_weights
from segcore.metrics import (
    ConfusionMatrix,
    flat_metrics,
    threshold_candidates,
    threshold_from_histograms,
    threshold_histograms,
)
from segcore.modelio.card import INPUT_RANGE_KEY, WEIGHTS_FILE, ModelCard, read_single_card
from segcore.modelio.folder import logits_to_proba, save_model_dir
from segcore.models import build_model, check_combination
from segcore.models.freeze import FreezeController
from segcore.models.validity import input_multiple
from segcore.schedules import BudgetedOneCycle
from segcore.tiling import pad_to_multiple, predict_tiled
from segcore.visualize import save_prediction_panel

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
THRESHOLDS = threshold_candidates()  # binary heads: the threshold grid searched after every epoch


@dataclass
class EpochReport:
    """What a callback sees after each epoch; ``save_checkpoint(dir)`` makes a resumable checkpoint."""

    epoch: int
    metrics: dict[str, float]
    is_last: bool
    save_checkpoint: Callable[[Path], None]
    rank: int = 0
    world_size: int = 1


EpochCallback = Callable[[EpochReport], None]


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    confusion: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """Everything built once per training run (keeps function signatures short)."""

    cfg: TrainConfig
    card: ModelCard
    model: torch.nn.Module
    freeze: FreezeController
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    loss_fn: torch.nn.Module
    loader: DataLoader
    patches: PatchDataset | LazyPatchDataset
    val_samples: list[Sample]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    history: list[dict[str, float]] = field(default_factory=list)
    adversarial: AdversarialTerm | None = None  # pix2pix discriminator; None when loss.adversarial.weight is 0

    @property
    def bare_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)


# ----------------------------------------------------------------------------- data


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/val split by whole image (never by patch, so no leakage)."""
    if len(samples) < 2 or val_fraction <= 0:
        if val_fraction > 0:
            log.warning("only %d image(s): validating on the training image(s)", len(samples))
        return samples, samples
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = min(len(samples) - 1, max(1, round(val_fraction * len(samples))))
    val_idx = set(order[:n_val].tolist())
    return [s for i, s in enumerate(samples) if i not in val_idx], [samples[i] for i in sorted(val_idx)]


def resolve_normalize(cfg: TrainConfig, spec: DatasetSpec, data_dir: str | Path) -> DatasetSpec:
    """One precedence for normalisation: a ``normalize`` the train config sets explicitly wins;
    otherwise dataset.yaml's (default ``dtype_range``) applies. Returns the spec to load with."""
    if "normalize" in cfg.model_fields_set and cfg.normalize != spec.normalize:
        log.info("normalize: %s from the train config (dataset.yaml in %s says %s)",
                 cfg.normalize.model_dump(exclude_defaults=True) or {"mode": cfg.normalize.mode}, data_dir,
                 spec.normalize.model_dump(exclude_defaults=True) or {"mode": spec.normalize.mode})
        return spec.model_copy(update={"normalize": cfg.normalize})
    log.info("normalize: %s from %s", spec.normalize.model_dump(exclude_defaults=True) or {"mode": spec.normalize.mode},
             "dataset.yaml" if "normalize" in spec.model_fields_set else "the default")
    return spec


def _fit_config_to_data(cfg: TrainConfig, spec: DatasetSpec, channels: int) -> TrainConfig:
    """Take channels and classes from the dataset, and the normalisation the samples were loaded
    with (see :func:`resolve_normalize`), so the saved config is complete and truthful."""
    num_classes = len(spec.class_names)
    binary_head = num_classes == 2 and any(t == "bce" for t in _all_loss_terms(cfg))
    model = cfg.model.model_copy(
        update={"in_channels": channels, "classes": 1 if binary_head else num_classes}
    )
    if cfg.freeze.strategy == "random-init":
        model = model.model_copy(update={"encoder_weights": None})
    return cfg.model_copy(update={"model": model, "normalize": spec.normalize})


def _all_loss_terms(cfg: TrainConfig) -> set[str]:
    terms = set(cfg.loss.terms)
    for phase in cfg.loss.schedule:
        terms |= set(phase.terms)
    return terms


def _make_loader(cfg: TrainConfig, patches: PatchDataset, rank: int, world: int) -> DataLoader:
    sampler = DistributedSampler(patches, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    return DataLoader(
        patches,
        batch_size=cfg.data.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        drop_last=len(patches) // world >= cfg.data.batch_size,
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


# ----------------------------------------------------------------------------- build


def _build_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
    optim_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    return optim_cls(groups, lr=o.lr, weight_decay=o.weight_decay)


def _build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Stepped once per batch. Cosine warm restarts (as the SEM study) or one-cycle; one-cycle under
    ``max_minutes`` is fitted to the minutes (:mod:`segcore.schedules`)."""
    o = cfg.optim
    if o.schedule == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=o.restart_epochs * steps_per_epoch)
    if o.schedule == "one_cycle" and cfg.max_minutes is not None:  # anneal when the minutes run out
        return BudgetedOneCycle(optimizer, cfg.epochs * steps_per_epoch)
    if o.schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=cfg.epochs * steps_per_epoch,
        )
    return None


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device_for(cfg: TrainConfig, rank: int, world: int) -> torch.device:
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1 and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _class_weights(cfg: TrainConfig, masks: list[np.ndarray], num_classes: int) -> torch.Tensor | None:
    if cfg.loss.class_weighting != "inverse_frequency":
        return None
    weights = inverse_frequency_weights(masks, num_classes)
    log.info("inverse-frequency class weights: %s", np.round(weights, 3).tolist())
    return torch.as_tensor(weights, dtype=torch.float32)


def _load_data(cfg: TrainConfig, spec: DatasetSpec, data_dir: str | Path, val_dir: str | Path | None) -> TrainData:
    """Training patches and validation samples: read lazily from the files for whole scans, coarse
    masks or ``data.scale != 1`` (:mod:`segcore.data.lazy`), else whole images split by image."""
    augment = build_augmentation(cfg.augment.strength)
    k = len(spec.class_names)
    val_spec = load_spec(val_dir).model_copy(update={"normalize": spec.normalize}) if val_dir else None
    if use_lazy(cfg.data.loader, cfg.data.scale, spec, data_dir):
        return build_lazy_data(cfg.data, spec, data_dir, seed=cfg.seed, num_classes=k, augment=augment,
                               val_dir=val_dir, val_spec=val_spec)
    samples = load_samples(data_dir, spec)
    train_s, val_s = ((samples, load_samples(val_dir, val_spec)) if val_dir
                      else split_samples(samples, cfg.data.val_fraction, cfg.seed))
    patches = PatchDataset(train_s, cfg.data.patch_size, cfg.data.patches_per_epoch, cfg.data.class_balanced,
                           augment=augment, seed=cfg.seed, num_classes=k)
    return TrainData(patches, val_s, train_s[0].image.shape[0], input_range([s.image for s in train_s]),
                     [s.mask for s in train_s])


def build_run(cfg: TrainConfig, data_dir: str | Path, val_dir: str | Path | None = None) -> _Run:
    """Load data, fit the config to it, build model, optimiser, scheduler and loss."""
    rank, world = _dist_info()
    spec = resolve_normalize(cfg, load_spec(data_dir), data_dir)
    data = _load_data(cfg, spec, data_dir, val_dir)
    cfg = _fit_config_to_data(cfg, spec, data.channels)
    check_combination(cfg.model.arch, cfg.model.encoder, cfg.model.in_channels, cfg.data.patch_size,
                      arch_kwargs=cfg.model.arch_kwargs)
    torch.manual_seed(cfg.seed)
    device = _device_for(cfg, rank, world)
    if train_autocast(device, cfg.amp) and device.type == "cpu":
        log.info("amp: training steps in bf16 autocast on this CPU (native bf16); validation in fp32")
    model = build_model(_local_init_weights(cfg.model), load_weights=True).to(device)
    if cfg.channels_last:  # faster on CPUs too: x1.1-1.5 per training step on a 2-core EPYC, every arch
        model = model.to(memory_format=torch.channels_last)
    freeze = FreezeController(model, cfg.freeze, cfg.optim.lr)
    optimizer = _build_optimizer(cfg, freeze.param_groups())
    if world > 1:
        # smp keeps encoder stages that encoder_depth < 5 never runs, and frozen encoders get no grads
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    patches = data.patches
    loader = _make_loader(cfg, patches, rank, world)
    scheduler = _build_scheduler(cfg, optimizer, max(1, len(loader)))
    loss_fn = build_loss(cfg.loss, len(spec.class_names), _class_weights(cfg, data.masks, len(spec.class_names)))
    card = ModelCard(train=cfg, class_names=list(spec.class_names), class_colors=_spec_colors(spec),
                     extra={INPUT_RANGE_KEY: list(data.input_range)})
    adversarial = build_adversarial(cfg, len(spec.class_names), device, world)  # last: weight 0 draws no RNG
    return _Run(cfg, card, model, freeze, optimizer, scheduler, loss_fn.to(device), loader, patches, data.val_samples, device, rank, world,
                adversarial=adversarial)


def _local_init_weights(model: ModelConfig) -> ModelConfig:
    """``model`` with ``init_weights`` (a folder, a weights file or an MLflow URI) resolved to a local
    path, so segcore.models reads only local files; the card keeps the reference as written."""
    if model.init_weights is None:
        return model
    from segcore.modelio.ref import local_dir

    return model.model_copy(update={"init_weights": str(local_dir(model.init_weights))})


def _spec_colors(spec) -> list[tuple[int, int, int]] | None:
    """One display colour per class: the first palette colour of each class, if the spec has any."""
    colors = getattr(spec, "display_colors", None)
    return colors() if callable(colors) else None


# ----------------------------------------------------------------------------- epochs


def train_one_epoch(run: _Run, epoch: int) -> float:
    """One pass over this epoch's patches; returns the mean training loss on this rank."""
    run.freeze.on_epoch_start(epoch)
    run.freeze.train_mode()
    run.loss_fn.set_epoch(epoch)
    run.patches.set_epoch(epoch)
    if isinstance(run.loader.sampler, DistributedSampler):
        run.loader.sampler.set_epoch(epoch)
    use_amp = train_autocast(run.device, run.cfg.amp)
    total, count = 0.0, 0
    for images, masks in run.loader:
        images, masks = images.to(run.device, non_blocking=True), masks.to(run.device, non_blocking=True)
        if run.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        run.optimizer.zero_grad(set_to_none=True)  # frozen params keep grad None -> optimiser skips them
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = run.model(images)
        loss = run.loss_fn(logits.float(), masks)
        if run.adversarial is None:
            loss.backward()
        else:  # pix2pix: discriminator step on detached predictions; generator gets + weight x adversarial
            run.adversarial.discriminator_step(images, masks, logits)
            (loss + run.adversarial.generator_loss(images, logits)).backward()  # train_loss stays the seg loss
        run.optimizer.step()
        if run.scheduler is not None:
            run.scheduler.step()
        total += float(loss.detach()) * images.shape[0]
        count += images.shape[0]
    return total / max(count, 1)


def predict_logits(run: _Run, image: np.ndarray) -> np.ndarray:
    """Whole-image logits (K, H, W) through the same tiler as inference."""
    model = run.bare_model.eval()
    use_amp = run.device.type == "cuda" and run.cfg.amp

    @torch.inference_mode()
    def forward(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=use_amp):
            return model(x).float().cpu().numpy()

    multiple = input_multiple(run.cfg.model.arch, run.cfg.model.encoder, run.cfg.model.arch_kwargs)
    tile = max(multiple, math.ceil(run.cfg.data.val_tile / multiple) * multiple)
    return predict_tiled(image, pad_to_multiple(forward, multiple), tile=tile, halo=run.cfg.data.val_halo,
                         batch_size=run.cfg.data.batch_size)


def validate(run: _Run) -> tuple[dict[str, float], ConfusionMatrix, list[tuple[Sample, np.ndarray]]]:
    """Tiled whole-image validation on this rank's share of images; confusion summed over ranks.

    A 1-channel binary head first picks its threshold on this epoch's validation pixels (of all
    ranks), then is scored with it, so the metrics describe the model as it is saved.
    """
    binary = run.cfg.model.classes == 1
    mine = run.val_samples[run.rank :: run.world_size]
    losses, outputs = [], []  # outputs: class ids, or foreground probabilities for a binary head
    hist = np.zeros((2, THRESHOLDS.size + 1), dtype=np.int64)
    for sample in mine:
        logits = predict_logits(run, sample.image)
        with torch.no_grad():
            t_logits = torch.from_numpy(logits)[None].to(run.device)
            t_mask = torch.from_numpy(sample.mask)[None].to(run.device)
            losses.append(float(run.loss_fn(t_logits, t_mask)))
        if binary:
            prob = logits_to_proba(torch.from_numpy(logits)[None])[0, 1].numpy()
            hist += threshold_histograms(prob, sample.mask, THRESHOLDS)
            outputs.append(prob)
        else:
            outputs.append(logits.argmax(axis=0))
    if binary:
        threshold, _ = threshold_from_histograms(THRESHOLDS, _all_reduce_sum(run, hist))
        run.card.train = run.card.train.model_copy(update={"binary_threshold": threshold})
        outputs = [(prob >= threshold).astype(np.int64) for prob in outputs]
    cm = ConfusionMatrix(len(run.card.class_names))
    for sample, pred in zip(mine, outputs, strict=True):
        cm.update(pred, sample.mask)
    cm.matrix[...] = _all_reduce_sum(run, cm.matrix)
    metrics = flat_metrics(cm.compute(), run.card.class_names, prefix="val_")
    metrics["val_loss"] = _all_reduce_mean(run, sum(losses), len(losses))
    return metrics, cm, list(zip(mine, outputs, strict=True))


def _all_reduce_mean(run: _Run, total: float, count: int) -> float:
    """``sum(total) / sum(count)`` over the DDP ranks."""
    total, count = _all_reduce_sum(run, np.array([total, count], dtype=np.float64))
    return float(total / max(count, 1))


def _all_reduce_sum(run: _Run, values: np.ndarray) -> np.ndarray:
    """``values`` summed over the DDP ranks (itself when there is one rank)."""
    if run.world_size == 1:
        return values
    t = torch.from_numpy(values).to(run.device)
    dist.all_reduce(t)
    return t.cpu().numpy()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: _Run, epoch: int, directory: Path) -> None:
    """Model directory + optimiser/scheduler state: enough to resume after ``epoch``."""
    directory = Path(directory)
    save_model_dir(directory, run.bare_model, run.card)
    state = {
        "epoch": epoch,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "history": json.dumps(run.history),
    }
    if run.adversarial is not None:  # the discriminator lives in checkpoints, never in the model directory
        state["adversarial"] = run.adversarial.state_dict()
    torch.save(state, directory / STATE_FILE)


def load_checkpoint(run: _Run, directory: Path) -> int:
    """Restore a checkpoint (no pickle: ``weights_only=True``); returns the epoch to start at."""
    from safetensors.torch import load_model

    directory = Path(directory)
    load_model(run.bare_model, str(directory / WEIGHTS_FILE))
    state = torch.load(directory / STATE_FILE, map_location=run.device, weights_only=True)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state["scheduler"] is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.history = json.loads(state["history"])
    follow_changed_lr(run, read_single_card(directory).train.optim.lr)
    if run.adversarial is not None and state.get("adversarial") is not None:
        run.adversarial.load_state_dict(state["adversarial"])
    elif run.adversarial is not None:
        log.warning("%s holds no discriminator state: the discriminator starts from scratch", directory)
    log.info("resumed from %s after epoch %d", directory, state["epoch"])
    return int(state["epoch"]) + 1


LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # what torch's schedulers keep in the param groups


def follow_changed_lr(run: _Run, checkpoint_lr: float) -> None:
    """A resume whose config sets another lr than the checkpoint's (PBT's explore, search/pbt.py)
    rescales the restored optimizer and schedule by new / old, so the schedule keeps its shape and
    position and takes the new peak."""
    ratio = run.cfg.optim.lr / checkpoint_lr
    if math.isclose(ratio, 1.0):
        return
    for group in run.optimizer.param_groups:
        for key in LR_KEYS:
            if key in group:
                group[key] *= ratio
    if run.scheduler is not None and hasattr(run.scheduler, "base_lrs"):
        run.scheduler.base_lrs = [b * ratio for b in run.scheduler.base_lrs]
        run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    log.info("resumed with lr %.3g where the checkpoint had %.3g: the schedule is rescaled by %.3g",
             run.cfg.optim.lr, checkpoint_lr, ratio)


def _clock(run: _Run, epoch: int, epoch_s: float) -> dict[str, float]:
    """Cumulative optimizer steps and training minutes after ``epoch`` (search budgets and ASHA count
    these); minutes sum the epochs' wall times, so a resumed run continues its clock."""
    before = run.history[-1].get("train_minutes", 0.0) if run.history else 0.0
    return {"steps": float((epoch + 1) * len(run.loader)), "train_minutes": before + epoch_s / 60.0}


def _out_of_time(metrics: dict[str, float], cfg: TrainConfig) -> bool:
    return cfg.max_minutes is not None and metrics.get("train_minutes", 0.0) >= cfg.max_minutes


# ----------------------------------------------------------------------------- entry point


def train(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    callbacks: Sequence[EpochCallback] = (),
    resume_from: str | Path | None = None,
    val_dir: str | Path | None = None,
) -> TrainResult:
    """Train ``cfg`` on the dataset folder ``data_dir``; write the model directory to ``out_dir``."""
    run = build_run(cfg, data_dir, val_dir)
    start = load_checkpoint(run, Path(resume_from)) if resume_from else 0
    metrics: dict[str, float] = run.history[-1] if run.history else {}
    cm, keep = ConfusionMatrix(len(run.card.class_names)), []
    scored = False  # same on every rank (unlike ``keep``: a rank may hold no validation image)
    for epoch in range(start, run.cfg.epochs):
        if run.history and _out_of_time(run.history[-1], run.cfg):  # resumed after the budget's last epoch
            break
        t0 = time.perf_counter()
        train_loss = train_one_epoch(run, epoch)
        metrics, cm, keep = validate(run)
        scored = True
        epoch_s = _all_reduce_mean(run, time.perf_counter() - t0, 1)  # one value on all ranks: one stop decision
        metrics.update(train_loss=_all_reduce_mean(run, train_loss, 1), lr=run.optimizer.param_groups[-1]["lr"],
                       epoch_time_s=epoch_s, **_clock(run, epoch, epoch_s))
        metrics.update(run.adversarial.epoch_metrics() if run.adversarial is not None else {})
        if isinstance(run.scheduler, BudgetedOneCycle):  # the cycle ends when the minutes do
            metrics["lr_cycle_steps"] = run.scheduler.fit_to_budget(
                metrics["steps"], metrics["train_minutes"] * 60.0, run.cfg.max_minutes * 60.0)
        run.history.append(metrics)
        log.info("epoch %d/%d train_loss %.4f val_loss %.4f val_miou %.4f (%.1fs)", epoch + 1, run.cfg.epochs,
                 metrics["train_loss"], metrics["val_loss"], metrics["val_miou"], metrics["epoch_time_s"])
        last = epoch == run.cfg.epochs - 1 or _out_of_time(metrics, run.cfg)
        report = EpochReport(epoch, dict(metrics), last, partial(save_checkpoint, run, epoch),
                             run.rank, run.world_size)
        for callback in callbacks:
            callback(report)
        if last and epoch < run.cfg.epochs - 1:
            log.info("max_minutes %.3g reached after epoch %d (%.2f min): training stops", run.cfg.max_minutes,
                     epoch + 1, metrics["train_minutes"])
            break
    if not scored:  # resumed from the final checkpoint: score it once so the outputs are complete
        metrics, cm, keep = validate(run)
    run.card.metrics = metrics
    out_dir = Path(out_dir)
    if run.rank == 0:
        run.card.extra.update(card_halo(run.bare_model, run.card, [s.image for s in run.val_samples], run.device))
        write_outputs(run, out_dir, cm, keep)
    return TrainResult(out_dir, metrics, run.history, cm.matrix, run.card.class_names)


def write_outputs(run: _Run, out_dir: Path, cm: ConfusionMatrix, keep: list[tuple[Sample, np.ndarray]]) -> None:
    """The model directory plus metrics.json, confusion_matrix.json and preview.png."""
    save_model_dir(out_dir, run.bare_model, run.card)
    (out_dir / "metrics.json").write_text(json.dumps({"final": run.card.metrics, "history": run.history}, indent=2))
    (out_dir / "confusion_matrix.json").write_text(
        json.dumps({"class_names": run.card.class_names, "matrix": cm.matrix.tolist()}, indent=2)
    )
    if keep:
        sample, pred = keep[0]
        save_prediction_panel(out_dir / "preview.png", sample.image, sample.mask, pred,
                              run.card.class_names, run.card.class_colors)
