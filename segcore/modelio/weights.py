"""Layer 2 of :mod:`segcore.modelio`: a model's weights in and out of ``model.safetensors``.

Saving writes every tensor of the (DDP-unwrapped) model; loading is strict: every tensor present,
none extra, every shape equal, or one :class:`~segcore.errors.ModelError` line naming the file.
No pickle anywhere. (Encoder weights and warm starts from other files are :mod:`segcore.models.weights`.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_model as st_save_model

from segcore.errors import ModelError


def save_weights(model: torch.nn.Module, weights: Path) -> None:
    """Write every tensor of ``model`` (unwrapped from DDP) to the safetensors file ``weights``."""
    st_save_model(getattr(model, "module", model), str(weights))


def load_weights_strict(model: torch.nn.Module, weights: Path) -> None:
    """Load ``weights`` into ``model``: every tensor present, none extra, every shape equal."""
    fix = "Restore model.safetensors from the training run, or retrain"
    if not weights.is_file():
        raise ModelError(f"{weights}: missing. {fix}")
    try:
        state = st_load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{weights}: unreadable or truncated safetensors file ({err}). {fix}") from None
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        what = "; ".join(part for part in (
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} in the file, "
            f"{tuple(own[wrong[0]].shape)} by config.json)" if wrong else "") if part)
        raise ModelError(f"{weights}: does not match config.json: {what}. {fix}, or restore the matching config.json")
    model.load_state_dict(state, strict=True)
