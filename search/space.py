"""Search dimensions as data: parse, validate, sample (Optuna define-by-run) and enumerate (grid).

A dimension is a key of ``space:`` (a friendly alias such as ``lr`` or any dotted TrainConfig
path such as ``optim.weight_decay``) with a value that is either fixed (a plain value) or one
of ``{choice: [...]}``, ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{int: [lo, hi]}``.

Conditional structure (the same for every engine):

* ``encoder`` is drawn among the encoders valid for the drawn ``architecture`` (segcore's
  ``list_valid_combinations``), under the Optuna name ``encoder__<arch>``, because Optuna refuses
  a parameter whose choices differ between branches;
* ``freeze`` only when encoder weights are set; ``unfreeze_epoch`` only for ``staged``;
* ``focal_gamma`` only when the focal term has a positive weight.
"""

from __future__ import annotations

import copy
import math
import random
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from segcore.config import (
    ConfigError,
    Strict,
    TrainConfig,
    did_you_mean,
    parse_config,
    set_dotted,
    unknown_key_message,
)

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
# Conditional dimensions are resolved in this order, then the rest in YAML order.
ORDER = ("architecture", "encoder", "encoder_weights", "freeze", "unfreeze_epoch")
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
    if not (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)):
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


def _is_number(x: Any) -> bool:
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


@dataclass
class Active:
    """A dimension as it applies to one partial configuration: its Optuna name and options."""

    name: str
    choices: tuple[Any, ...] = ()


@dataclass
class SearchSpace:
    """The validated space: base config, ordered dimensions and valid (arch -> encoders)."""

    base: dict[str, Any]
    dims: list[Dimension]
    encoders_for: dict[str, tuple[str, ...]] = field(default_factory=dict)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_spec(cls, spec: Any, source: str = "<search>") -> SearchSpace:
        """Parse and validate ``spec.base``, ``spec.space`` and ``spec.seed_configs``."""
        from search.validate import validate_space

        dims = [parse_dimension(k, v, source) for k, v in spec.space.items()]
        space = cls(copy.deepcopy(spec.base), _ordered(dims, source))
        validate_space(space, spec, source)
        return space

    def dim(self, key: str) -> Dimension | None:
        return next((d for d in self.dims if d.key == key), None)

    # ------------------------------------------------------------------ conditions

    def base_value(self, path: str, default: Any = None) -> Any:
        node: Any = self.base
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def current(self, key: str, params: dict[str, Any]) -> Any:
        """The value ``key`` has in this partial configuration (drawn, else base, else default)."""
        dim = self.dim(key)
        if key in params and dim is not None:
            return self.resolve(dim, params[key], params)
        path = ALIASES.get(key, key)
        default = _default_at(path)
        return self.base_value(path, default)

    def resolve(self, dim: Dimension, value: Any, params: dict[str, Any]) -> Any:
        """The config value of ``dim``: per-architecture kwargs and per-encoder weights picked."""
        if dim.path == "model.arch_kwargs" and is_per_arch(value):
            return value.get(self.current("architecture", params), {})
        if dim.path == "model.encoder_weights" and isinstance(value, dict):
            value = value.get(self.current("encoder", params))
        return to_config_value(dim, value)

    def active(self, dim: Dimension, params: dict[str, Any]) -> Active | None:
        """None if ``dim`` does not apply given the values drawn so far."""
        if dim.key == "encoder":
            arch = self.current("architecture", params)
            choices = self.encoders_for.get(arch, dim.values) if dim.kind == "choice" else dim.values
            arch_dim = self.dim("architecture")
            name = f"encoder__{arch}" if arch_dim is not None and not arch_dim.fixed else "encoder"
            return Active(name, tuple(choices))
        if dim.key == "freeze" and self.current("encoder_weights", params) is None:
            return None
        if dim.key == "unfreeze_epoch" and self.current("freeze", params) != "staged":
            return None
        if dim.key == "focal_gamma" and not (self.current("focal_weight", params) or 0) > 0:
            return None
        return Active(dim.key, dim.values)

    # ------------------------------------------------------------------ sampling

    def sample(self, draw: Callable[[Dimension, Active], Any]) -> dict[str, Any]:
        """Walk the dimensions in order; ``draw(dim, active)`` picks each non-fixed value."""
        params: dict[str, Any] = {}
        for dim in self.dims:
            act = self.active(dim, params)
            if act is None:
                continue
            params[dim.key] = dim.values[0] if dim.fixed else draw(dim, act)
        return params

    def grid(self, seed: int = 0) -> list[dict[str, Any]]:
        """Every combination of the choice dimensions (conditions respected); ranges drawn at random."""
        rng = random.Random(seed)
        points: list[dict[str, Any]] = [{}]
        for dim in self.dims:
            grown: list[dict[str, Any]] = []
            for params in points:
                act = self.active(dim, params)
                if act is None:
                    grown.append(params)
                elif dim.kind == "choice":
                    grown.extend({**params, dim.key: c} for c in act.choices)
                else:
                    grown.append({**params, dim.key: dim.values[0] if dim.fixed else draw_random(dim, rng)})
            points = grown
        return points

    # ------------------------------------------------------------------ configs

    def to_train_dict(self, params: dict[str, Any]) -> dict[str, Any]:
        """Base config with every drawn value set at its path; zero-weight loss terms dropped."""
        data = copy.deepcopy(self.base)
        if any(self.dim(k) and self.dim(k).path.startswith("loss.terms.") for k in params):
            # a drawn term weight changes the effective mix: base terms, else TrainConfig's default
            set_dotted(data, "loss.terms", dict(self.base_value("loss.terms", _default_at("loss.terms"))))
        for key, value in params.items():
            dim = self.dim(key)
            if dim is None:
                continue
            set_dotted(data, dim.path, self.resolve(dim, value, params))
        terms = data.get("loss", {}).get("terms")
        if isinstance(terms, dict):
            data["loss"]["terms"] = {k: v for k, v in terms.items() if not (_is_number(v) and v == 0)}
        return data

    def to_train_config(self, params: dict[str, Any], source: str = "<trial>") -> TrainConfig:
        """Validated TrainConfig for one set of drawn values (raises ConfigError naming the key)."""
        data = self.to_train_dict(params)
        if not data.get("loss", {}).get("terms", True):
            raise ConfigError(f"{source}: every loss term has weight 0; give at least one a positive weight.")
        return parse_config(data, TrainConfig, source=source)

    def max_epochs(self) -> int:
        dim = self.dim("epochs")
        if dim is None:
            return int(self.base_value("epochs", _default_at("epochs")))
        return int(max(dim.values))


def draw_random(dim: Dimension, rng: random.Random) -> Any:
    """A uniform (or log-uniform) draw of a range dimension; a random choice otherwise."""
    if dim.kind == "choice":
        return rng.choice(dim.values)
    lo, hi = dim.values
    if dim.kind == "int":
        return rng.randint(lo, hi)
    if dim.kind == "loguniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.uniform(lo, hi)


def _default_at(path: str) -> Any:
    node: Any = TrainConfig().model_dump()
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _ordered(dims: list[Dimension], source: str) -> list[Dimension]:
    seen: dict[str, str] = {}
    for d in dims:
        if d.path in seen:
            raise ConfigError(f"{source}: space.{d.key} and space.{seen[d.path]} both set {d.path}; keep one.")
        seen[d.path] = d.key
    first = [d for key in ORDER for d in dims if d.key == key]
    return first + [d for d in dims if d.key not in ORDER]
