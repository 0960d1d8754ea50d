"""Trial budgets in steps or minutes (issue 9 item 2): segcore.train's clocks and max_minutes, and a
tiny real search whose ASHA counts optimizer steps."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from tiny_search import tiny_search as tiny

from search import parse_search_spec, run_search
from search.budget import fit_steps
from segcore.config import TrainConfig, parse_config
from segcore.schedules import BudgetedOneCycle
from segcore.simulate import generate_shapes
from segcore.train import EpochReport, train

TINY = {
    "model": {"arch": "Unet", "encoder": "resnet18", "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
    "data": {"patch_size": 64, "patches_per_epoch": 16, "batch_size": 8, "val_tile": 64, "val_halo": 16},
    "epochs": 3,
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "train", n=4, size=96, seed=1)


def test_train_reports_cumulative_steps_and_minutes_and_stops_at_max_minutes(shapes: Path, tmp_path: Path) -> None:
    reports: list[EpochReport] = []

    def keep(report: EpochReport) -> None:
        reports.append(report)
        report.save_checkpoint(tmp_path / f"ckpt{report.epoch}")

    result = train(parse_config({**TINY, "epochs": 2}, TrainConfig), shapes, tmp_path / "full", callbacks=[keep])
    assert [r.metrics["steps"] for r in reports] == [2.0, 4.0]  # 16 patches / batch 8 per epoch
    minutes = [r.metrics["train_minutes"] for r in reports]
    assert 0 < minutes[0] < minutes[1] and minutes[1] == pytest.approx(sum(h["epoch_time_s"] for h in result.history) / 60)

    # resumed after epoch 0: the clocks continue
    resumed: list[EpochReport] = []
    train(parse_config({**TINY, "epochs": 2}, TrainConfig), shapes, tmp_path / "resumed",
          resume_from=tmp_path / "ckpt0", callbacks=[resumed.append])
    assert resumed[0].metrics["steps"] == 4.0 and resumed[0].metrics["train_minutes"] > minutes[0]

    # max_minutes: the first epoch end past the limit is the last epoch, reported as such
    capped: list[EpochReport] = []
    out = train(parse_config({**TINY, "max_minutes": 1e-6}, TrainConfig), shapes, tmp_path / "capped",
                callbacks=[capped.append])
    assert [(r.epoch, r.is_last) for r in capped] == [(0, True)] and len(out.history) == 1
    assert (tmp_path / "capped" / "model.safetensors").is_file()


def test_budgeted_one_cycle_has_torchs_shape_and_fits_its_length_to_the_minutes_left() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([param], lr=0.1), max_lr=0.1, total_steps=200)
    budgeted = BudgetedOneCycle(torch.optim.SGD([param], lr=0.1), 200)
    for _ in range(200):
        assert budgeted.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], abs=0.003)
        for sched in (reference, budgeted):
            sched.optimizer.step()
            sched.step()
    cycle = BudgetedOneCycle(torch.optim.SGD([param], lr=0.1), 1000)
    assert cycle.fit_to_budget(100, 10.0, 30.0) == 300  # 10 steps/s, 20 s left: 200 more
    assert cycle.fit_to_budget(100, 10.0, 5.0) == 101  # over budget: anneal now
    assert cycle.fit_to_budget(100, 10.0, 1e6) == 1000  # never beyond the configured epochs
    assert BudgetedOneCycle(torch.optim.SGD([param], lr=0.1), 1000).state_dict()["total_steps"] == 1000


def test_a_run_cut_by_max_minutes_ends_annealed_not_at_peak_lr(shapes: Path, tmp_path: Path) -> None:
    """10 one-cycle epochs planned, minutes for about 3: the cycle is re-fitted to the minutes, so the
    last epoch ends with a small lr (torch's OneCycleLR would be at its peak after 3 of 10 epochs)."""
    one_cycle = {**TINY, "epochs": 10, "optim": {"schedule": "one_cycle", "lr": 0.01}}
    probe = train(parse_config({**one_cycle, "epochs": 1}, TrainConfig), shapes, tmp_path / "probe")
    epoch_min = probe.history[0]["epoch_time_s"] / 60
    out = train(parse_config({**one_cycle, "max_minutes": 3 * epoch_min}, TrainConfig), shapes, tmp_path / "cut")
    lrs = [h["lr"] for h in out.history]
    assert 2 <= len(lrs) < 10 and out.history[-1]["lr_cycle_steps"] < 10 * 2
    assert lrs[-1] < 0.5 * 0.01 and max(lrs) > lrs[-1]


@pytest.mark.ray
@pytest.mark.slow
def test_search_with_a_steps_budget_reports_steps_and_asha_counts_them(
        ray_local, mlflow_sqlite, shapes: Path, tmp_path: Path, monkeypatch) -> None:
    import search.engines

    schedulers = []

    def spy(spec, space):
        schedulers.append(build(spec, space))
        return schedulers[-1]

    build = search.engines.build_scheduler
    monkeypatch.setattr(search.engines, "build_scheduler", spy)
    raw = tiny("t-budget-steps", shapes, tmp_path / "store", budget={"steps": 6})
    raw["space"] = {**{k: v for k, v in raw["space"].items() if k != "epochs"}, "batch_size": {"choice": [4, 8]}}
    outcome = run_search(parse_search_spec(raw))
    assert outcome.counts.get("error", 0) == 0

    (asha,) = schedulers
    assert asha._time_attr == "steps" and asha._max_t == 6
    rungs = {milestone: recorded for milestone, recorded in asha._brackets[0]._rungs}
    assert set(rungs) == {2, 4}  # base batch 8: 2 steps per epoch, grace 1 epoch = 2 steps, max_t 6 steps
    assert rungs[2] and rungs[4]  # trials were compared there, in steps

    client = mlflow.MlflowClient(mlflow_sqlite)
    exp = client.get_experiment_by_name("t-budget-steps")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(runs) == 3
    for run in runs:
        batch = int(run.data.params["data.batch_size"])
        epochs, ppe = fit_steps(6, 16, batch)
        assert (int(run.data.params["epochs"]), int(run.data.params["data.patches_per_epoch"])) == (epochs, ppe)
        steps = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "steps"), key=lambda m: m.step)]
        per_epoch = ppe // batch
        assert steps == [per_epoch * (k + 1) for k in range(len(steps))]  # stopped early: a prefix
        assert len(client.get_metric_history(run.info.run_id, "train_minutes")) == len(steps)


def test_a_resume_with_another_lr_rescales_the_schedule_where_it_stands(shapes: Path, tmp_path: Path) -> None:
    """PBT's explore resumes a checkpoint with a new lr: the one-cycle schedule keeps its position and
    shape, at the new peak (twice the lr: twice the lr at every later step)."""
    cfg = {**TINY, "epochs": 3, "optim": {"schedule": "one_cycle", "lr": 1e-3}}
    reference: list[EpochReport] = []

    def keep(report: EpochReport) -> None:
        reference.append(report)
        report.save_checkpoint(tmp_path / f"ckpt{report.epoch}")

    train(parse_config(cfg, TrainConfig), shapes, tmp_path / "ref", callbacks=[keep])
    doubled: list[EpochReport] = []
    train(parse_config({**cfg, "optim": {"schedule": "one_cycle", "lr": 2e-3}}, TrainConfig), shapes,
          tmp_path / "doubled", resume_from=tmp_path / "ckpt0", callbacks=[doubled.append])
    assert [r.epoch for r in doubled] == [1, 2]
    for ref, new in zip(reference[1:], doubled, strict=True):
        assert new.metrics["lr"] == pytest.approx(2 * ref.metrics["lr"], rel=1e-6)
