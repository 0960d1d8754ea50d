"""The search space: its dimensions (:mod:`search.dimensions`) parsed, validated
(:mod:`search.validate`), sampled (Optuna define-by-run) and enumerated (grid).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from search.dimensions import ALIASES, Dimension, is_number, is_per_arch, parse_dimension, to_config_value
from search.validate import validate_space
from segcore.config import ConfigError, TrainConfig, parse_config, set_dotted

# Conditional dimensions are resolved in this order, then the rest in YAML order.
ORDER = ("architecture", "encoder", "encoder_weights", "freeze", "unfreeze_epoch")


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
            data["loss"]["terms"] = {k: v for k, v in terms.items() if not (is_number(v) and v == 0)}
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
