"""The architecture registry: every smp 0.6 architecture by name plus our ResUNet, and what timm
says about an encoder. :func:`instantiate` calls a factory with no checks and no weight files;
:func:`segcore.models.build_model` is the checked constructor the rest of gigaseg calls.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import segmentation_models_pytorch as smp
import torch

from segcore.config import ModelConfig
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


@dataclass(frozen=True)
class TimmInfo:
    """What matters about a timm model for smp: its feature strides and ViT capabilities."""

    reductions: tuple[int, ...]
    forward_intermediates: bool
    dynamic_img_size: bool


@functools.lru_cache(maxsize=256)
def timm_info(name: str) -> TimmInfo | None:
    """Inspect timm model ``name`` (built on the meta device: no memory, no weights); None if unknown."""
    import timm

    if not timm.is_model(name):
        return None
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    info = getattr(model, "feature_info", None) or []
    return TimmInfo(
        reductions=tuple(int(f["reduction"]) for f in info),
        forward_intermediates=hasattr(model, "forward_intermediates"),
        dynamic_img_size=hasattr(model, "dynamic_img_size"),
    )
