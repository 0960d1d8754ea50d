"""The search on N workers (issue 23): step budgets from the plan, the worker-steps ledger, the
space around the plan, and PBT, on real data, a real local Ray and MLflow on SQLite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
from ray.tune.search import Searcher
from tiny_search import TINY_BASE
from tiny_search import tiny_search as tiny

from search import parse_search_spec, run_search
from search.around import around_plan
from search.budget import plan_steps
from search.lanes import LaneSearcher, WorkerSteps, trial_share
from search.planned import plan_search
from search.space import SearchSpace
from segcore.config import ConfigError, TrainConfig
from segcore.simulate import generate_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "train", n=4, size=96, seed=1)


def _spec(shapes: Path, tmp_path: Path, **over: Any) -> Any:
    raw = tiny("t-cluster", shapes, tmp_path / "store", **{"max_concurrent_trials": None, **over})
    return parse_search_spec(raw)


def test_steps_plan_and_cluster_take_the_plans_own_step_timing(shapes: Path, tmp_path: Path) -> None:
    spec = _spec(shapes, tmp_path, plan={"enabled": True, "budget_min": 1}, space={},
                 budget={"steps": "plan", "minutes": 0.5}, cluster={"workers": 3, "steps_per_worker": "plan",
                                                                   "minutes": 2},
                 refit={"budget_fraction": 0.5}, num_samples=2)
    planned, _, plan = plan_search(spec, SearchSpace.from_spec(spec))
    assert planned.budget.steps == plan_steps(plan, 0.5)
    assert planned.cluster.steps_per_worker == plan_steps(plan, 2)
    assert planned.budget.steps <= trial_share(planned) == int(planned.cluster.steps_per_worker * 0.5)
    assert plan_steps(plan, 2) > plan_steps(plan, 0.5) > 0


@pytest.mark.parametrize("over, message", [
    ({"budget": {"steps": "plan"}}, "steps: plan needs minutes"),
    ({"budget": {"steps": 100, "minutes": 2}}, "minutes goes with steps: plan only"),
    ({"cluster": {"workers": 2, "steps_per_worker": 50}, "engine": "grid"}, "a grid runs every combination"),
    ({"cluster": {"workers": 2, "steps_per_worker": 50}, "max_concurrent_trials": 3}, "cluster.workers (2)"),
    ({"cluster": {"workers": 2, "steps_per_worker": 50}, "budget": {"minutes": 1}}, "cluster counts optimizer steps"),
    ({"engine": "pbt", "budget": {"steps": 10}, "num_samples": 4}, "remove num_samples"),
    ({"engine": "pbt", "budget": {"steps": 10}, "asha": {"grace_period": 2}}, "remove asha"),
    ({"engine": "pbt"}, "perturbs at step counts"),
    ({"pbt": {"population": 4}}, "settings for engine pbt"),
])
def test_cluster_and_pbt_settings_are_honoured_or_refused(shapes: Path, tmp_path: Path, over: dict,
                                                          message: str) -> None:
    raw = tiny("t-refuse", shapes, tmp_path / "store", **over)
    if "num_samples" not in over:
        raw.pop("num_samples")
    if "max_concurrent_trials" not in over:
        raw.pop("max_concurrent_trials")
    if "asha" not in over:
        raw.pop("asha")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_search_spec(raw)


def test_a_saved_spec_parses_again_as_a_resume_reads_it(shapes: Path, tmp_path: Path) -> None:
    """``gigaseg search --resume`` re-parses the spec saved with every default written out: defaults of
    pbt, asha and num_samples are not settings the user wrote, so they are not refused."""
    space = {k: v for k, v in tiny("x", shapes, tmp_path)["space"].items() if k != "epochs"}
    for over in ({}, {"engine": "pbt", "budget": {"steps": 10}, "num_samples": None, "asha": None, "space": space}):
        raw = {k: v for k, v in tiny("t-saved", shapes, tmp_path / "store", **over).items() if v is not None}
        spec = parse_search_spec(raw)
        assert parse_search_spec(spec.model_dump(mode="json")) == spec


def test_a_trial_budget_above_a_workers_share_is_refused(shapes: Path, tmp_path: Path) -> None:
    space = {k: v for k, v in tiny("x", shapes, tmp_path)["space"].items() if k != "epochs"}
    spec = _spec(shapes, tmp_path, cluster={"workers": 2, "steps_per_worker": 40}, budget={"steps": 30},
                 refit={"budget_fraction": 0.5}, space=space)
    with pytest.raises(ConfigError, match="exceeds a worker's share for trials, 20"):
        plan_search(spec, SearchSpace.from_spec(spec))


class ListSearcher(Searcher):
    """A real (if small) Searcher: hands out numbered configs; records what Tune tells it."""

    def __init__(self) -> None:
        super().__init__(metric="val_miou", mode="max")
        self.n, self.completed = 0, []

    def suggest(self, trial_id: str) -> dict:
        self.n += 1
        return {"params": {"i": self.n}}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.completed.append(trial_id)


def _epoch(lane: LaneSearcher, trial_id: str, epoch: int, per_epoch: int) -> None:
    lane.on_trial_result(trial_id, {"steps": per_epoch * (epoch + 1), "epoch": epoch, "val_miou": 0.5})


def test_lane_searcher_starts_a_trial_only_where_a_worker_holds_its_steps() -> None:
    lane = LaneSearcher(ListSearcher(), workers=2, capacity=10, trial_steps=6)
    assert lane.suggest("t0") and lane.suggest("t1")  # one per worker
    for epoch in range(3):
        _epoch(lane, "t0", epoch, 2)
    lane.on_trial_complete("t0")  # 6 steps on worker 0: 4 left, less than a trial
    assert lane.suggest("t2") is None  # wait: t1's worker may still free up
    _epoch(lane, "t1", 0, 2)
    lane.on_trial_complete("t1")  # stopped early (ASHA) after 2 steps: 8 left on worker 1
    assert lane.suggest("t2") == {"params": {"i": 3}}
    for epoch in range(3):
        _epoch(lane, "t2", epoch, 2)
    lane.on_trial_complete("t2")
    assert lane.suggest("t3") == Searcher.FINISHED
    assert sorted(lane.lanes.used) == [6.0, 8.0]
    assert lane.searcher.completed == ["t0", "t1", "t2"]


def test_worker_steps_place_trials_as_a_cluster_would_and_leave_the_rest_to_the_refit() -> None:
    used = WorkerSteps({"a_00000": 60.0, "a_00001": 20.0, "a_00002": 50.0, "a_00003": 30.0}, workers=2,
                       per_worker=100)
    assert used.lanes == [90.0, 70.0]  # 00002 on the worker free first (after 20), then 00003 after 60
    assert used.trials == 160 and used.budget == 200
    assert used.refit_steps() == 10  # starts when the busiest worker is free: no worker above 100


def test_the_default_space_is_centred_on_the_plan_and_keeps_what_the_user_wrote() -> None:
    cfg = TrainConfig.model_validate({
        "model": {"arch": "ResUNet", "arch_kwargs": {"full_res_channels": 16}},
        "loss": {"terms": {"tversky": 1.0, "focal": 0.5}}, "optim": {"lr": 0.002},
        "data": {"patch_size": 128}, "augment": {"strength": 0.4}})
    space = around_plan(cfg, min_side=200, minimum_patch=64, written={})
    assert space["architecture"] == {"choice": ["ResUNet", "Unet"]}
    shallow = space["arch_kwargs"]["choice"][1]
    assert shallow["ResUNet"]["encoder_depth"] == 4 and shallow["Unet"]["decoder_channels"] == [256, 128, 64, 32]
    assert space["arch_kwargs"]["choice"][0] == {"ResUNet": {"full_res_channels": 16}, "Unet": {}}
    assert space["lr"] == {"loguniform": [pytest.approx(0.002 / 3), pytest.approx(0.006)]}
    assert space["loss.terms.focal"] == {"uniform": [0.25, 1.0]}
    assert space["patch_size"] == {"choice": [64, 128]}  # 256 is above the smallest image side
    assert space["augment"] == {"uniform": [0.2, 0.8]}
    kept = around_plan(cfg, 200, 64, written={"optim": {"lr": 0.01}, "model": {"arch": "Unet"}})
    assert "lr" not in kept and "architecture" not in kept and "arch_kwargs" not in kept


def test_pbt_then_a_refit_on_both_workers_within_the_worker_steps(
        ray_local, mlflow_sqlite, shapes: Path, tmp_path: Path) -> None:
    """2 workers x 32 steps, half for the trials: a population of 2 over lr and the focal weight, 16
    steps each, perturbing once, at 8 steps (the worse member copies the better one's weights: its run
    gets a pbt.exploit tag; every member finishes its steps); then the best member refitted from its
    weights on both workers (DDP, gloo) for the 16 steps each has left. The parent run holds the
    worker-steps, never above N x C (+ less than an epoch per run)."""
    space = {"lr": {"loguniform": [1e-3, 1e-2]}, "focal_weight": {"uniform": [0.0, 1.0]}, "patch_size": 64}
    raw = tiny("t-pbt", shapes, tmp_path / "store", engine="pbt", space=space,
               base={**TINY_BASE, "data": {**TINY_BASE["data"], "patches_per_epoch": 32}},
               cluster={"workers": 2, "steps_per_worker": 32}, pbt={"perturbation_interval": 0.5, "burn_in": 0.25},
               refit={"budget_fraction": 0.5},
               resources={"cpus_per_trial": 1}, champion={"ensemble_size": 1, "tta": "off", "calibrate": False})
    for key in ("num_samples", "max_concurrent_trials", "asha", "tpe_startup_trials"):
        raw.pop(key)
    outcome = run_search(parse_search_spec(raw))
    assert outcome.counts["completed"] == 2 and outcome.champion_uri

    client = mlflow.MlflowClient(mlflow_sqlite)
    exp = client.get_experiment_by_name("t-pbt")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    members = [r for r in runs if r.data.tags.get("gigaseg.kind") != "refit"]
    assert len(members) == 2  # one run per member, clones included
    (refit,) = [r for r in runs if r.data.tags.get("gigaseg.kind") == "refit"]
    assert refit.data.params["refit.workers"] == "2" and refit.data.params["refit.steps_per_worker"] == "16"
    assert refit.data.params["refit.start_from"].startswith("models:/")
    assert max(m.value for m in client.get_metric_history(refit.info.run_id, "steps")) >= 16  # per worker
    assert list((tmp_path / "store" / "t-pbt" / "_train").glob("refit-*/checkpoint_*"))  # a Ray Train run
    runs = members
    exploits = [v for r in runs for k, v in r.data.tags.items() if k.startswith("pbt.exploit.")]
    assert exploits and all("cloned trial" in e for e in exploits)
    for run in runs:
        steps = [m.value for m in client.get_metric_history(run.info.run_id, "steps")]
        assert max(steps) >= 16  # every member trained its whole budget
    cloned = next(r for r in runs if any(k.startswith("pbt.exploit.") for k in r.data.tags))
    assert json.loads(cloned.data.tags["pbt.params"]).keys() >= {"lr", "focal_weight"}
    parent = client.get_run(outcome.parent_run_id).data.metrics
    assert parent["worker_steps_budget"] == 64
    assert 32 <= parent["worker_steps_trials"] <= 32 + 2 * 4  # + < 1 epoch (4 steps) per member
    # counted on the driver from every result (a clone's result.json, copied back from storage, may lag)
    ledger = json.loads((tmp_path / "store" / "t-pbt" / "worker_steps.json").read_text())
    assert len(ledger) == 2 and sum(ledger.values()) == parent["worker_steps_trials"]
    assert 32 <= parent["worker_steps_refit"] <= 32 + 2 * 4
    assert parent["worker_steps_used"] == parent["worker_steps_trials"] + parent["worker_steps_refit"] <= 64 + 16
