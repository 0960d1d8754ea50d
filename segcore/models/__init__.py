"""Model building: every smp architecture by name, plus our ResUNet, behind one registry.

``build_model(ModelConfig)`` is the only constructor the rest of gigaseg calls.
(Helper-owned: validity checks, encoder weights and freeze strategies live in sibling modules.)
"""

from __future__ import annotations

from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch

from segcore.config import ModelConfig
from segcore.registry import Registry

ModelFactory = Callable[..., torch.nn.Module]
ARCHITECTURES: Registry[ModelFactory] = Registry("architecture")

SMP_ARCHITECTURES = (
    "Unet", "UnetPlusPlus", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus",
    "MAnet", "PAN", "UPerNet", "Segformer", "DPT",
)


def _smp_factory(arch: str) -> ModelFactory:
    def factory(**kwargs: object) -> torch.nn.Module:
        return smp.create_model(arch, **kwargs)

    return factory


for _arch in SMP_ARCHITECTURES:
    ARCHITECTURES.add(_arch, _smp_factory(_arch))


def list_architectures() -> list[str]:
    return ARCHITECTURES.names()


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """Build ``cfg.arch`` with ``cfg.encoder``; random init here (weights are loaded separately)."""
    factory = ARCHITECTURES.get(cfg.arch)
    return factory(
        encoder_name=cfg.encoder,
        encoder_weights=None,
        in_channels=cfg.in_channels,
        classes=cfg.classes,
        **cfg.arch_kwargs,
    )
