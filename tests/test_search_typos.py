"""Config typos name the bad key and suggest the nearest valid one (pure unit tests, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.spec import parse_search_spec
from segcore.config import ConfigError, TrainConfig, parse_config


def search_dict(data_dir: Path, space: dict | None = None, **top: object) -> dict:
    spec = {"name": "t", "data": {"train": str(data_dir)},
            "space": {"architecture": {"choice": ["Unet", "FPN"]}, "lr": {"loguniform": [1e-4, 1e-2]},
                      "patch_size": 64, "epochs": 2, **(space or {})}}
    spec.update(top)
    return spec


def search_error(data_dir: Path, space: dict | None = None, **top: object) -> str:
    with pytest.raises(ConfigError) as err:
        parse_search_spec(search_dict(data_dir, space, **top), source="s.yaml")
    return str(err.value)


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [
        ({"optim": {"lrr": 1e-3}}, "optim.lrr", "'lr'"),
        ({"epoch": 3}, "epoch", "'epochs'"),
        ({"model": {"arhc": "Unet"}}, "model.arhc", "'arch'"),
        ({"data": {"patch_sise": 64}}, "data.patch_sise", "'patch_size'"),
    ],
)
def test_train_config_unknown_key_suggests_the_nearest(data: dict, key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, TrainConfig, source="train.yaml")
    assert f"{key}: unknown key" in str(err.value)
    assert f"did you mean {suggestion}?" in str(err.value)


def test_unknown_key_far_from_everything_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"optim": {"zzzz": 1}}, TrainConfig, source="train.yaml")
    assert "did you mean" not in str(err.value) and "(valid: lr, momentum" in str(err.value)


@pytest.mark.parametrize(
    ("top", "key", "suggestion"),
    [
        ({"engin": "tpe"}, "engin", "'engine'"),
        ({"asha": {"grace_perod": 2}}, "asha.grace_perod", "'grace_period'"),
        ({"resources": {"cpu_per_trial": 1}}, "resources.cpu_per_trial", "'cpus_per_trial'"),
        ({"base": {"optim": {"weight_decy": 0.1}}}, "optim.weight_decy", "'weight_decay'"),
    ],
)
def test_search_yaml_unknown_key_suggests_the_nearest(tmp_path: Path, top: dict, key: str, suggestion: str) -> None:
    message = search_error(tmp_path, **top)
    assert f"{key}: unknown key" in message and f"did you mean {suggestion}?" in message


@pytest.mark.parametrize(
    ("space", "key", "suggestion"),
    [
        ({"patch_sise": 64}, "space.patch_sise", "'patch_size'"),
        ({"focal_wieght": {"uniform": [0.0, 1.0]}}, "space.focal_wieght", "'focal_weight'"),
        ({"learning_rate": 1e-3}, "space.learning_rate", None),
        ({"optim.weight_decy": 0.1}, "space.optim.weight_decy", "'weight_decay'"),
    ],
)
def test_search_space_shorthand_typo_suggests_the_shorthand(tmp_path: Path, space: dict, key: str,
                                                            suggestion: str | None) -> None:
    message = search_error(tmp_path, space)
    assert f"{key}: unknown key" in message
    if suggestion:
        assert f"did you mean {suggestion}?" in message
    if "." not in key.removeprefix("space."):
        assert "the shorthands" in message and "patch_size" in message  # the valid list names them


def test_mistyped_operator_names_the_operator_key(tmp_path: Path) -> None:
    message = search_error(tmp_path, {"lr": {"choise": [1e-3, 1e-2]}})
    assert "space.lr.choise: unknown operator 'choise'; did you mean 'choice'?" in message
    assert "Input should be" not in message  # not a type error on optim.lr
    message = search_error(tmp_path, {"focal_weight": {"unifrom": [0.0, 1.0]}})
    assert "space.focal_weight.unifrom" in message and "did you mean 'uniform'?" in message
    assert "space.lr.foo: unknown operator 'foo' (valid: choice" in search_error(tmp_path, {"lr": {"foo": [1, 2]}})
    assert "must be the only key" in search_error(tmp_path, {"lr": {"choice": [1e-3], "log": True}})


def test_mappings_that_are_values_are_not_taken_for_operators(tmp_path: Path) -> None:
    per_arch = {"Unet": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}, "FPN": {"encoder_depth": 3}}
    spec = parse_search_spec(search_dict(tmp_path, {"arch_kwargs": per_arch, "optim": {"weight_decay": 0.0}}))
    assert spec.space["arch_kwargs"] == per_arch


def test_seed_config_typo_suggests_the_dimension(tmp_path: Path) -> None:
    message = search_error(tmp_path, seed_configs=[{"lrr": 1e-3}])
    assert "seed_configs[0].lrr: not a searched dimension; did you mean 'lr'?" in message
