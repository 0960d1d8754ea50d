"""Typed configuration for training, parsed from YAML once and saved with every model.

Every worker (a Tune trial, a Ray Data actor, a laptop) rebuilds a model from the JSON
form of these objects alone, the way smp saves ``config.json`` and timm ``args.yaml``.
Unknown keys are refused (``extra="forbid"``) so a typo names itself instead of being ignored.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segcore.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)

FreezeStrategy = Literal["full", "frozen-encoder", "random-init", "staged"]
OptimizerName = Literal["adam", "adamw", "sgd"]
ScheduleName = Literal["cosine_restarts", "one_cycle", "constant"]
NormalizeMode = Literal["dtype_range", "percentile", "zscore", "fits_header", "none"]
ClassWeighting = Literal["none", "inverse_frequency"]
AdversarialMode = Literal["lsgan", "bce"]


class Strict(BaseModel):
    """Base for all config sections: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    """What to build: any smp architecture (or ResUNet) with any smp encoder."""

    arch: str = "Unet"
    encoder: str = "resnet18"
    # None: random init; "imagenet": smp's hub weights (needs a network or a filled cache);
    # anything else: a local .pth/.safetensors file holding encoder (or whole-model) weights.
    encoder_weights: str | None = None
    # a gigaseg model directory, MLflow model URI or weights file holding this whole model (same arch,
    # encoder, channels and classes): training starts from it (warm start, fine-tuning; nnU-Net's
    # -pretrained_weights)
    init_weights: str | None = None
    in_channels: int = Field(1, ge=1)
    classes: int = Field(2, ge=1)
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)


class NormalizeConfig(Strict):
    """How raw pixels become float32 model input; the pipeline applies the same at inference."""

    mode: NormalizeMode = "dtype_range"
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    mean: float | None = None
    std: float | None = None


class LossPhase(Strict):
    """From ``start_epoch`` on, use this weighted mix of loss terms (e.g. BCE first, then Dice)."""

    start_epoch: int = Field(0, ge=0)
    terms: dict[str, float]


class AdversarialConfig(Strict):
    """pix2pix's conditional GAN term: the segmentation loss plays pix2pix's L1 role, plus
    ``weight`` x the adversarial loss of a PatchGAN judging (image, label map) pairs.

    ``weight: 0`` (the default) builds no discriminator and leaves training unchanged.
    ``depth`` stride-2 layers plus two stride-1 layers (4x4 kernels): 3 gives pix2pix's 70x70
    receptive field. ``lr`` and ``betas`` are the discriminator's own Adam (pix2pix: 2e-4, 0.5).
    """

    weight: float = Field(0.0, ge=0.0)
    mode: AdversarialMode = "lsgan"
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    depth: int = Field(3, ge=1, le=6)
    base_channels: int = Field(64, ge=1)


class LossConfig(Strict):
    """A weighted sum of registered losses, e.g. ``{dice: 1.0, focal: 0.5}``, optionally scheduled."""

    terms: dict[str, float] = Field(default_factory=lambda: {"dice": 1.0, "focal": 0.5})
    schedule: list[LossPhase] = Field(default_factory=list)
    class_weighting: ClassWeighting = "none"
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    tversky_alpha: float = 0.5
    tversky_beta: float = 0.5
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)


class FreezeConfig(Strict):
    """Encoder training strategy; ``unfreeze_epoch`` is K for ``staged``."""

    strategy: FreezeStrategy = "full"
    unfreeze_epoch: int = Field(1, ge=0)
    encoder_lr_scale: float = Field(0.1, gt=0)


class AugmentConfig(Strict):
    """One ``strength`` knob in [0, 1] scales every albumentations transform; 0 disables them."""

    strength: float = Field(0.5, ge=0.0, le=1.0)


class DataConfig(Strict):
    """Patch sampling for training, tiling for validation."""

    patch_size: int = Field(96, ge=8)
    patches_per_epoch: int = Field(512, ge=1)
    batch_size: int = Field(16, ge=1)
    class_balanced: bool = True
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    val_tile: int = Field(256, ge=16)
    val_halo: int = Field(32, ge=0)
    num_workers: int = Field(0, ge=0)
    scale: float = Field(1.0, gt=0)  # image px per model px (4: the model sees 4x4 px block means)
    val_pixels: int = Field(4 << 20, ge=1)  # model px validated per epoch on lazily read data
    loader: Literal["auto", "memory", "lazy"] = "auto"  # auto: lazy for mask/model scales or > 64 MPx
    measure_halo: bool = True  # at the end: the exact halo on validation images -> card.extra (segcore.halo)


class OptimConfig(Strict):
    name: OptimizerName = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = 0.9
    schedule: ScheduleName = "cosine_restarts"
    restart_epochs: int = Field(10, ge=1)


class TrainConfig(Strict):
    """Everything one training run needs; saved as ``config.json`` in every model directory."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    epochs: int = Field(10, ge=1)
    max_minutes: float | None = Field(None, gt=0, description="stop at the first epoch end after this many "
                                      "minutes of training wall time (search budgets); None: run every epoch")
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    binary_threshold: float = 0.5




def did_you_mean(name: str, valid: typing.Iterable[str], cutoff: float = 0.6) -> str:
    """`` did you mean 'x'?`` for the closest valid name (difflib), or ``""`` if none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=cutoff)
    return f" did you mean {close[0]!r}?" if close else ""


def unknown_key_message(name: str, valid: typing.Iterable[str], where: str = "") -> str:
    """``unknown key 'lrr' in optim; did you mean 'lr'? (valid: ...)``: one wording for every config."""
    names = sorted(valid)
    message = f"unknown key {name!r}" + (f" in {where}" if where else "")
    hint = did_you_mean(name, names)
    if hint:
        message += f";{hint}"
    return f"{message} (valid: {', '.join(names)})"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``Model``, ``Model | None`` or ``list[Model]`` annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [m for arg in typing.get_args(annotation) if (m := _model_of(arg)) is not None]
    return models[0] if len(models) == 1 else None


def fields_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the (nested) model that ``loc`` points into, or None below a free dict."""
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):  # a list index: stay on the list's item model
            continue
        field = model.model_fields.get(str(part))
        model = _model_of(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else None


def _error_line(e: Any, model: type[BaseModel] | None) -> str:
    key = ".".join(str(p) for p in e["loc"]) or "<root>"
    if e["type"] == "extra_forbidden" and e["loc"]:
        valid = fields_at(model, tuple(e["loc"][:-1]))
        if valid is not None:
            return f"  {key}: {unknown_key_message(str(e['loc'][-1]), valid)}"
    return f"  {key}: {e['msg']}"


def format_validation_error(source: str, err: ValidationError, what: str = "config",
                            schema: str = "segcore/config.py", model: type[BaseModel] | None = None) -> str:
    """One line per bad key (dotted path + pydantic's message), headed by the file and ended by the fix.

    With ``model`` (the class validated), an unknown key also names the nearest valid key
    (``optim.lrr: unknown key 'lrr'; did you mean 'lr'?``), because typos are the usual cause.
    """
    lines = [f"{source}: invalid {what}"]
    lines.extend(_error_line(e, model) for e in err.errors())
    lines.append(f"Fix the keys above (see {schema} for every field and its default).")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], model: type[Strict] = TrainConfig, source: str = "<dict>") -> Any:
    """Validate ``data`` into ``model``; errors name ``source`` and every bad key."""
    try:
        return model.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, model=model)) from None


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found; pass an existing YAML file.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}); fix the syntax.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}.")
    return data


def load_yaml_config(path: str | Path, model: type[Strict] = TrainConfig) -> Any:
    """Load and validate a YAML config file."""
    return parse_config(read_yaml_mapping(path), model, source=str(path))


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'`` (CLI overrides and search samples)."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to ``{'model.arch': 'Unet', ...}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
