"""What a segmentation run does (``SegmentOptions``) and what it needs to know about the model
(``ModelInfo``); both are small JSON-able objects shipped to every Ray task and actor.

The *signature* hashes everything that changes the output bytes (model identity, tiling,
TTA, blending, output arrays), so a rerun resumes only work done under the same signature.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from segcore.config import NormalizeConfig
from segcore.errors import ConfigError
from segcore.modelio import ref as modelref
from segcore.modelio.folder import LoadedModel
from segcore.tiling import round_up

log = logging.getLogger(__name__)

DEFAULT_COLORS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                  (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
DEFAULT_TILE = 512
DEFAULT_HALO = 128  # SegmentOptions default; segment_archive uses default_halo(model) instead
HALO_STRIDES = 4  # default halo = 4 x the model's total stride (128 px for a depth-5 U-Net), see default_halo
HALO_CARD_KEY = "halo"  # ModelCard.extra[HALO_CARD_KEY]: the halo measured for this model
DEFAULT_MAX_OVERHEAD = 1.35  # --max-overhead: interior windows' forward px per output px ((tile + 2 halo) / tile)^2
MEMORY_SHARE = 0.5  # of the node's physical RAM, split over the actors, for one model call
# Peak memory of a forward pass per input pixel, as a share of the sum of every leaf module's output
# bytes (inference frees most activations), per architecture. Measured on CPU, channels-last,
# resnet18 encoder, one 2048^2 forward + softmax + argmax (peak RSS growth / summed leaf bytes),
# times 1.25 for margin: U-Net 413 / 1726 B/px = 0.239 -> 0.30; with BatchNorm folded for inference
# (segcore.models.fold) 332 / 1726 = 0.192 -> 0.24 (others not measured again: the folded peak is
# lower, so their shares only overstate). Segformer's attention maps are no
# leaf's output, so its peak exceeds the sum (1.17). Architectures not measured: PEAK_SHARE_DEFAULT.
PEAK_SHARE = {"Unet": 0.24, "UnetPlusPlus": 0.30, "FPN": 0.63, "DeepLabV3Plus": 0.45, "Linknet": 0.37,
              "MAnet": 0.33, "Segformer": 1.47, "DeepLabV3": 0.26, "PAN": 0.24, "PSPNet": 0.32,
              "UPerNet": 0.86, "ResUNet": 0.42}
PEAK_SHARE_DEFAULT = 1.5
# Most pixels per model call, whatever the memory allows (--memory-gb): bigger calls got slower per
# pixel on a 2-core CPU before BatchNorm folding and huge pages (resnet18 U-Net, channels-last: 0.77 MP/s at 3008 x 4096 = 12.3 MP, 0.66 at 4096^2).
MAX_CALL_PX = 14_000_000
# One model call's activations per worker by default (no --memory-gb; less where half the node's RAM
# over its workers is less). With BatchNorm folded and huge pages, a resnet18 U-Net ran at the same
# rate per pixel from 1 MP calls up (2-core Xeon: 0.79-0.83 MP/s at 1, 4 and 10.6 MP), so bigger
# calls buy only a smaller halo share, while peak RSS grows ~344 B per call px over a ~0.82 GB base
# (U-Net estimate 414 B/px): on a 4096² scan at halo 224, two 9.3 MP strips (x1.11 forward px)
# peaked at 4.0 GB, twice MONAI's sliding window; 4.8 MP calls (2 GB) at 2.46 GB, x1.49 forward px.
# 2.5 GB (6 MP calls) bounds a run at ~2.9 GB whatever the image; --memory-gb trades more for fewer halo px.
DEFAULT_CALL_GB = 2.5
BIG_WINDOW = 1024  # CPU windows (tile + 2 halo) this big or bigger: one actor per node, all its CPUs as threads


class SegmentOptions(BaseModel):
    """Per-run settings that shape the output (all part of the resume signature)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str  # resolved model reference (directory or pinned MLflow URI)
    tile: int = Field(DEFAULT_TILE, ge=16)  # write region edge == output chunk edge
    halo: int = Field(DEFAULT_HALO, ge=0)
    batch_size: int = Field(8, ge=1)  # windows per model call (and per work unit on tiled files)
    # most pixels one model call may evaluate (memory budget / bytes per forward px, set with the
    # tile); a row's windows are predicted as strips within it. None: batch_size windows' worth
    call_px: int | None = Field(None, ge=1)
    # the tile was chosen here, not given: each image may use a smaller one that gives the same number of
    # windows (segcore.tiling.balanced_tile): the same forward px, smaller calls. A given --tile is kept.
    balance_tile: bool = False
    tta: bool = False  # average over flips
    blend_tile: int | None = Field(None, ge=16)  # Gaussian-blended sub-tiles inside each window
    blend_overlap: float = Field(0.5, ge=0.0, lt=1.0)
    only_class: str | None = None  # write a 0/1 mask of this class instead of all labels
    probabilities: bool = False  # also store float16 class probabilities
    uncertainty: bool = False  # also store float16 normalised softmax entropy
    # where labels of a model trained at data.scale > 1 are written: the input's grid (nearest) or the model's
    labels_at: Literal["input", "model"] = "input"
    device: str = "auto"
    # MLflow server the actors download an MLflow model URI from: resolved once on the driver and
    # passed to every actor, so a worker node never falls back to its own environment.
    tracking_uri: str | None = None

    def max_call_px(self) -> int:
        """Pixels one model call may evaluate: ``call_px``, else ``batch_size`` interior windows."""
        return self.call_px or self.batch_size * (self.tile + 2 * self.halo) ** 2

    def signed(self, model_digest: str) -> dict[str, Any]:
        """The settings the resume signature covers (saved with each image's plan, so a re-plan can
        say what changed)."""
        return {**self.model_dump(mode="json", exclude={"device", "tracking_uri"}), "model_digest": model_digest}

    def signature(self, model_digest: str) -> str:
        return hashlib.sha256(json.dumps(self.signed(model_digest), sort_keys=True).encode()).hexdigest()[:16]


class ModelInfo(BaseModel):
    """What the planning and finishing stages need from the model card (no weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str
    digest: str
    class_names: list[str]
    class_colors: list[tuple[int, int, int]]
    normalize: NormalizeConfig
    in_channels: int
    stride: int  # inputs are padded to a multiple of this (LoadedModel.size_multiple)
    input_range: tuple[float, float] | None = None  # normalised range seen in training (card)
    scale: float = 1.0  # image px per model px (card: train.data.scale); windows are read at it

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, ref: str) -> ModelInfo:
        """The card facts the planning and finishing stages need, from a loaded pinned ``ref``."""
        card = loaded.card
        k = len(card.class_names)
        colors = [tuple(int(v) for v in c) for c in (card.class_colors or [])]
        colors += [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(colors), k)]
        return cls(ref=ref, digest=modelref.digest(ref), class_names=list(card.class_names),
                   class_colors=colors[:k], normalize=card.train.normalize,
                   in_channels=card.train.model.in_channels, stride=loaded.size_multiple,
                   input_range=loaded.input_range, scale=float(card.train.data.scale))

    def class_index(self, name: str) -> int:
        if name not in self.class_names:
            raise ConfigError(f"--only-class {name!r}: the model's classes are {self.class_names}; pick one of them")
        return self.class_names.index(name)


def default_halo(loaded: LoadedModel) -> int:
    """The halo recorded on the model card (``extra["halo"]``, measured with bench/halo_seams.py),
    else 4 x the model's total stride: 128 px for a depth-5 U-Net, where a trained resnet18 U-Net
    left 0.14 % of labels different from whole-image prediction (0.9 % at 64 px, < 0.01 % at 160 px)."""
    value: Any = loaded.card.extra.get(HALO_CARD_KEY)
    if isinstance(value, int | float) and value >= 0:
        return int(value)
    return HALO_STRIDES * 2 ** int(loaded.card.train.model.arch_kwargs.get("encoder_depth", 5))


def tile_overhead(tile: int, halo: int) -> float:
    """Forward pixels per output pixel of an interior window (border windows cost less)."""
    return ((tile + 2 * halo) / tile) ** 2


def choose_tile(halo: int, multiple: int, max_overhead: float = DEFAULT_MAX_OVERHEAD,
                max_window_px: float = math.inf) -> int:
    """The smallest multiple of ``multiple`` (and >= 16) whose interior windows cost at most
    ``max_overhead`` forward px per output px at ``halo``, capped so a window of
    ``(tile + 2 halo)^2`` px stays within ``max_window_px``. A pure function: the same inputs
    give the same tile (the tile is part of the resume signature)."""
    if max_overhead <= 1:
        raise ConfigError(f"--max-overhead {max_overhead}: must be above 1 (1 would mean no halo). "
                          f"Use e.g. {DEFAULT_MAX_OVERHEAD}")
    step = max(multiple, 1)
    tile = round_up(max(16, math.ceil(2 * halo / (math.sqrt(max_overhead) - 1)) if halo else 16), step)
    while tile > step and tile_overhead(tile - step, halo) <= max_overhead:  # float rounding of the bound
        tile -= step
    while tile_overhead(tile, halo) > max_overhead:
        tile += step
    cap = (math.isqrt(int(min(max_window_px, 1 << 62))) - 2 * halo) // step * step
    return max(min(tile, cap), round_up(16, step))


def forward_bytes_per_px(loaded: LoadedModel) -> float:
    """Peak bytes of one forward pass per input pixel, estimated from the activations of a probe
    forward on the CPU (the sum of leaf-module output bytes x the architecture's :data:`PEAK_SHARE`):
    deterministic for a given card, unlike a measured RSS."""
    import torch

    model, total = loaded.model, 0
    side = round_up(128, loaded.size_multiple)

    def hook(_mod: Any, _inp: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            param = next(model.parameters())
            model(torch.zeros(1, loaded.card.train.model.in_channels, side, side, dtype=param.dtype,
                              device=param.device))
    finally:
        for h in handles:
            h.remove()
    return peak_share(loaded) * total / side**2


def peak_share(loaded: LoadedModel) -> float:
    """:data:`PEAK_SHARE` of the model's architecture (an ensemble: its members' largest)."""
    cards = [m.card for m in getattr(loaded, "members", [])] or [loaded.card]
    return max(PEAK_SHARE.get(card.train.model.arch, PEAK_SHARE_DEFAULT) for card in cards)


def memory_budget_bytes(actors: int) -> float:
    """One model call's budget per actor: :data:`DEFAULT_CALL_GB`, or :data:`MEMORY_SHARE` of this
    node's physical RAM over ``actors`` if less: total, not free, RAM, so the same machine always
    gets the same tile (free RAM changes from run to run)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(MEMORY_SHARE * total / max(actors, 1), DEFAULT_CALL_GB * 1e9)


def _round_halo(halo: int, multiple: int, given: bool) -> int:
    rounded = round_up(halo, multiple)
    if rounded != halo:
        log.info("halo %d px rounded up to %d px, a multiple of the model's size multiple %d, so every window "
                 "meets the model at the whole image's stride phase%s", halo, rounded, multiple,
                 " (--halo)" if given else "")
    return rounded


def resolve_tiling(loaded: LoadedModel, options: dict[str, Any], actors: int | None = None) -> dict[str, Any]:
    """``options`` with the halo (``--halo``, else the card's, rounded up to the size multiple),
    the tile (``--tile`` if given, which must be a multiple of it, else :func:`choose_tile` within
    the memory budget: ``memory_gb`` per worker if given, else :func:`tile_within_memory`) and a
    ``batch_size`` that fits the budget; ``max_overhead`` and ``memory_gb`` are consumed."""
    out, multiple = dict(options), loaded.size_multiple
    out["tta"] = card_tta(loaded, out.get("tta"))
    max_overhead = out.pop("max_overhead", None) or DEFAULT_MAX_OVERHEAD
    memory_gb = out.pop("memory_gb", None)
    if memory_gb is not None and memory_gb <= 0:
        raise ConfigError(f"--memory-gb {memory_gb}: must be > 0 (GB for one model call's activations per worker)")
    given = out.get("halo") is not None
    halo = out["halo"] = _round_halo(int(out["halo"]) if given else default_halo(loaded), multiple, given)
    tile = out.get("tile")
    if tile is not None and memory_gb is not None:
        raise ConfigError(f"--memory-gb {memory_gb} with --tile {tile}: --memory-gb sizes the chosen tile, and "
                          "a given tile is used as it is. Drop one of them")
    if tile is not None:
        if tile % multiple:
            raise ConfigError(f"--tile {tile}: not a multiple of the model's size multiple {multiple}. "
                              f"Use {round_up(tile, multiple)}, or leave --tile out to choose it from the halo")
        log.info("tile %d (given), halo %d: x%.2f forward px per output px in interior windows",
                 tile, halo, tile_overhead(tile, halo))
        return out
    per_px = forward_bytes_per_px(loaded)
    if memory_gb is not None:  # --memory-gb: the user's budget for one model call, per worker
        budget = memory_gb * 1e9
        tile = choose_tile(halo, multiple, max_overhead, budget / per_px)
    else:
        budget, tile = tile_within_memory(halo, multiple, max_overhead, per_px, actors)
    out["tile"], out["call_px"], out["balance_tile"] = tile, int(min(budget // per_px, MAX_CALL_PX)), True
    window_bytes = (tile + 2 * halo) ** 2 * per_px
    batch = int(out.get("batch_size") or 8)
    out["batch_size"] = max(1, min(batch, int(budget // window_bytes)))
    capped = tile_overhead(tile, halo) > max_overhead
    log.info("tile %d chosen for halo %d: x%.2f forward px per output px in interior windows (target "
             "x%.2f%s), calls of at most %.1f MP within %.1f GB per actor (%.0f B per forward px)",
             tile, halo, tile_overhead(tile, halo), max_overhead,
             "; --memory-gb above this budget gives a bigger tile" if capped else "", out["call_px"] / 1e6,
             budget / 1e9, per_px)
    return out


def one_actor_per_node(window: int) -> bool:
    """The pool rule for CPU nodes: windows (tile + 2 halo) of at least :data:`BIG_WINDOW` px a side
    get one actor per node with every CPU of the node as a torch thread; smaller windows one actor
    per CPU (``runner.cpu_pool``, and the lanes of ``pipelines.local``).

    A big tile leaves an image few work units (a 4096² scan at tile 2304: 2 units), so
    single-threaded actors sit idle once the units run out (a one-window image used one of two
    cores), and one model copy per node halves the actors' memory. The memory budget follows the
    same rule (:func:`tile_within_memory`)."""
    return window >= BIG_WINDOW


def tile_within_memory(halo: int, multiple: int, max_overhead: float, per_px: float,
                       actors: int | None) -> tuple[float, int]:
    """(memory budget per actor, tile). With ``actors`` unknown (no ``--workers``) the budget is
    first the node's for one actor: the pool a CPU node runs when the tile's windows are big
    (:func:`one_actor_per_node`); if the tile that gives is smaller, one actor per CPU shares it."""
    for n in ([actors] if actors else [1, os.cpu_count() or 1]):
        budget = memory_budget_bytes(n)
        tile = choose_tile(halo, multiple, max_overhead, budget / per_px)
        if actors or one_actor_per_node(tile + 2 * halo):
            break
    return budget, tile


def card_tta(loaded: LoadedModel, given: bool | None) -> bool:
    """``--tta``/``--no-tta`` if given, else the card's ``extra["tta"]`` (a search sets it when flip
    TTA gained on validation)."""
    if given is not None:
        return bool(given)
    on = bool(loaded.card.extra.get("tta", False))
    if on:
        log.info("flip TTA on: the model card says it gained on validation (--no-tta turns it off)")
    return on


def load_for_run(ref: str, tracking_uri: str | None) -> tuple[LoadedModel, ModelInfo]:
    """Pin, load on the CPU (validates the reference before any work starts) and summarise."""
    pinned = modelref.pin(ref, tracking_uri)
    loaded = modelref.load_model(pinned, device="cpu", tracking_uri=tracking_uri)
    return loaded, ModelInfo.from_loaded(loaded, pinned)
