"""A model directory: ``config.json`` (everything to rebuild) + ``model.safetensors`` (weights).

Loading never unpickles: weights are safetensors, config is JSON, and the card is checked
against the weights (class names and colours per output channel, every tensor present and of
the right shape), so a folder that disagrees with itself is refused with one line naming the file.
References (a directory or an MLflow URI) are resolved by :mod:`segcore.modelref`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_model as st_save_model

from segcore.config import TrainConfig, parse_config
from segcore.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "gigaseg-model/1"
INPUT_RANGE_KEY = "input_range"  # ModelCard.extra: (0.5, 99.5) percentiles of the normalised training input
TEMPERATURE_KEY = "temperature"  # ModelCard.extra: logits are divided by it (fitted on validation, segcore.calibration)
TTA_KEY = "tta"  # ModelCard.extra: True when flip TTA gained on validation; segment's default


@dataclass
class ModelCard:
    """What travels with the weights: the training config and what the classes mean."""

    train: TrainConfig
    class_names: list[str]
    class_colors: list[tuple[int, int, int]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "train": self.train.model_dump(mode="json"),
            "class_names": self.class_names,
            "class_colors": [list(c) for c in self.class_colors] if self.class_colors else None,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> ModelCard:
        if data.get("format") != FORMAT:
            raise ModelError(f"{source}: not a gigaseg model config (format {data.get('format')!r}, want {FORMAT!r}).")
        colors = data.get("class_colors")
        return cls(
            train=parse_config(data["train"], TrainConfig, source=source),
            class_names=list(data["class_names"]),
            class_colors=[tuple(c) for c in colors] if colors else None,
            metrics=data.get("metrics", {}),
            extra=data.get("extra", {}),
        )


@dataclass
class LoadedModel:
    """A rebuilt model in eval mode plus its card; ``predict_proba`` is the tiling predictor."""

    model: torch.nn.Module
    card: ModelCard
    device: torch.device
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.card.class_names)

    @property
    def size_multiple(self) -> int:
        """Every input side is padded to this multiple (see ``segcore.models.validity.input_multiple``)."""
        from segcore.models.validity import input_multiple

        m = self.card.train.model
        return input_multiple(m.arch, m.encoder, m.arch_kwargs)

    @property
    def input_range(self) -> tuple[float, float] | None:
        """The normalised range the model was trained on, if the card records it."""
        value = self.card.extra.get(INPUT_RANGE_KEY)
        return (float(value[0]), float(value[1])) if isinstance(value, list | tuple) and len(value) == 2 else None

    @property
    def binary(self) -> bool:
        """A 1-channel head: labels are ``p >= card.train.binary_threshold``, not an argmax."""
        return self.card.train.model.classes == 1

    @property
    def temperature(self) -> float:
        """Calibration temperature from the card (1.0: none; never applied to a 1-channel head)."""
        value = self.card.extra.get(TEMPERATURE_KEY)
        return float(value) if isinstance(value, int | float) and value > 0 else 1.0

    def labels_from_proba(self, proba: np.ndarray) -> np.ndarray:
        """(K, H, W) probabilities -> int64 class ids, with the saved threshold for a binary head."""
        if self.binary:
            return (proba[1] >= self.card.train.binary_threshold).astype(np.int64)
        return proba.argmax(axis=0)

    @torch.inference_mode()
    def predict_tensor(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) normalised float32 -> (N, K, h, w) class probabilities (K >= 2) as a float32
        tensor on the model's device, channels-last as trained (the card's ``channels_last``, see
        :func:`load_model_dir`). On a GPU: bf16 autocast and pinned host copies."""
        return logits_to_proba(self.calibrated_logits(batch))

    @torch.inference_mode()
    def predict_log_tensor(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The log of :meth:`predict_tensor`, from the logits (exact where probabilities round to 0 or 1;
        what calibration fits on)."""
        logits = self.calibrated_logits(batch)
        if logits.shape[1] == 1:
            return torch.cat([torch.nn.functional.logsigmoid(-logits), torch.nn.functional.logsigmoid(logits)], 1)
        return torch.log_softmax(logits, dim=1)

    @torch.inference_mode()
    def calibrated_logits(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 logits divided by the card's temperature (not for a 1-channel head)."""
        if isinstance(batch, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            if self.device.type == "cuda":
                x = x.pin_memory()
        else:
            x = batch.float()
        x = x.to(self.device, non_blocking=True)
        use_amp = self.device.type == "cuda" and self.card.train.amp
        if self.card.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = self.model(x).float()  # channels-last stays: argmax over classes is then 7x faster
        temperature = 1.0 if self.binary else self.temperature  # argmax labels are unchanged by it
        return logits / temperature if temperature != 1.0 else logits

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, h, w) normalised float32 -> (N, K, h, w) class probabilities (K >= 2), on the host."""
        return np.ascontiguousarray(self.predict_tensor(batch).cpu().numpy())


def logits_to_proba(logits: torch.Tensor) -> torch.Tensor:
    """Softmax for multiclass; for a single-channel binary head, stack (1 - p, p)."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def save_model_dir(path: str | Path, model: torch.nn.Module, card: ModelCard) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``path`` (created if missing)."""
    from segcore.models.fold import is_folded

    model = getattr(model, "module", model)  # unwrap DDP
    if is_folded(model):
        raise ModelError(f"{path}: this model has its BatchNorm folded into its convolutions for inference, so its "
                         "weights no longer match its config. Load it with load_model_dir(..., fold_bn=False) to save it")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    st_save_model(model, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(card.to_json(), indent=2))
    return path


def read_card(path: str | Path) -> ModelCard:
    """The card of a model directory (an ensemble directory's merged card, see segcore.ensemble)."""
    from segcore.ensemble import is_ensemble_dir, read_ensemble_card

    path = Path(path)
    if is_ensemble_dir(path):
        return read_ensemble_card(path)
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise ModelError(
            f"{path}: no {CONFIG_FILE}; a model reference must be a gigaseg model directory "
            "(written by `gigaseg train` or a search) or an MLflow URI such as models:/<name>@champion."
        )
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{cfg}: not valid JSON ({err}). Restore the model folder from its source") from None
    try:
        card = ModelCard.from_json(data, source=str(cfg))
    except (ConfigError, KeyError, TypeError) as err:
        raise ModelError(f"{cfg}: not a valid model card ({err}). Restore the model folder from its source") from None
    check_card(card, str(cfg))
    return card


def check_card(card: ModelCard, source: str) -> None:
    """One class name (and colour, if given) per output class: a 1-channel head has 2 classes."""
    channels = card.train.model.classes
    want = 2 if channels == 1 else channels
    fix = "Restore config.json from the training run (class_names must list one name per class)"
    if len(card.class_names) != want:
        raise ModelError(f"{source}: {len(card.class_names)} class_names {card.class_names} for a model with "
                         f"{want} classes ({channels} output channel{'s' if channels > 1 else ''}). {fix}")
    if card.class_colors is not None and len(card.class_colors) != want:
        raise ModelError(f"{source}: {len(card.class_colors)} class_colors for {want} classes. {fix}")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs that run bf16 convolutions in hardware (Intel AMX or AVX512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def train_autocast(device: torch.device, amp: bool) -> bool:
    """Whether training steps run under bf16 autocast: ``amp`` on a GPU, or on a CPU with native bf16.

    On a 2-core AMX Xeon a U-Net step is 2.2-2.5x faster in bf16 (bench/train_amp.py). Elsewhere
    on a CPU bf16 is emulated and slower, so ``amp`` means fp32 there. Inference on a CPU stays fp32:
    tiled prediction is proved equal to whole-image prediction to 2e-5, which bf16 rounding breaks.
    """
    if not amp:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def load_model_dir(path: str | Path, device: str = "auto", fold_bn: bool = True) -> LoadedModel:
    """Rebuild the model from ``config.json`` and load its safetensors weights (no pickle); an
    ensemble directory loads as a :class:`segcore.ensemble.EnsembleModel`. ``fold_bn`` folds
    BatchNorm into the convolutions (inference only, x1.1-1.2 on a CPU; see segcore.models.fold): pass
    False to train or save the loaded model."""
    from segcore.ensemble import is_ensemble_dir, load_ensemble_dir
    from segcore.models import build_model
    from segcore.models.fold import fold_batchnorm
    from segcore.models.validity import input_multiple
    from segcore.tiling import round_up

    path = Path(path)
    if is_ensemble_dir(path):
        return load_ensemble_dir(path, device, fold_bn)
    card = read_card(path)
    model_cfg = card.train.model.model_copy(update={"encoder_weights": None})  # weights come from the file
    model = build_model(model_cfg)
    load_weights_strict(model, path / WEIGHTS_FILE)
    if fold_bn:
        side = round_up(128, input_multiple(model_cfg.arch, model_cfg.encoder, model_cfg.arch_kwargs))
        probe = torch.randn(1, model_cfg.in_channels, side, side, generator=torch.Generator().manual_seed(0))
        model = fold_batchnorm(model, probe)
    dev = pick_device(device)
    # channels-last as trained (default on): on a 2-core EPYC CPU a forward pass was x1.1-1.5 faster for
    # all 8 architectures measured (resnet18 U-Net 1024^2: 0.58 -> 0.84 MP/s), and GPUs prefer it too
    fmt = torch.channels_last if card.train.channels_last else torch.contiguous_format
    model.to(dev, memory_format=fmt).eval()
    return LoadedModel(model=model, card=card, device=dev, source=str(path))


def load_weights_strict(model: torch.nn.Module, weights: Path) -> None:
    """Load ``weights`` into ``model``: every tensor present, none extra, every shape equal."""
    fix = "Restore model.safetensors from the training run, or retrain"
    if not weights.is_file():
        raise ModelError(f"{weights}: missing. {fix}")
    try:
        state = st_load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{weights}: unreadable or truncated safetensors file ({err}). {fix}") from None
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        what = "; ".join(part for part in (
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} in the file, "
            f"{tuple(own[wrong[0]].shape)} by config.json)" if wrong else "") if part)
        raise ModelError(f"{weights}: does not match config.json: {what}. {fix}, or restore the matching config.json")
    model.load_state_dict(state, strict=True)
