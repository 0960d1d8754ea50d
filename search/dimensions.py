"""One search dimension as data: a key of ``space:`` and how it varies, parsed and checked
without a search space around it (:mod:`search.space` builds the conditional space from these).

A dimension is a friendly alias such as ``lr`` or any dotted TrainConfig path such as
``optim.weight_decay``, with a value that is either fixed (a plain value) or one of
``{choice: [...]}``, ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{int: [lo, hi]}``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from segcore.config import ConfigError, Strict, TrainConfig, did_you_mean, unknown_key_message

Kind = Literal["fixed", "choice", "loguniform", "uniform", "int"]
RANGE_KINDS = ("loguniform", "uniform", "int")
OPERATORS = ("choice", *RANGE_KINDS)

ALIASES: dict[str, str] = {
    "architecture": "model.arch",
    "encoder": "model.encoder",
    "encoder_weights": "model.encoder_weights",  # may map encoder -> weights file
    "freeze": "freeze.strategy",
    "unfreeze_epoch": "freeze.unfreeze_epoch",
    "dice_weight": "loss.terms.dice",
    "focal_weight": "loss.terms.focal",
    "focal_gamma": "loss.focal_gamma",
    "ce_weight": "loss.terms.ce",
    "adversarial_weight": "loss.adversarial.weight",  # pix2pix GAN term; 0 builds no discriminator
    "class_weighting": "loss.class_weighting",
    "lr": "optim.lr",
    "optimizer": "optim.name",
    "weight_decay": "optim.weight_decay",
    "schedule": "optim.schedule",
    "batch_size": "data.batch_size",
    "patch_size": "data.patch_size",
    "scale": "data.scale",  # training resolution: image px per model px (segment reads at the same scale)
    "augment": "augment.strength",
    "epochs": "epochs",
    "arch_kwargs": "model.arch_kwargs",  # may map architecture -> kwargs (see per_arch_kwargs)
}
_ALIAS_OF_PATH = {path: alias for alias, path in ALIASES.items()}
NONE_WORDS = ("none", "null", "")


@dataclass(frozen=True)
class Dimension:
    """One key of ``space:``: ``key`` (alias or dotted path), ``path`` in TrainConfig, how it varies."""

    key: str
    path: str
    kind: Kind
    values: tuple[Any, ...]  # fixed: (value,); choice: choices; ranges: (lo, hi)

    @property
    def fixed(self) -> bool:
        return self.kind == "fixed"


def parse_dimension(key: str, raw: Any, source: str = "") -> Dimension:
    """``{choice: [...]}``, ``{loguniform|uniform|int: [lo, hi]}`` or a plain (fixed) value."""
    path = ALIASES.get(key, key)
    key = _ALIAS_OF_PATH.get(path, key)
    where = f"{source}: space.{key}" if source else f"space.{key}"
    if not (isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in OPERATORS):
        _check_operator_typo(where, path, raw)
        return Dimension(key, path, "fixed", (raw,))
    kind, args = next(iter(raw.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice needs a non-empty list, e.g. {{choice: [a, b]}}")
        return Dimension(key, path, "choice", tuple(args))
    if not (isinstance(args, list) and len(args) == 2 and all(is_number(a) for a in args)):
        raise ConfigError(f"{where}: {kind} needs [low, high] numbers, e.g. {{{kind}: [1, 10]}}")
    lo, hi = args
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {lo}")
    if kind == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ConfigError(f"{where}: int needs whole numbers, got [{lo}, {hi}]")
    return Dimension(key, path, kind, (int(lo), int(hi)) if kind == "int" else (float(lo), float(hi)))


def _check_operator_typo(where: str, path: str, raw: Any) -> None:
    """Refuse a dict that looks like a mistyped operator (``{choise: [...]}``), naming the bad key.

    A fixed dict is legitimate only where a mapping is a value (a config section, ``arch_kwargs``,
    per-encoder ``encoder_weights``); even there a lone key very close to an operator, holding a
    list, is taken as a typo.
    """
    if not isinstance(raw, dict) or not raw:
        return
    ops = [k for k in raw if k in OPERATORS]
    if ops:
        raise ConfigError(f"{where}: {ops[0]!r} must be the only key, found {sorted(map(str, raw))}; "
                          f"write e.g. {{{ops[0]}: [...]}} alone.")
    mapping_ok = _accepts_mapping(path)
    for op, args in raw.items():
        if mapping_ok and not (len(raw) == 1 and isinstance(args, list)):
            continue
        hint = did_you_mean(str(op), OPERATORS, cutoff=0.75 if mapping_ok else 0.6)
        if hint or not mapping_ok:
            raise ConfigError(f"{where}.{op}: unknown operator {str(op)!r}{';' + hint if hint else ''} "
                              f"(valid: {', '.join(OPERATORS)}, or a plain value).")


def _accepts_mapping(path: str) -> bool:
    """Whether a plain dict is a sensible fixed value at ``path`` (a section, a dict field, per-encoder weights)."""
    node: Any = TrainConfig
    for part in path.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return True  # below a free dict (arch_kwargs, loss.terms): any value
        field = node.model_fields.get(part)
        if field is None:
            return True  # an unknown key: check_path reports it
        node = field.annotation
    if path == "model.encoder_weights":
        return True  # encoder -> weights file
    return (isinstance(node, type) and issubclass(node, BaseModel)) or node is dict or typing.get_origin(node) is dict


def is_per_arch(value: Any) -> bool:
    """``arch_kwargs: {Unet: {...}, FPN: {...}}``: keyword arguments per architecture."""
    from segcore.models import ARCHITECTURES

    return isinstance(value, dict) and bool(value) and all(k in ARCHITECTURES for k in value)


def is_number(x: Any) -> bool:
    """A real number, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_path(path: str) -> str | None:
    """None if ``path`` names a TrainConfig field (free keys below dict fields), else the problem."""
    model: type[Strict] | None = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if model is None:  # below a dict field (loss.terms, model.arch_kwargs): any key
            return None
        fields = model.model_fields
        if part not in fields:
            if i == 0:  # a space key: shorthand names first, then TrainConfig sections
                hint = did_you_mean(part, [*ALIASES, *fields])
                return (f"unknown key {part!r}{';' + hint if hint else ''} (valid: the shorthands "
                        f"{', '.join(sorted(ALIASES))}; or a dotted TrainConfig path, e.g. optim.lr, under "
                        f"{', '.join(sorted(fields))})")
            return unknown_key_message(part, fields, ".".join(parts[:i]))
        ann = fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, Strict):
            model = ann
        elif getattr(ann, "__origin__", None) is dict or ann is dict:
            model = None
        elif i < len(parts) - 1:
            return f"{'.'.join(parts[: i + 1])} is a value, it has no sub-key {parts[i + 1]!r}"
    return None


def to_config_value(dim: Dimension, value: Any) -> Any:
    """YAML conveniences: weights ``none`` -> None; class_weighting true/false -> a mode name."""
    if dim.path == "model.encoder_weights" and (value is None or str(value).lower() in NONE_WORDS):
        return None
    if dim.path == "loss.class_weighting" and isinstance(value, bool):
        return "inverse_frequency" if value else "none"
    return value
