"""ResUNet: a U-Net decoder built from residual conv blocks, on any smp encoder.

Residual U-Nets (Zhang et al. 2018, "Road extraction by deep residual U-Net") are the
usual choice in published SEM rock-segmentation work: the skip-connected U-Net layout
keeps fine pore boundaries, the residual blocks train stably on small labelled sets.
The model subclasses smp's ``SegmentationModel``, so it has the same ``encoder`` /
``decoder`` / ``segmentation_head`` attributes, state-dict layout (``encoder.*``) and
``freeze_encoder()`` as every smp architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead, SegmentationModel
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (1x1-projected) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


class ResUNetDecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip, then one residual block."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = ResidualBlock(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, size: Sequence[int], skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class ResUNetDecoder(nn.Module):
    """U-Net decoder over encoder features ``[x, 1/2, 1/4, ...]``, deepest first.

    With ``full_res_channels`` > 0 a residual block on the input itself (``x``, which smp's encoders
    pass through as their first feature) is the last block's skip, as in the original U-Net, whose
    first stage runs at full resolution. smp's Unet and a ResNet encoder have no full-resolution
    skip (the stem has stride 2), so the last block must place every edge from 1/2-resolution
    features; a 3-5 px line then loses about a pixel at each border.
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int],
                 full_res_channels: int = 0) -> None:
        super().__init__()
        n_blocks = len(encoder_channels) - 1
        if len(decoder_channels) != n_blocks:
            raise ValueError(
                f"ResUNet: encoder_depth is {n_blocks} but decoder_channels has {len(decoder_channels)} "
                f"entries; pass one decoder channel count per encoder stage."
            )
        enc = list(encoder_channels[1:])[::-1]  # drop the full-resolution input, deepest first
        in_chs = [enc[0], *decoder_channels[:-1]]
        skip_chs = [*enc[1:], full_res_channels]
        self.full_res = ResidualBlock(encoder_channels[0], full_res_channels) if full_res_channels else None
        self.blocks = nn.ModuleList(
            ResUNetDecoderBlock(i, s, o) for i, s, o in zip(in_chs, skip_chs, decoder_channels, strict=True)
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        sizes = [f.shape[-2:] for f in features][::-1]
        feats = features[1:][::-1]
        x, skips = feats[0], feats[1:]
        if self.full_res is not None:
            skips = [*skips, self.full_res(features[0])]
        for i, block in enumerate(self.blocks):
            skip = skips[i] if i < len(skips) else None
            x = block(x, sizes[i + 1], skip)
        return x


class ResUNet(SegmentationModel):
    """Residual U-Net with any smp encoder (``resnet18``, ``mit_b0``, ``tu-*``...).

    ``full_res_channels`` (an ``arch_kwargs`` key; 0, the default, leaves it out) adds a
    full-resolution skip of that many channels (:class:`ResUNetDecoder`), for thin structures.
    """

    requires_divisible_input_shape = False  # the decoder resizes to each skip's size

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: str | bool | None = None,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        in_channels: int = 3,
        classes: int = 1,
        activation: str | None = None,
        full_res_channels: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = get_encoder(
            encoder_name, in_channels=in_channels, depth=encoder_depth, weights=encoder_weights, **kwargs
        )
        self.decoder = ResUNetDecoder(self.encoder.out_channels, list(decoder_channels)[:encoder_depth],
                                      full_res_channels)
        self.segmentation_head = SegmentationHead(
            in_channels=list(decoder_channels)[encoder_depth - 1],
            out_channels=classes,
            activation=activation,
            kernel_size=3,
        )
        self.classification_head = None
        self.name = f"resunet-{encoder_name}"
        self.initialize()
