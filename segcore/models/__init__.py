"""Model building: every smp architecture by name, plus our ResUNet, behind one registry.

``build_model(ModelConfig)`` is the only constructor the rest of gigaseg calls. Every
architecture is reached through ``ARCHITECTURES`` (a lookup, no per-arch branches): the smp
ones via ``smp.create_model``, ``ResUNet`` via :mod:`segcore.models.resunet`.
Validity rules live in :mod:`.validity`, encoder weights in :mod:`.weights`, freeze
strategies in :mod:`.freeze`; all are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import segmentation_models_pytorch as smp
import torch

from segcore.config import FreezeConfig, ModelConfig
from segcore.registry import Registry

log = logging.getLogger(__name__)

ModelFactory = Callable[..., torch.nn.Module]
ARCHITECTURES: Registry[ModelFactory] = Registry("architecture")

SMP_ARCHITECTURES = (
    "Unet", "UnetPlusPlus", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus",
    "MAnet", "PAN", "UPerNet", "Segformer", "DPT",
)


# Name of the plain attribute build_model() leaves on a model so that
# load_encoder_weights(model, "imagenet") can rebuild its pretrained twin.
MODEL_CONFIG_ATTR = "gigaseg_model_config"


def _smp_factory(arch: str) -> ModelFactory:
    def factory(**kwargs: Any) -> torch.nn.Module:
        return smp.create_model(arch, **kwargs)

    factory.__name__ = f"smp_{arch}"
    return factory


def _resunet_factory(**kwargs: Any) -> torch.nn.Module:
    from segcore.models.resunet import ResUNet

    return ResUNet(**kwargs)


for _arch in SMP_ARCHITECTURES:
    ARCHITECTURES.add(_arch, _smp_factory(_arch))
ARCHITECTURES.add("ResUNet", _resunet_factory)


def list_architectures() -> list[str]:
    """Registered architecture names (smp's twelve plus ResUNet), sorted."""
    return ARCHITECTURES.names()


def list_encoders() -> list[str]:
    """smp's own encoder names; any timm model is also accepted as ``tu-<timm name>``."""
    return sorted(smp.encoders.get_encoder_names())


def default_arch_kwargs(arch: str, encoder: str) -> dict[str, Any]:
    """Defaults merged *under* ModelConfig.arch_kwargs.

    DPT with a timm ViT: ``dynamic_img_size=True``, else the ViT only takes its pretraining
    size (224 px); with it, any multiple of the patch stride works.
    """
    from segcore.models.validity import timm_info

    if arch == "DPT" and encoder.startswith("tu-"):
        info = timm_info(encoder[3:])
        if info is not None and info.dynamic_img_size:
            return {"dynamic_img_size": True}
    return {}


def instantiate(cfg: ModelConfig, encoder_weights: str | bool | None = None) -> torch.nn.Module:
    """Call the registered factory for ``cfg`` (no validity check, no weight file loading)."""
    factory = ARCHITECTURES.get(cfg.arch)
    kwargs = {**default_arch_kwargs(cfg.arch, cfg.encoder), **cfg.arch_kwargs}
    model = factory(
        encoder_name=cfg.encoder,
        encoder_weights=encoder_weights,
        in_channels=cfg.in_channels,
        classes=cfg.classes,
        **kwargs,
    )
    setattr(model, MODEL_CONFIG_ATTR, cfg)
    return model


def build_model(
    cfg: ModelConfig, load_weights: bool = False, freeze: FreezeConfig | None = None
) -> torch.nn.Module:
    """Build ``cfg.arch`` with ``cfg.encoder``, refusing invalid pairs before anything trains.

    With ``load_weights=False`` (default, used by :func:`segcore.modeldir.load_model_dir`)
    the encoder is randomly initialised. With ``load_weights=True`` ``cfg.encoder_weights``
    (``"imagenet"`` or a file) is loaded, unless ``freeze.strategy == "random-init"``; then
    ``cfg.init_weights`` (a whole model) over everything.
    """
    ARCHITECTURES.get(cfg.arch)  # unknown arch: the registry's "did you mean" error
    check_combination(cfg.arch, cfg.encoder, cfg.in_channels, image_size=None, arch_kwargs=cfg.arch_kwargs)
    source = cfg.encoder_weights if load_weights else None
    if source is not None and freeze is not None and freeze.strategy == "random-init":
        log.info("freeze strategy 'random-init': ignoring encoder_weights=%r", source)
        source = None
    model = build_pretrained(cfg) if source == "imagenet" else instantiate(cfg)
    if source not in (None, "imagenet"):
        load_encoder_weights(model, source)
    if load_weights and cfg.init_weights is not None:
        load_model_weights(model, cfg.init_weights)
    return model


from segcore.models.freeze import FreezeController  # noqa: E402
from segcore.models.validity import (  # noqa: E402
    InvalidCombinationError,
    check_combination,
    list_valid_combinations,
    probe_combination,
)
from segcore.models.weights import (  # noqa: E402
    EncoderWeightsError,
    build_pretrained,
    load_encoder_weights,
    load_model_weights,
    save_encoder_weights,
)

__all__ = [
    "ARCHITECTURES",
    "EncoderWeightsError",
    "FreezeController",
    "InvalidCombinationError",
    "build_model",
    "build_pretrained",
    "check_combination",
    "default_arch_kwargs",
    "instantiate",
    "list_architectures",
    "list_encoders",
    "list_valid_combinations",
    "load_encoder_weights",
    "load_model_weights",
    "probe_combination",
    "save_encoder_weights",
]
