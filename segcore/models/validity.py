"""Which architecture x encoder x input size combinations smp 0.6 can actually build and run.

Rules (:func:`check_combination`) are fast and refuse bad pairs before any training starts;
:func:`probe_combination` builds the model and runs a tiny forward pass to confirm.
The rules encode what smp 0.6 does (found by reading its source and probing every arch):

* mix-transformer encoders (``mit_b*``) do not work with UnetPlusPlus or Linknet (smp raises);
  FPN takes them only with ``encoder_depth=5``.
* DPT takes only timm encoders (``tu-*``); every other arch needs a *hierarchical* encoder
  (timm ViTs with a single patch stride are refused by smp's TimmUniversalEncoder).
* DeepLabV3, DeepLabV3Plus and PAN dilate the encoder; vgg, densenet, xception, inceptionv4
  and inceptionresnetv2 encoders cannot be dilated.
* Input size must be divisible by the model's output stride (all archs but Unet/ResUNet) and at
  least 32 px (several encoders, e.g. mit_b0, efficientnet-b0, vgg, densenet, fail below);
  PAN needs the deepest feature map >= 8 px (its FPA block pools three times): >= 128 px at
  its default output stride 16. DPT needs multiples of lcm(patch stride, 2**(depth+1)).
* ``arch_kwargs`` that smp accepts but that break the output: FPN and PSPNet at a non-default
  ``encoder_depth`` need a matching ``upsampling`` (else the output is not the input size), and
  Unet, UnetPlusPlus and MAnet need one ``decoder_channels`` entry per encoder level.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from segcore.config import ModelConfig
from segcore.errors import UserError
from segcore.models.architectures import (
    ARCHITECTURES,
    instantiate,
    list_architectures,
    list_encoders,
    timm_info,
)
from segcore.registry import UnknownNameError

log = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 32
NOT_DILATABLE = ("vgg", "densenet", "xception", "inceptionv4", "inceptionresnetv2")
DILATING_ARCHS = {"DeepLabV3": 8, "DeepLabV3Plus": 16, "PAN": 16}  # default encoder_output_stride
DEFAULT_DEPTH = {"PSPNet": 3, "DPT": 4}  # every other arch: 5
SIZE_FREE_ARCHS = ("Unet", "ResUNet")  # decoders resize to each skip, no divisibility needed
NO_MIT_ARCHS = ("UnetPlusPlus", "Linknet")
DECODER_PER_LEVEL_ARCHS = ("Unet", "UnetPlusPlus", "MAnet")  # one decoder_channels entry per encoder level
PAN_MIN_DEEPEST = 8
# timm ViTs offered by list_valid_combinations() by default so DPT has candidates.
DEFAULT_TIMM_ENCODERS = ("tu-vit_tiny_patch16_224", "tu-vit_small_patch16_224")


class InvalidCombinationError(UserError, ValueError):
    """An architecture/encoder/size combination smp cannot build or run; says why and what works."""


class UnknownArchitectureError(UnknownNameError, InvalidCombinationError):
    """An unregistered architecture: the registry's "did you mean" message (a KeyError and ValueError)."""


def _is_hierarchical(reductions: Sequence[int]) -> bool:
    """smp's TimmUniversalEncoder accepts strides (1,2,4..), (2,4,8..) or (4,8,16..) only."""
    n = len(reductions)
    return any(list(reductions) == [2 ** (i + k) for i in range(n)] for k in (0, 1, 2))


def _known_encoder(encoder: str) -> bool:
    import segmentation_models_pytorch as smp

    if encoder.startswith("tu-"):
        return timm_info(encoder[3:]) is not None
    return encoder in smp.encoders.encoders or smp.encoders.is_equivalent_to_timm_universal(encoder)


def _encoder_reason(arch: str, encoder: str, kw: dict[str, Any]) -> str | None:
    """Why ``arch`` cannot use ``encoder`` (None if it can), ignoring input size."""
    timm = timm_info(encoder[3:]) if encoder.startswith("tu-") else None
    if arch == "DPT":
        if not encoder.startswith("tu-"):
            return "DPT takes only timm encoders named 'tu-<timm model>' (smp 0.6 raises otherwise)"
        if timm is None or not timm.forward_intermediates:
            return f"timm model {encoder[3:]!r} has no forward_intermediates(), which DPT needs"
        return None
    if timm is not None and not _is_hierarchical(timm.reductions):
        return (
            f"{encoder} is a single-stride (ViT-style, strides {sorted(set(timm.reductions))}) timm model; "
            f"smp's {arch} needs a hierarchical encoder (strides 2,4,8,16,32), ViTs only work with DPT"
        )
    if encoder.startswith("mit_b"):
        if arch in NO_MIT_ARCHS:
            return f"smp 0.6 does not support mix-transformer encoders (mit_b*) in {arch}"
        if arch == "FPN" and kw.get("encoder_depth", 5) != 5:
            return "FPN with a mix-transformer encoder needs encoder_depth=5"
    if arch in DILATING_ARCHS and encoder.startswith(NOT_DILATABLE):
        return f"{arch} dilates the encoder (output stride 8/16) and {encoder} cannot be dilated"
    return None


def _kwargs_reason(arch: str, kw: dict[str, Any]) -> str | None:
    """Why ``arch_kwargs`` make ``arch`` fail or predict at the wrong scale (None if they don't)."""
    if "encoder_depth" not in kw:
        return None
    depth = int(kw["encoder_depth"])
    if arch == "PSPNet" and kw.get("upsampling", 8) != 2**depth:
        return f"PSPNet with encoder_depth={depth} needs upsampling={2**depth}"
    if arch == "FPN" and kw.get("upsampling", 4) != 2 ** (depth - 3):
        return (f"FPN with encoder_depth={depth} needs upsampling={2 ** (depth - 3)} "
                f"(otherwise its output is {kw.get('upsampling', 4) / 2 ** (depth - 3):g}x the input size)")
    n_decoder = len(kw.get("decoder_channels", [None] * 5))
    if arch in DECODER_PER_LEVEL_ARCHS and n_decoder != depth:
        return (f"{arch} with encoder_depth={depth} needs decoder_channels with {depth} entries "
                f"(got {n_decoder}), e.g. {[256, 128, 64, 32, 16][:depth]}")
    return None


def _size_rule(arch: str, encoder: str, kw: dict[str, Any]) -> tuple[int, int]:
    """(multiple, minimum) input size for a valid arch/encoder pair."""
    depth = int(kw.get("encoder_depth", DEFAULT_DEPTH.get(arch, 5)))
    if arch == "DPT":
        info = timm_info(encoder[3:])
        strides = info.reductions if info else (16,)
        multiple = math.lcm(max(strides), 2 ** (depth + 1))
        return multiple, max(multiple, MIN_IMAGE_SIZE)
    if arch in SIZE_FREE_ARCHS:
        return 1, MIN_IMAGE_SIZE
    stride = min(int(kw.get("encoder_output_stride", DILATING_ARCHS.get(arch, 32))), 2**depth)
    minimum = max(stride, MIN_IMAGE_SIZE)
    if arch == "PAN":
        minimum = max(minimum, PAN_MIN_DEEPEST * stride)
    return stride, minimum


def input_multiple(arch: str, encoder: str, arch_kwargs: dict[str, Any] | None = None) -> int:
    """The multiple every model input side is padded to, by training's validation and by ``segment``
    alike: the model's size rule, and for size-free decoders (Unet, ResUNet) their total stride
    2**depth all the same, so a tile and the whole image meet the encoder at the same stride phase."""
    kw = dict(arch_kwargs or {})
    multiple, _ = _size_rule(arch, encoder, kw)
    if arch in SIZE_FREE_ARCHS:
        multiple = 2 ** int(kw.get("encoder_depth", DEFAULT_DEPTH.get(arch, 5)))
    return max(multiple, 1)


def min_input_size(arch: str, encoder: str, arch_kwargs: dict[str, Any] | None = None) -> int:
    """The smallest input side the model accepts (inputs below it are padded up to it)."""
    return _size_rule(arch, encoder, dict(arch_kwargs or {}))[1]


def valid_sizes(arch: str, encoder: str, arch_kwargs: dict[str, Any] | None = None, n: int = 4) -> list[int]:
    """The ``n`` smallest input sizes (>= 32) ``arch`` + ``encoder`` accepts."""
    multiple, minimum = _size_rule(arch, encoder, dict(arch_kwargs or {}))
    step = multiple if multiple > 1 else 16
    start = math.ceil(minimum / multiple) * multiple
    return [start + i * step for i in range(n)]


def _works_list(arch: str, encoder: str, kw: dict[str, Any]) -> str:
    encs = [e for e in list_encoders() if _encoder_reason(arch, e, kw) is None]
    enc_text = ", ".join(encs) if encs else "none of smp's own encoders"
    if arch == "DPT":
        enc_text += "; timm ViTs such as " + ", ".join(DEFAULT_TIMM_ENCODERS)
    elif encs:
        enc_text += "; and hierarchical timm encoders as tu-<name> (e.g. tu-resnet18, tu-convnext_atto)"
    archs = [a for a in list_architectures() if _encoder_reason(a, encoder, kw) is None]
    return (
        f" Encoders that work with {arch}: {enc_text}."
        f" Architectures that work with {encoder}: {', '.join(archs) or 'none'}."
    )


def check_combination(
    arch: str,
    encoder: str,
    in_channels: int = 1,
    image_size: int | None = 64,
    arch_kwargs: dict[str, Any] | None = None,
) -> None:
    """Raise :class:`InvalidCombinationError` (saying why and what works) if smp cannot run it.

    ``image_size=None`` skips the size rules (used by ``build_model``, which has no size).
    """
    if arch not in ARCHITECTURES:
        raise UnknownArchitectureError(ARCHITECTURES.unknown_message(arch))
    if not _known_encoder(encoder):
        import difflib

        close = difflib.get_close_matches(encoder, list_encoders(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise InvalidCombinationError(
            f"Unknown encoder {encoder!r}.{hint} Use one of segcore.models.list_encoders() or "
            f"'tu-<timm model name>' for any timm model."
        )
    if in_channels < 1:
        raise InvalidCombinationError(f"in_channels={in_channels}: need at least 1 input channel.")
    kw = dict(arch_kwargs or {})
    reason = _encoder_reason(arch, encoder, kw)
    if reason:
        raise InvalidCombinationError(f"{arch} + {encoder} is not valid: {reason}." + _works_list(arch, encoder, kw))
    reason = _kwargs_reason(arch, kw)
    if reason:
        raise InvalidCombinationError(f"{arch} arch_kwargs {kw} are not valid: {reason}.")
    if image_size is None:
        return
    multiple, minimum = _size_rule(arch, encoder, kw)
    if image_size < minimum or image_size % multiple:
        need = f"a multiple of {multiple}, at least {minimum}" if multiple > 1 else f"at least {minimum}"
        raise InvalidCombinationError(
            f"{arch} + {encoder} cannot take {image_size} px inputs: the size must be {need}. "
            f"Valid sizes: {', '.join(map(str, valid_sizes(arch, encoder, kw)))}, ..."
        )


def list_valid_combinations(
    archs: Iterable[str] | None = None, encoders: Iterable[str] | None = None, image_size: int | None = 64
) -> list[tuple[str, str]]:
    """All (arch, encoder) pairs that pass :func:`check_combination` at ``image_size``.

    Defaults: every registered arch; smp's encoders plus a few timm ViTs (so DPT has candidates).
    """
    archs = list(archs) if archs is not None else list_architectures()
    encoders = list(encoders) if encoders is not None else [*list_encoders(), *DEFAULT_TIMM_ENCODERS]
    out = []
    for arch in archs:
        for enc in encoders:
            try:
                check_combination(arch, enc, image_size=image_size)
            except InvalidCombinationError:
                continue
            out.append((arch, enc))
    return out


def probe_combination(
    arch: str,
    encoder: str,
    in_channels: int = 1,
    image_size: int = 64,
    classes: int = 2,
    arch_kwargs: dict[str, Any] | None = None,
) -> tuple[int, ...]:
    """Build the model (random init) and run a 2-image forward pass; return the output shape.

    Raises :class:`InvalidCombinationError` when building or running fails or the output is
    not ``(2, classes, image_size, image_size)``. Slow (seconds); rules are what callers use.
    """
    cfg = ModelConfig(arch=arch, encoder=encoder, in_channels=in_channels, classes=classes,
                      arch_kwargs=dict(arch_kwargs or {}))
    try:
        model = instantiate(cfg).train()  # train mode also catches BatchNorm-on-1-value errors
        with torch.no_grad():
            out = model(torch.randn(2, in_channels, image_size, image_size))
    except Exception as err:
        raise InvalidCombinationError(
            f"{arch} + {encoder} at {image_size} px with {in_channels} channel(s) failed to run: "
            f"{type(err).__name__}: {err}"
        ) from err
    want = (2, classes, image_size, image_size)
    if tuple(out.shape) != want:
        raise InvalidCombinationError(
            f"{arch} + {encoder} at {image_size} px gave output {tuple(out.shape)}, expected {want}; "
            f"check arch_kwargs (e.g. upsampling vs encoder_depth)."
        )
    return tuple(out.shape)
