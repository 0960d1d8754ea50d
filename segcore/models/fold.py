"""Fold eval-mode BatchNorm into the convolution before it, for inference.

In eval mode ``bn(conv(x))`` is one affine map per channel after the convolution, so it can be
folded into the convolution's weights and bias (the standard inference rewrite, as in
``torch.ao.quantization.fuse_modules`` or TensorRT). On a 2-core CPU this made a resnet18 U-Net
forward x1.1-1.2 faster (interleaved with the unfolded model at 1024² and 2048², channels-last) and
lowered its peak memory by 12 %: every BatchNorm pass over a full-resolution activation is gone.

Which BatchNorm follows which convolution is found by running the model once with hooks (a BN
whose input tensor *is* a convolution's output), so it works for any architecture without naming
its modules; smp's models cannot be traced with ``torch.fx`` (they check input shapes in Python).
A folded model is checked against the original on a probe input and kept only if it agrees.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

FOLDED_ATTR = "_gigaseg_bn_folded"  # set on a folded model: it has lost its BN modules and must not be saved
FOLD_RTOL = 1e-4  # folded logits must agree with the original within this share of the logits' range


def conv_bn_pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) for every eval-mode BatchNorm2d whose input is a Conv2d's output tensor."""
    names = {id(m): n for n, m in model.named_modules()}
    made_by: dict[int, nn.Module] = {}
    pairs: list[tuple[str, str]] = []

    def conv_hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        made_by[id(out)] = mod

    def bn_hook(mod: nn.Module, inp: tuple, _out: torch.Tensor) -> None:
        conv = made_by.get(id(inp[0]))
        if conv is not None and mod.track_running_stats:
            pairs.append((names[id(conv)], names[id(mod)]))

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if type(m) is nn.Conv2d]
    handles += [m.register_forward_hook(bn_hook) for m in model.modules() if type(m) is nn.BatchNorm2d]
    try:
        with torch.inference_mode():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    pairs = list(dict.fromkeys(pairs))  # a block called twice records its pair twice
    convs, bns = [c for c, _ in pairs], [b for _, b in pairs]
    return [(c, b) for c, b in pairs if convs.count(c) == 1 and bns.count(b) == 1]  # shared with another: leave it


def fold_batchnorm(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a convolution folded
    into it (the BN becomes ``nn.Identity``); ``model`` itself if nothing folds or the folded copy's
    output on ``probe`` differs by more than :data:`FOLD_RTOL` of the logits' range."""
    model = model.eval()
    pairs = conv_bn_pairs(model, probe)
    if not pairs:
        return model
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        _replace(folded, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace(folded, bn_name, nn.Identity())
    with torch.inference_mode():
        want, got = model(probe).float(), folded(probe).float()
    scale = float((want.max() - want.min()).clamp_min(1e-6))
    diff = float((want - got).abs().max())
    if not diff <= FOLD_RTOL * scale:
        log.warning("BatchNorm folding changed this model's output by %.3g (logit range %.3g); it runs unfolded",
                    diff, scale)
        return model
    setattr(folded, FOLDED_ATTR, True)
    log.debug("folded %d BatchNorm layers into their convolutions (max logit change %.2g)", len(pairs), diff)
    return folded


def is_folded(model: nn.Module) -> bool:
    """True for a model from :func:`fold_batchnorm` (its weights no longer match its config)."""
    return bool(getattr(model, FOLDED_ATTR, False))


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
