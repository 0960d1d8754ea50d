"""pix2pix's conditional PatchGAN discriminator: judges (image, label map) pairs patch by patch.

Isola et al. (2017), "Image-to-image translation with conditional adversarial networks": ``depth``
4x4 convolutions of stride 2 (64, 128, 256... channels, capped at 8x) and two of stride 1 (the
last one gives one logit per patch). ``depth=3`` is their 70x70 PatchGAN. We use instance norm
(pix2pix's ``--norm instance``) rather than batch norm: it has no running statistics, so real and
fake pairs can share one forward pass (one DDP forward per step) without mixing their statistics.
"""

from __future__ import annotations

from torch import Tensor, nn

KERNEL = 4


def _block(c_in: int, c_out: int, stride: int, norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, KERNEL, stride=stride, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.InstanceNorm2d(c_out))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN: input ``cat(image, label_map)`` ``(N, C + K, H, W)``, output logits ``(N, 1, h, w)``."""

    def __init__(self, in_channels: int, depth: int = 3, base_channels: int = 64) -> None:
        super().__init__()
        self.depth = depth
        layers = _block(in_channels, base_channels, 2, norm=False)  # pix2pix: no norm on the first layer
        c_out = base_channels
        for i in range(1, depth):
            c_in, c_out = c_out, base_channels * min(2**i, 8)
            layers += _block(c_in, c_out, 2, norm=True)
        c_in, c_out = c_out, base_channels * min(2**depth, 8)
        layers += _block(c_in, c_out, 1, norm=True)
        layers.append(nn.Conv2d(c_out, 1, KERNEL, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _init_weights(module: nn.Module) -> None:
    """pix2pix's init: N(0, 0.02) convolution weights, zero biases."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def receptive_field(depth: int) -> int:
    """Side in pixels of the input patch each output logit sees (70 for ``depth=3``)."""
    size = 1
    for stride in [1, 1] + [2] * depth:  # walk back from the output through the strides
        size = (size - 1) * stride + KERNEL
    return size


def output_size(size: int, depth: int) -> int:
    """Side of the logit map for an input of side ``size`` (padding 1 everywhere)."""
    for _ in range(depth):
        size = (size + 2 - KERNEL) // 2 + 1
    for _ in range(2):
        size = size + 2 - KERNEL + 1
    return size
