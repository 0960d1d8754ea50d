"""Model building: every smp architecture by name, plus our ResUNet, behind one registry.

``build_model(ModelConfig)`` is the only constructor the rest of gigaseg calls. Every
architecture is reached through ``ARCHITECTURES`` (:mod:`.architectures`; a lookup, no per-arch
branches): the smp ones via ``smp.create_model``, ``ResUNet`` via :mod:`segcore.models.resunet`.
Validity rules live in :mod:`.validity`, encoder weights in :mod:`.weights`, freeze
strategies in :mod:`.freeze`; all are re-exported here. The submodules never import this file.
"""

from __future__ import annotations

import logging

import torch

from segcore.config import FreezeConfig, ModelConfig
from segcore.models.architectures import (
    ARCHITECTURES,
    MODEL_CONFIG_ATTR,
    default_arch_kwargs,
    instantiate,
    list_architectures,
    list_encoders,
)
from segcore.models.freeze import FreezeController
from segcore.models.validity import (
    InvalidCombinationError,
    check_combination,
    list_valid_combinations,
    probe_combination,
)
from segcore.models.weights import (
    EncoderWeightsError,
    build_pretrained,
    load_encoder_weights,
    load_model_weights,
    save_encoder_weights,
)

log = logging.getLogger(__name__)


def build_model(
    cfg: ModelConfig, load_weights: bool = False, freeze: FreezeConfig | None = None
) -> torch.nn.Module:
    """Build ``cfg.arch`` with ``cfg.encoder``, refusing invalid pairs before anything trains.

    With ``load_weights=False`` (default, used by :func:`segcore.modelio.folder.load_single_dir`)
    the encoder is randomly initialised. With ``load_weights=True`` ``cfg.encoder_weights``
    (``"imagenet"`` or a file) is loaded, unless ``freeze.strategy == "random-init"``; then
    ``cfg.init_weights`` (a whole model: a local folder or weights file; the caller resolves an
    MLflow URI first, see :func:`segcore.train.build_run`) over everything.
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


__all__ = [
    "ARCHITECTURES",
    "EncoderWeightsError",
    "FreezeController",
    "InvalidCombinationError",
    "MODEL_CONFIG_ATTR",
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
