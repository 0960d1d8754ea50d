"""Encoder weights: None (random), ``"imagenet"`` (smp/timm hub) or a local file.

A local file is the offline-friendly way: a ``.safetensors`` or ``.pth`` (read with
``torch.load(weights_only=True)``, never unpickling code) holding either encoder-only keys
or a whole gigaseg model state dict (keys ``encoder.*``), e.g. an encoder saved with
:func:`save_encoder_weights` from an earlier model, or a model directory's
``model.safetensors``. ``"imagenet"`` needs the Hugging Face hub or a pre-filled cache;
with ``HF_HUB_OFFLINE=1`` and no cached file it fails at once, without touching the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from segcore.config import ModelConfig
from segcore.errors import UserError
from segcore.models.architectures import MODEL_CONFIG_ATTR, instantiate

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")
_FILE_HINT = (
    "set model.encoder_weights to a local .safetensors/.pth file instead: on a machine with network "
    "access run `m = build_model(ModelConfig(arch=..., encoder=..., in_channels=..., "
    "encoder_weights='imagenet'), load_weights=True); save_encoder_weights(m, 'encoder.safetensors')` "
    "and copy that file here (or pre-fill the Hugging Face cache, HF_HUB_CACHE)."
)


class EncoderWeightsError(UserError, ValueError):
    """Encoder weights that cannot be found, read or loaded; the message says how to fix it."""


def _encoder(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # unwrap DDP
    enc = getattr(model, "encoder", None)
    if not isinstance(enc, torch.nn.Module):
        raise EncoderWeightsError(
            f"{type(model).__name__} has no `.encoder`; build it with segcore.models.build_model."
        )
    return enc


def save_encoder_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Write ``model.encoder``'s state dict (keys without ``encoder.``) to .safetensors or .pth."""
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise EncoderWeightsError(f"{path}: unknown weights suffix; use one of {', '.join(WEIGHT_SUFFIXES)}.")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in _encoder(model).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``name -> tensor`` dict (no pickled code is executed)."""
    try:
        if path.suffix == ".safetensors":
            data: object = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled objects refused by weights_only, ...
        raise EncoderWeightsError(
            f"{path}: cannot read encoder weights ({type(err).__name__}: {err}). Pass a .safetensors file or "
            f"a .pth holding a plain state dict (tensors only)."
        ) from err
    if isinstance(data, Mapping):
        for key in _NESTED_KEYS:  # common checkpoint layouts: {"state_dict": {...}, "epoch": ...}
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise EncoderWeightsError(
            f"{path}: not a state dict of tensors; save one with segcore.models.save_encoder_weights()."
        )
    return dict(data)


def _encoder_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.``; from a whole-model dict keep ``encoder.*`` keys without the prefix."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):
        return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return state


def _mismatch_report(target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                     what: str = "encoder") -> list[str]:
    missing = [k for k in target if k not in state]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in target.items()
        if k in state and state[k].shape != v.shape
    ]
    lines = []
    if missing:
        lines.append(f"{len(missing)} {what} tensors missing from the file, e.g. {', '.join(missing[:5])}")
    if shapes:
        lines.append(f"{len(shapes)} shape mismatches, e.g. {'; '.join(shapes[:5])}")
    return lines


def _weights_file(path: Path) -> Path:
    """``path`` itself, or a gigaseg model directory's ``model.safetensors``."""
    return path / "model.safetensors" if path.is_dir() and (path / "model.safetensors").is_file() else path


def load_model_weights(model: torch.nn.Module, source: str | Path) -> None:
    """Start the whole ``model`` from trained weights in place (warm start, fine-tuning): a local gigaseg
    model directory or a weights file of the same architecture, encoder, channels and classes. An MLflow
    model URI is resolved to its local folder by the caller (:func:`segcore.modelio.ref.local_dir`)."""
    path = _weights_file(Path(source))
    if not path.is_file():
        raise EncoderWeightsError(
            f"model.init_weights {str(source)!r}: no such file or model directory. Give a gigaseg model directory "
            f"or a {'/'.join(WEIGHT_SUFFIXES)} file saved from the same architecture, or None to start at random."
        )
    net = getattr(model, "module", model)  # unwrap DDP
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    target = net.state_dict()
    problems = _mismatch_report(target, state, what="model")
    extra = sorted(set(state) - set(target))
    if extra:
        problems.append(f"{len(extra)} tensors this model does not have, e.g. {', '.join(extra[:5])}")
    if problems:
        raise EncoderWeightsError(
            f"{path}: does not match this model: " + "; ".join(problems)
            + ". model.init_weights needs weights of the same arch, encoder, arch_kwargs, in_channels and classes "
            "(model.encoder_weights takes just an encoder)."
        )
    net.load_state_dict(state, strict=True)
    log.info("started the whole model from %s (%d tensors)", path, len(target))


def _load_file(model: torch.nn.Module, path: Path) -> None:
    path = _weights_file(path)
    if not path.is_file():
        raise EncoderWeightsError(
            f"encoder_weights {str(path)!r}: no such file. Use None (random init), 'imagenet', or the path "
            f"of an existing {'/'.join(WEIGHT_SUFFIXES)} file (or a gigaseg model directory)."
        )
    encoder = _encoder(model)
    state = _encoder_part(_read_state_dict(path))
    target = encoder.state_dict()
    problems = _mismatch_report(target, state)
    if problems:
        raise EncoderWeightsError(
            f"{path}: does not match this model's encoder ({type(encoder).__name__}): "
            + "; ".join(problems)
            + ". Use weights saved from the same encoder name and in_channels."
        )
    extra = sorted(set(state) - set(target))
    if extra:
        log.warning("%s: ignoring %d tensors the encoder does not have, e.g. %s", path, len(extra), extra[:3])
    encoder.load_state_dict({k: state[k] for k in target}, strict=True)
    log.info("loaded %d encoder tensors from %s", len(target), path)


def load_encoder_weights(
    model: torch.nn.Module, source: str | Path | None, model_cfg: ModelConfig | None = None
) -> None:
    """Load ``source`` into ``model.encoder`` in place: None, ``"imagenet"`` or a file path.

    ``"imagenet"`` rebuilds the pretrained twin from ``model_cfg`` (default: the config that
    :func:`segcore.models.build_model` attached to the model) and copies its encoder.
    """
    if source is None:
        return
    if str(source) == "imagenet":
        cfg = model_cfg or getattr(getattr(model, "module", model), MODEL_CONFIG_ATTR, None)
        if cfg is None:
            raise EncoderWeightsError(
                "load_encoder_weights(model, 'imagenet') needs the model's ModelConfig: pass model_cfg=, "
                "or build the model with segcore.models.build_model."
            )
        twin = build_pretrained(cfg)
        _encoder(model).load_state_dict(twin.encoder.state_dict(), strict=True)
        return
    _load_file(model, Path(source))


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_files(encoder: str) -> tuple[str, list[str], str | None] | None:
    """(repo_id, candidate filenames, revision) where the hub keeps ``encoder``'s imagenet weights."""
    import segmentation_models_pytorch as smp
    import timm

    if encoder.startswith("tu-"):
        pcfg = timm.models.get_pretrained_cfg(encoder[3:])
        if pcfg is None or not pcfg.hf_hub_id:
            return None
        files = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        return pcfg.hf_hub_id, files, None
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {})
    if "imagenet" not in settings:
        if encoder in smp.encoders.encoders:
            raise EncoderWeightsError(
                f"encoder {encoder!r} has no 'imagenet' weights in smp (it has: {', '.join(settings) or 'none'}). "
                f"Use None or a local weights file."
            )
        return None
    return settings["imagenet"]["repo_id"], ["model.safetensors"], settings["imagenet"].get("revision")


def _is_cached(encoder: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    where = _hub_files(encoder)
    if where is None:
        return False
    repo_id, files, revision = where
    return any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in files)


@contextlib.contextmanager
def _hub_offline_guard(offline: bool) -> Iterator[None]:
    """Make huggingface_hub honour an ``HF_HUB_OFFLINE`` set after it was imported."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def build_pretrained(cfg: ModelConfig) -> torch.nn.Module:
    """Build ``cfg`` with the hub's imagenet encoder (smp adapts the first conv to in_channels)."""
    offline = _offline()
    if offline and not _is_cached(cfg.encoder):
        raise EncoderWeightsError(
            f"encoder_weights='imagenet' for {cfg.encoder!r}: HF_HUB_OFFLINE is set and the weights are not "
            f"in the local Hugging Face cache, so they cannot be fetched. To fix, {_FILE_HINT}"
        )
    hub_arg: str | bool = True if cfg.encoder.startswith("tu-") else "imagenet"
    try:
        with _hub_offline_guard(offline):
            return instantiate(cfg, encoder_weights=hub_arg)
    except EncoderWeightsError:
        raise
    except Exception as err:  # network errors, hub errors, missing cache entries ...
        raise EncoderWeightsError(
            f"encoder_weights='imagenet' for {cfg.encoder!r}: could not fetch the pretrained weights "
            f"({type(err).__name__}: {err}). This machine may not reach the Hugging Face hub. To fix, {_FILE_HINT}"
        ) from err
