"""Search YAML validation, the conditional space, grid enumeration and the Optuna PRUNED fix (no Ray cluster)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search.engines import DefineByRun, EpochBudget, PruningAwareOptunaSearch
from search.space import SearchSpace
from search.spec import load_search_spec, parse_search_spec
from search.validate import seed_to_optuna
from segcore.config import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "search" / "examples"


def spec_dict(data_dir: Path, **over) -> dict:
    base = {
        "name": "t",
        "data": {"train": str(data_dir)},
        "space": {
            "architecture": {"choice": ["Unet", "FPN"]},
            "encoder": {"choice": ["resnet18", "resnet34"]},
            "encoder_weights": {"choice": ["none", str(data_dir / "w.pth")]},
            "freeze": {"choice": ["full", "frozen-encoder", "staged"]},
            "unfreeze_epoch": {"int": [1, 3]},
            "focal_weight": {"choice": [0.0, 0.5]},
            "focal_gamma": {"uniform": [1.0, 3.0]},
            "lr": {"loguniform": [1e-4, 1e-2]},
            "patch_size": 64,
            "epochs": 2,
        },
    }
    base.update(over)
    return base


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "w.pth").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"engin": "tpe"}, "engin"),
        ({"space": {"lrr": {"loguniform": [1e-4, 1e-2]}}}, "lrr"),
        ({"space": {"optimizer": {"choice": ["adamw", "lion"]}}}, "space.optimizer"),
        ({"space": {"lr": {"loguniform": [0, 1e-2]}}}, "space.lr"),
        ({"space": {"architecture": {"choice": ["Unet", "Unett"]}}}, "Unett"),
        ({"space": {"loss.terms.dicee": 1.0}}, "dicee"),
        ({"space": {"encoder_weights": "/nope/w.pth"}}, "space.encoder_weights"),
        ({"asha": {"grace_period": 0}}, "asha.grace_period"),
        ({"resources": {"gpus_per_trial": 1.5}}, "resources"),
        ({"seed_configs": [{"lr": 5.0}]}, "seed_configs[0].lr"),
        ({"seed_configs": [{"batch_size": 8}]}, "seed_configs[0].batch_size"),
        ({"base": {"optim": {"lr": -1}}}, "optim.lr"),
        ({"data": {"train": "/nope"}}, "data.train"),
    ],
)
def test_errors_name_the_bad_key(data_dir: Path, change: dict, needle: str) -> None:
    data = spec_dict(data_dir)
    for key, value in change.items():
        if key == "space":
            data["space"].update(value)
        elif key == "data":
            data["data"] = value
        else:
            data[key] = value
    with pytest.raises(ConfigError) as err:
        parse_search_spec(data, source="s.yaml")
    assert needle in str(err.value)


def test_examples_validate(tmp_path: Path) -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        data["data"] = {"train": str(tmp_path)}
        data.get("space", {}).pop("encoder_weights", None)
        spec = parse_search_spec(data, source=str(path))
        assert SearchSpace.from_spec(spec).dims or "space" not in data, path.name  # none: the space around the plan
    with pytest.raises(ConfigError, match="not found"):
        load_search_spec(tmp_path / "missing.yaml")


def test_define_by_run_names_encoder_per_arch_and_respects_conditions(data_dir: Path) -> None:
    spec = parse_search_spec(spec_dict(data_dir))
    space = SearchSpace.from_spec(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    fn = DefineByRun(space)
    for _ in range(40):
        trial = study.ask()
        params = fn(trial)["params"]
        study.tell(trial, 0.0)
        assert f"encoder__{params['architecture']}" in trial.params and "encoder" not in trial.params
        weights = params["encoder_weights"] != "none"
        assert ("freeze" in params) == weights
        assert ("unfreeze_epoch" in params) == (params.get("freeze") == "staged")
        assert ("focal_gamma" in params) == (params["focal_weight"] > 0)
        cfg = space.to_train_config(params)
        assert cfg.model.arch == params["architecture"] and cfg.model.encoder == params["encoder"]
        assert ("focal" in cfg.loss.terms) == (params["focal_weight"] > 0)  # zero-weight terms dropped
        assert cfg.model.encoder_weights == (None if not weights else str(data_dir / "w.pth"))
    assert seed_to_optuna(space, {"architecture": "FPN", "encoder": "resnet34"}) == {
        "architecture": "FPN", "encoder__FPN": "resnet34"}


def test_grid_enumerates_valid_conditional_combinations(data_dir: Path) -> None:
    data = spec_dict(data_dir, engine="grid")
    data["space"].pop("unfreeze_epoch")
    space = SearchSpace.from_spec(parse_search_spec(data))
    points = space.grid(seed=0)
    # 2 archs x 2 encoders x (no weights: 1 | weights: 3 freeze) x 2 focal weights
    assert len(points) == 2 * 2 * (1 + 3) * 2
    assert len({tuple(sorted((k, str(v)) for k, v in p.items() if k != "lr")) for p in points}) == len(points)
    assert all("lr" in p for p in points)


def test_asha_stopped_trials_are_told_to_optuna_as_pruned() -> None:
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    searcher = PruningAwareOptunaSearch(space=space, metric="val_miou", mode="max", seed=0)
    for trial_id in ("done", "stopped", "crashed"):
        searcher.suggest(trial_id)
        searcher.on_trial_result(trial_id, {"val_miou": 0.3, "training_iteration": 1})
    searcher.on_trial_complete("done", {"val_miou": 0.5, "training_iteration": 2, "is_last": 1.0})
    searcher.on_trial_complete("stopped", {"val_miou": 0.4, "training_iteration": 2, "is_last": 0.0})
    searcher.on_trial_complete("crashed", None, error=True)
    trials = searcher._ot_study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].value == 0.5
    assert trials[1].intermediate_values == {1: 0.3, 2: 0.4}  # the stopping result is kept as a step


def test_per_encoder_weights_and_per_arch_kwargs_and_dict_choices(data_dir: Path) -> None:
    data = spec_dict(data_dir)
    data["space"]["encoder_weights"] = {"choice": ["none", {"resnet18": str(data_dir / "w.pth")}]}
    data["space"]["arch_kwargs"] = {"Unet": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}
    space = SearchSpace.from_spec(parse_search_spec(data))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        params = DefineByRun(space)(trial)["params"]
        study.tell(trial, 0.0)
        cfg = space.to_train_config(params)
        weighted = params["encoder_weights"] != "none" and params["encoder"] == "resnet18"
        assert (cfg.model.encoder_weights is not None) == weighted
        assert ("freeze" in params) == weighted  # no weights for resnet34: freezing is meaningless
        assert cfg.model.arch_kwargs == ({"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
                                         if params["architecture"] == "Unet" else {})
        seen.add(weighted)
    assert seen == {True, False}
    data["space"]["encoder_weights"] = {"resnet18": "/nope.pth"}
    with pytest.raises(ConfigError, match="space.encoder_weights"):
        parse_search_spec(data)


def test_epoch_budget_counts_each_trial_epoch_once() -> None:
    budget = EpochBudget(3)
    for trial_id, iteration in [("a", 1), ("a", 2), ("a", 2), ("b", 1)]:  # ("a", 2) again: Tune's final repeat
        assert not budget.stop_all()
        budget(trial_id, {"training_iteration": iteration})
    assert budget.stop_all()


def test_cli_dry_run_validates_and_reports_the_bad_key(data_dir: Path, tmp_path: Path, capsys, caplog) -> None:
    from segcore.cli import main as gigaseg
    from segcore.simulate import generate_shapes

    generate_shapes(data_dir, n=2, size=64, seed=0)  # the dry run checks the data as a real run does
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec_dict(data_dir, engine="grid")))
    assert gigaseg(["search", "--config", str(good), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "encoder__" not in out and "valid encoders for FPN" in out and "grid:" in out
    assert "2 samples, 1 channel(s), classes background, line, ellipse" in out
    assert "merged under base:" in out and "data.patch_size = " in out  # the plan a real run would use
    assert "budget per trial: epochs -> epochs " in out and "ASHA on training_iteration" in out
    stepped = tmp_path / "stepped.yaml"
    space = {k: v for k, v in spec_dict(data_dir)["space"].items() if k != "epochs"}
    stepped.write_text(yaml.safe_dump(spec_dict(data_dir, space=space, budget={"steps": 40})))
    assert gigaseg(["search", "--config", str(stepped), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trial 0 = the plan: {'architecture': 'Unet'" in out
    assert "budget per trial: steps 40 -> epochs " in out and "ASHA on steps: grace_period " in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_dict(data_dir, asha={"grace_perod": 2})))
    assert gigaseg(["search", "--config", str(bad)]) == 2
    assert "asha.grace_perod" in caplog.text


# ----------------------------------------------------------------------------- budgets (issue 9 item 2)


@pytest.mark.parametrize(("budget", "unit"), [({"steps": 300}, "steps"), ({"minutes": 2.5}, "minutes"),
                                              ({"unit": "steps", "steps": 5}, "steps"), (None, None)])
def test_budget_accepts_steps_or_minutes(data_dir: Path, budget, unit) -> None:
    space = {k: v for k, v in spec_dict(data_dir)["space"].items() if k != "epochs"}
    spec = parse_search_spec(spec_dict(data_dir, space=space, budget=budget), source="s.yaml")
    assert (spec.budget.unit if spec.budget else None) == unit


@pytest.mark.parametrize(("budget", "needle"), [
    ({"steps": 0}, "budget.steps.steps"),
    ({"minutes": -1}, "budget.minutes.minutes"),
    ({"epochs": 3}, "write {steps: N}, {steps: plan, minutes: T} or {minutes: M}"),
    ({"steps": 3, "minutes": 1}, "minutes goes with steps: plan only"),
    ({"steps": 10, "minuts": 1}, "minuts"),
    (5, "write {steps: N}"),
])
def test_bad_budget_names_the_key(data_dir: Path, budget, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_search_spec(spec_dict(data_dir, budget=budget), source="s.yaml")
    assert needle in str(err.value)


def test_steps_budget_refuses_a_searched_epochs(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="space.epochs conflicts with budget.steps"):
        parse_search_spec(spec_dict(data_dir, budget={"steps": 100}), source="s.yaml")
    minutes = parse_search_spec(spec_dict(data_dir, budget={"minutes": 3}), source="s.yaml")
    assert minutes.budget.minutes == 3  # epochs is then the cap


@pytest.mark.parametrize(("steps", "ppe", "batch", "world", "expected"), [
    (1000, 512, 16, 1, (31, 528)),  # 32 steps/epoch: round(31.25) = 31 epochs of ceil(1000/31) = 33 steps
    (64, 512, 16, 1, (2, 512)),  # exact
    (5, 512, 16, 1, (1, 80)),  # fewer steps than one epoch: one shorter epoch
    (6, 16, 4, 1, (2, 12)),  # round(1.5) = 2 epochs of 3 steps
    (100, 512, 16, 2, (6, 544)),  # DDP: 16 steps/epoch per rank
    (7, 10, 16, 1, (7, 16)),  # patches below one batch: 1 step per epoch
])
def test_fit_steps_rounding(steps, ppe, batch, world, expected) -> None:
    from search.budget import fit_steps, steps_per_epoch

    epochs, new_ppe = fit_steps(steps, ppe, batch, world)
    assert (epochs, new_ppe) == expected
    total = epochs * steps_per_epoch(new_ppe, batch, world)
    assert steps <= total < steps + epochs
    epochs, new_ppe = fit_steps(steps, ppe, batch, world, rounding="at_most")  # a cluster's: never above
    assert epochs == expected[0]
    total = epochs * steps_per_epoch(new_ppe, batch, world)
    assert steps - epochs < total <= steps


def test_apply_budget_and_asha_clock(data_dir: Path) -> None:
    from search.budget import apply_budget, asha_clock
    from search.engines import build_scheduler
    from segcore.config import TrainConfig

    cfg = TrainConfig.model_validate({"epochs": 7, "data": {"patches_per_epoch": 64, "batch_size": 8}})
    stepped = apply_budget(cfg, parse_search_spec(spec_dict(data_dir, space={"patch_size": 64},
                                                            budget={"steps": 40}), "s").budget)
    assert (stepped.epochs, stepped.data.patches_per_epoch, stepped.max_minutes) == (5, 64, None)
    assert apply_budget(cfg, None) == cfg

    raw = spec_dict(data_dir, space={"patch_size": 64, "batch_size": {"choice": [4, 8]}},
                    base={"epochs": 4, "data": {"patches_per_epoch": 64, "batch_size": 8}},
                    asha={"grace_period": 2, "reduction_factor": 2})
    spec = parse_search_spec({**raw, "budget": {"steps": 40}}, "s")
    space = SearchSpace.from_spec(spec)
    clock = asha_clock(spec, space.to_train_config({}), space.max_epochs())
    assert (clock.time_attr, clock.grace_period, clock.max_t) == ("steps", 16, 40)  # 8 steps/epoch x 2
    assert build_scheduler(spec, space)._time_attr == "steps"

    spec = parse_search_spec({**raw, "budget": {"minutes": 6}}, "s")
    clock = asha_clock(spec, space.to_train_config({}), space.max_epochs())
    assert (clock.time_attr, clock.grace_period, clock.max_t) == ("train_minutes", 3.0, 6.0)  # 6 min / 4 epochs x 2
    assert apply_budget(cfg, spec.budget).max_minutes == 6

    spec = parse_search_spec(raw, "s")
    clock = asha_clock(spec, space.to_train_config({}), space.max_epochs())
    assert (clock.time_attr, clock.grace_period, clock.max_t) == ("training_iteration", 2, 4)


def test_asha_without_a_grace_period_first_judges_a_one_cycle_trial_after_its_warm_up(data_dir: Path) -> None:
    """Before the warm-up ends every trial still predicts background: ASHA's first rung waits for
    it (30 % of the trial budget) under one-cycle, and stays at one epoch otherwise."""
    from search.budget import asha_clock

    base = {"epochs": 4, "optim": {"schedule": "one_cycle"}, "data": {"patches_per_epoch": 64, "batch_size": 8}}
    raw = spec_dict(data_dir, space={"patch_size": 64}, base=base, budget={"minutes": 6})
    spec = parse_search_spec(raw, "s")
    space = SearchSpace.from_spec(spec)
    clock = asha_clock(spec, space.to_train_config({}), space.max_epochs())
    assert spec.asha.grace_period is None and clock.grace_period == pytest.approx(1.8) and "warm-up" in clock.why
    cosine = parse_search_spec({**raw, "base": {**base, "optim": {"schedule": "cosine_restarts"}}}, "s")
    space = SearchSpace.from_spec(cosine)
    assert asha_clock(cosine, space.to_train_config({}), space.max_epochs()).grace_period == 1.5  # 1 epoch
    epochs = parse_search_spec({k: v for k, v in raw.items() if k != "budget"} | {"space": {"epochs": 20}}, "s")
    space = SearchSpace.from_spec(epochs)
    assert asha_clock(epochs, space.to_train_config({}), space.max_epochs()).grace_period == 6  # ceil(0.3 x 20)


def test_asha_lets_the_plan_run_to_its_end_and_halves_the_others(data_dir: Path) -> None:
    """Real ASHA decisions on real (stub) Tune trials: at the first rung the plan (trial 0's params)
    scores as badly as a sampled trial; the sampled one is stopped, the plan is not, until max_t."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from search.engines import build_scheduler

    plan = {"lr": 0.002}
    raw = spec_dict(data_dir, space={"lr": {"loguniform": [1e-4, 1e-2]}},
                    base={"epochs": 4, "optim": {"schedule": "one_cycle"}}, asha={"grace_period": 1})
    spec = parse_search_spec({**raw, "seed_configs": [plan]}, "s")
    scheduler = build_scheduler(spec, SearchSpace.from_spec(spec))
    scheduler.set_search_properties("val_miou", "max")
    good, bad, planned = (Trial("t", config={"params": {"lr": lr}}, stub=True) for lr in (0.01, 0.0001, 0.002))
    for trial in (good, bad, planned):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {"training_iteration": 1, "val_miou": 0.8}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, planned, {"training_iteration": 1, "val_miou": 0.3}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {"training_iteration": 1, "val_miou": 0.3}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, planned, {"training_iteration": 4, "val_miou": 0.9}) == TrialScheduler.STOP
    off = parse_search_spec({**raw, "seed_configs": [plan], "asha": {"grace_period": 1, "keep_plan": False}}, "s")
    plain = build_scheduler(off, SearchSpace.from_spec(off))
    plain.set_search_properties("val_miou", "max")
    for trial in (good, planned):
        plain.on_trial_add(None, trial)
    plain.on_trial_result(None, good, {"training_iteration": 1, "val_miou": 0.8})
    assert plain.on_trial_result(None, planned, {"training_iteration": 1, "val_miou": 0.3}) == TrialScheduler.STOP


def test_asha_grace_is_checked_in_the_budget_unit(data_dir: Path) -> None:
    space = {"patch_size": 64}
    base = {"data": {"patches_per_epoch": 64, "batch_size": 8}}  # 8 steps per epoch
    ok = spec_dict(data_dir, space=space, base=base, budget={"steps": 16}, asha={"grace_period": 2})
    assert parse_search_spec(ok, "s").budget.steps == 16
    with pytest.raises(ConfigError, match=r"asha.grace_period \(3 epochs = 24 steps"):
        parse_search_spec({**ok, "asha": {"grace_period": 3}}, "s")
