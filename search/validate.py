"""Validation of a search space before anything starts; every error names the YAML key.

Checks: ``base`` is a valid partial TrainConfig; every dimension names a TrainConfig field and
every choice (and both ends of every range) validates when applied to ``base``; each listed
architecture has at least one valid encoder (segcore's ``list_valid_combinations``); loss terms
are registered; weight files exist; seed configurations use searched keys with allowed values.

``space`` is the :class:`search.space.SearchSpace` being built (its ``from_spec`` calls
:func:`validate_space`) and ``spec`` its :class:`search.spec.SearchSpec`; both are typed ``Any``
because this module sits below them (``tests/test_layers.py``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from search.budget import asha_clock
from search.dimensions import NONE_WORDS, Dimension, check_path, is_per_arch, to_config_value
from segcore.config import ConfigError, TrainConfig, did_you_mean, parse_config, set_dotted


def validate_space(space: Any, spec: Any, source: str) -> None:
    """Raise ConfigError for the first problem in ``spec.base``, ``spec.space`` or the seeds."""
    parse_config(space.base, TrainConfig, source=f"{source}: base")
    _check_loss_terms(space, source)
    for dim in space.dims:
        _check_dimension(space, dim, source)
    space.encoders_for = _valid_encoders(space, source)
    _check_seeds(space, spec, source)
    _check_asha(space, spec, source)


def _check_dimension(space: Any, dim: Dimension, source: str) -> None:
    where = f"{source}: space.{dim.key}"
    problem = check_path(dim.path)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    for value in dim.values:
        for one in _per_arch_values(dim, value):
            data = copy.deepcopy(space.base)
            set_dotted(data, dim.path, to_config_value(dim, one))
            parse_config(data, TrainConfig, source=f"{where} = {one!r}")
    if dim.path == "model.encoder_weights":
        for value in (v for raw in dim.values for v in _per_arch_values(dim, raw)):
            if value is None or str(value).lower() in (*NONE_WORDS, "imagenet"):
                continue
            if not Path(str(value)).expanduser().is_file():
                raise ConfigError(f"{where}: weights file {value!r} not found (use an absolute path, or none).")


def _per_arch_values(dim: Dimension, value: Any) -> list[Any]:
    """Per-architecture kwargs / per-encoder weights: each entry is checked on its own."""
    if (dim.path == "model.arch_kwargs" and is_per_arch(value)) or (
        dim.path == "model.encoder_weights" and isinstance(value, dict)
    ):
        return list(value.values())
    return [value]


def _check_loss_terms(space: Any, source: str) -> None:
    from segcore.losses import LOSSES

    names = set(space.base_value("loss.terms", {}) or {})
    names |= {d.path.split(".")[2] for d in space.dims if d.path.startswith("loss.terms.")}
    for name in sorted(names):
        if name not in LOSSES:
            raise ConfigError(f"{source}: loss term {name!r}: {LOSSES.unknown_message(name)}")


def _choices(space: Any, key: str) -> list[Any]:
    dim = space.dim(key)
    if dim is None or dim.kind != "choice":
        return [dim.values[0] if dim else space.current(key, {})]
    return list(dim.values)


def _valid_encoders(space: Any, source: str) -> dict[str, tuple[str, ...]]:
    """arch -> encoders valid with it (among the listed ones) at the smallest patch size."""
    from segcore.models import ARCHITECTURES, list_valid_combinations

    archs, encoders = _choices(space, "architecture"), _choices(space, "encoder")
    for arch in archs:
        if arch not in ARCHITECTURES:
            raise ConfigError(f"{source}: space.architecture: {ARCHITECTURES.unknown_message(str(arch))}")
    patch = min(int(p) for p in _choices(space, "patch_size"))
    combos = list_valid_combinations(archs=archs, encoders=encoders, image_size=patch)
    valid = {arch: tuple(e for a, e in combos if a == arch) for arch in archs}
    for arch, encs in valid.items():
        if not encs:
            raise ConfigError(
                f"{source}: space.encoder: none of {encoders} is valid with architecture {arch!r} at patch "
                f"size {patch}; add an encoder that is, or drop {arch!r} from space.architecture."
            )
    return valid


def _check_seeds(space: Any, spec: Any, source: str) -> None:
    if spec.seed_configs and spec.engine == "grid":
        raise ConfigError(f"{source}: seed_configs: only used by engine tpe or random (a grid tries everything).")
    searched = {d.key: d for d in space.dims if not d.fixed}
    for i, seed in enumerate(spec.seed_configs):
        where = f"{source}: seed_configs[{i}]"
        for key, value in seed.items():
            dim = searched.get(key)
            if dim is None:
                hint = did_you_mean(str(key), searched)
                raise ConfigError(f"{where}.{key}: not a searched dimension{';' + hint if hint else ''} "
                                  f"(searched: {', '.join(searched)}).")
            if key == "encoder" and "architecture" in searched and "architecture" not in seed:
                raise ConfigError(f"{where}.encoder: also give architecture (encoders depend on it).")
            act = space.active(dim, seed)
            if act is None:
                raise ConfigError(f"{where}.{key}: does not apply to this configuration (see its conditions).")
            _check_value(dim, act.choices, value, f"{where}.{key}")


def _check_value(dim: Dimension, choices: tuple[Any, ...], value: Any, where: str) -> None:
    if dim.kind == "choice":
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}.")
        return
    lo, hi = dim.values
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: {value!r} is outside [{lo}, {hi}].")
    if dim.kind == "int" and not float(value).is_integer():
        raise ConfigError(f"{where}: {value!r} is not a whole number.")


def _check_asha(space: Any, spec: Any, source: str) -> None:
    asha = spec.asha
    if getattr(spec, "engine", None) == "pbt" or getattr(getattr(spec, "budget", None), "steps", None) == "plan":
        return  # PBT schedules without ASHA; the plan's steps are known once it is timed (search/planned.py)
    if asha.enabled and getattr(spec, "budget", None) is not None:  # compared in the budget's unit
        clock = asha_clock(spec, space.to_train_config({}, source=source), space.max_epochs())
        if clock.grace_period > clock.max_t:
            raise ConfigError(f"{source}: asha.grace_period ({asha.grace_period} epochs = {clock.grace_period:.4g} "
                              f"{clock.time_attr}; {clock.why}) exceeds max_t ({clock.max_t:.4g}); lower "
                              "asha.grace_period or raise the budget.")
        return
    max_t = asha.max_t or space.max_epochs()
    if asha.enabled and asha.grace_period is not None and asha.grace_period > max_t:
        raise ConfigError(f"{source}: asha.grace_period ({asha.grace_period}) exceeds max_t ({max_t}).")


def seed_to_optuna(space: Any, seed: dict[str, Any]) -> dict[str, Any]:
    """A seed configuration with Optuna's parameter names (``encoder`` -> ``encoder__<arch>``)."""
    out = {}
    for key, value in seed.items():
        dim = space.dim(key)
        act = space.active(dim, seed) if dim else None
        out[act.name if act else key] = value
    return out
