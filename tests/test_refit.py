"""Refit (search/refit.py): the trials get (1 - f) of the time budget, then the best trial's
configuration is retrained for longer in a nested MLflow run, kept only if it scores better."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from tiny_search import tiny_search as tiny

from search import parse_search_spec, run_search
from search.refit import (
    KEPT_TAG,
    RefitPlan,
    beats,
    refit_cpus,
    reserved_seconds,
    trial_time_budget_s,
    with_cpus,
)
from search.spec import ResourcesSection
from segcore.config import TrainConfig
from segcore.simulate import generate_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "train", n=4, size=96, seed=1)


def test_refit_budget_split(shapes: Path, tmp_path: Path) -> None:
    spec = parse_search_spec(tiny("split", shapes, tmp_path, time_budget_s=100, refit={"budget_fraction": 0.3}))
    assert trial_time_budget_s(spec) == pytest.approx(70.0)
    assert reserved_seconds(spec, []) == pytest.approx(30.0)
    # no time budget: the refit's share of trials + refit, from the trials' wall time (first start to last report)
    spec = parse_search_spec(tiny("split", shapes, tmp_path, refit={"budget_fraction": 0.25}))
    results = [SimpleNamespace(metrics={"timestamp": 130.0, "time_total_s": 30.0}),
               SimpleNamespace(metrics={"timestamp": 160.0, "time_total_s": 40.0})]
    assert trial_time_budget_s(spec) is None
    assert reserved_seconds(spec, results) == pytest.approx(60.0 / 3)
    assert beats(0.8, 0.7, "max") and not beats(0.7, 0.7, "max") and beats(0.1, 0.2, "min")
    assert not beats(float("nan"), 0.1, "max")


@pytest.mark.slow
@pytest.mark.ray
def test_refit_child_runs(ray_local, mlflow_sqlite, shapes, tmp_path, caplog) -> None:
    """refit.top_k 2: both trials are refitted side by side from their own weights, each in its own
    nested run; the parent notes the best trial's; every kept refit is an ensemble candidate."""
    over = {"num_samples": 2, "asha": {"enabled": False}, "refit": {"budget_fraction": 0.6, "top_k": 2},
            "champion": {"tta": "off"}}
    spec = parse_search_spec(tiny("tiny-refit", shapes, tmp_path / "runs", **over))
    with caplog.at_level(logging.INFO, logger="search"):
        outcome = run_search(spec)
    assert outcome.champion_uri == "models:/tiny-refit-model@champion"
    client = mlflow.MlflowClient(mlflow_sqlite)
    exp = client.get_experiment_by_name("tiny-refit")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    trials = {r.data.tags["gigaseg.trial_id"]: r for r in children if "gigaseg.trial_id" in r.data.tags}
    refits = {r.data.params["refit.of_trial"]: r for r in children if r.data.tags.get("gigaseg.kind") == "refit"}
    assert len(trials) == 2 and refits.keys() == trials.keys()
    for trial_id, refit in refits.items():
        assert refit.data.params["refit.start_from"] == trials[trial_id].data.tags["gigaseg.model_uri"]  # warm
        assert int(refit.data.params["epochs"]) > int(refit.data.params["refit.trial_epochs"]) == 2
        assert len(client.get_metric_history(refit.info.run_id, "val_miou")) > 2
        assert refit.data.tags[KEPT_TAG] in {"true", "false"}
        # two refits on the 2-CPU Ray: one CPU, one torch thread each
        assert float(refit.data.params["refit.cpus"]) == 1.0 and refit.data.metrics["torch_threads"] == 1
        assert ("gigaseg.model_uri" in refit.data.tags) == (refit.data.tags[KEPT_TAG] == "true")
    best = refits[outcome.best_trial_id]
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags[KEPT_TAG] == best.data.tags[KEPT_TAG] and "refit_score" in parent.data.metrics
    assert parent.data.tags["gigaseg.refit_run"] == best.info.run_id
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refit kept:")]
    assert len(lines) == 2
    for trial_id, refit in refits.items():  # a kept refit's validation score was computed as a candidate
        scored = any(f"trial refit-{trial_id}: validation mIoU" in r.getMessage() for r in caplog.records)
        assert scored == (refit.data.tags[KEPT_TAG] == "true")


@pytest.mark.ray
def test_a_lone_refit_gets_the_idle_cpus(ray_local) -> None:
    """On the 2-CPU Ray, one refit of a 1-CPU trial takes both CPUs and, with a one-cycle schedule under
    max_minutes, up to twice the epochs (its schedule follows the minutes); two refits share them; GPU
    refits keep a trial's resources; a cosine refit keeps its epochs."""
    one = ResourcesSection(cpus_per_trial=1)
    assert refit_cpus(one, 1) == 2.0 and refit_cpus(one, 2) == 1.0 and refit_cpus(one, 3) == 1.0
    assert refit_cpus(ResourcesSection(cpus_per_trial=1, gpus_per_trial=0.5), 1) == 1.0
    cfg = TrainConfig.model_validate({"epochs": 5, "max_minutes": 2.0, "optim": {"schedule": "one_cycle"}})
    plan = RefitPlan("t", cfg, 150.0, 3, 10.0, 5.0, 0.5)
    assert (with_cpus(plan, 2.0, 1.0).config.epochs, with_cpus(plan, 2.0, 1.0).cpus) == (10, 2.0)
    cosine = plan.config.model_copy(update={"optim": plan.config.optim.model_copy(update={"schedule": "cosine_restarts"})})
    assert with_cpus(RefitPlan("t", cosine, 150.0, 3, 10.0, 5.0, 0.5), 2.0, 1.0).config.epochs == 5
