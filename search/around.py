"""The default space: centred on the plan (issue 23), for a search whose YAML writes no ``space:``.

The plan decides one configuration and says why (segcore.plan); the search then tries what the
plan weighed and one step around each of its values:

* the architecture it weighed: the plan's, and the other of U-Net / ResUNet with a full-resolution
  skip (the plan picks the second for thin lines);
* encoder depth +- 1 (5, the plan's, and 4: smp's encoders stop at 5), with matching decoder widths;
* lr x/÷ 3 (log-uniform), every planned loss term's weight x/÷ 2, augmentation strength x/÷ 2;
* patch size x/÷ 2, kept to multiples of 32 between the plan's minimum and the smallest image side.

A key the user wrote in ``base`` is honoured: its dimension is left out. A written ``space:``
replaces all of this.
"""

from __future__ import annotations

from typing import Any

from segcore.config import flatten

ALTERNATIVE_MODELS: dict[str, dict[str, Any]] = {  # architecture -> the kwargs the plan would give it
    "Unet": {},
    "ResUNet": {"full_res_channels": 16},  # segcore.plan.THIN_MODEL
}
DEPTH_DECODERS = {5: [256, 128, 64, 32, 16], 4: [256, 128, 64, 32]}  # smp's default widths, per depth
PATCH_MULTIPLE = 32


def _models(plan_arch: str, plan_kwargs: dict[str, Any]) -> tuple[list[str], list[dict[str, dict[str, Any]]]]:
    """The architectures (the plan's first) and one per-architecture kwargs map per encoder depth."""
    archs = [plan_arch] + [a for a in ALTERNATIVE_MODELS if a != plan_arch]
    kwargs = {a: (dict(plan_kwargs) if a == plan_arch else dict(ALTERNATIVE_MODELS.get(a, {}))) for a in archs}
    by_depth = []
    for depth, decoder in DEPTH_DECODERS.items():
        extra = {} if depth == 5 else {"encoder_depth": depth, "decoder_channels": decoder}
        by_depth.append({a: {**kw, **extra} for a, kw in kwargs.items()})
    return archs, by_depth


def _patches(patch: int, min_side: int, minimum: int) -> list[int]:
    """patch / 2, patch, patch x 2, each a multiple of 32 within [minimum, min_side]."""
    out = []
    for p in (patch // 2, patch, patch * 2):
        p = max(minimum, p // PATCH_MULTIPLE * PATCH_MULTIPLE)
        if p <= max(min_side, patch) and p not in out:
            out.append(p)
    return sorted(out)


def around_plan(cfg: Any, min_side: int, minimum_patch: int, written: dict[str, Any]) -> dict[str, Any]:
    """The space around the planned TrainConfig ``cfg``; ``written`` is the user's ``base`` (kept)."""
    fixed = set(flatten(written))
    space: dict[str, Any] = {}
    if not {"model.arch", "model.arch_kwargs"} & fixed and cfg.model.arch in ALTERNATIVE_MODELS:
        archs, by_depth = _models(cfg.model.arch, cfg.model.arch_kwargs)
        space["architecture"] = {"choice": archs}
        space["arch_kwargs"] = {"choice": by_depth}
    if "optim.lr" not in fixed:
        space["lr"] = {"loguniform": [cfg.optim.lr / 3, cfg.optim.lr * 3]}
    if not any(k.startswith("loss.terms") for k in fixed):
        for term, weight in cfg.loss.terms.items():
            if weight > 0:
                space[f"loss.terms.{term}"] = {"uniform": [weight / 2, weight * 2]}
    if "data.patch_size" not in fixed and len(patches := _patches(cfg.data.patch_size, min_side, minimum_patch)) > 1:
        space["patch_size"] = {"choice": patches}
    strength = cfg.augment.strength
    if "augment.strength" not in fixed and strength > 0:
        space["augment"] = {"uniform": [strength / 2, min(1.0, strength * 2)]}
    return space
