"""Search against the planned default at the same wall budget, per task, through the real CLI (issue 9).

For each task: simulate a training set and a held-out test set (other seed); then

* **plan**: ``gigaseg train --data TRAIN --budget-min B`` (no ``--config``: the plan);
* **search**: ``gigaseg search`` from the plan (trial 0), per-trial minutes budget, ASHA, refit
  (``refit.budget_fraction`` 0.3; the best trial from its own weights, on every CPU the trials leave idle),
  ensemble/calibration/TTA champion, with ``time_budget_s`` =
  ``--search-share`` x B so its whole wall (Ray start, planning, champion chain) is about B;

both models are scored the same way: ``gigaseg segment`` on the test images, labels read from
``OUT/<stem>.zarr/0`` (``OUT/<stem>.zarr/<HDU>/0`` for multi-HDU FITS) against the test masks.
Prints test mIoU of both, the gain, per-class IoU and both wall times.

    python bench/search_vs_default.py                  # 10 min per task (2 cores), all tasks
    python bench/search_vs_default.py --quick          # ~2 min per task
    python bench/search_vs_default.py --tasks lines --budget-min 10

Tasks: shapes, sem, ccd (``gigaseg simulate``); seed003, the thin-structure task with seed 003's
published 0.97 (lines 3-5 px, built by seed 003's own recipe: ``gigaseg simulate lines --style
seed003``); and lines, a harder variant of it (colour, blur, noise on every shape: ``gigaseg
simulate lines``). Wall times on a shared machine are noisy; the table says what ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# task -> (train images, test images, size) at the full budget; --quick uses QUICK_SIZES
SIZES = {"shapes": (24, 6, 192), "sem": (16, 4, 256), "ccd": (8, 4, 256), "seed003": (100, 10, 400),
         "lines": (100, 10, 400)}
QUICK_SIZES = {"shapes": (12, 4, 192), "sem": (8, 3, 256), "ccd": (4, 2, 256), "seed003": (40, 6, 400),
               "lines": (40, 6, 400)}
SIMULATE = {"seed003": ("lines", "--style", "seed003")}  # task -> `gigaseg simulate` kind and options
SPACE = {  # adapted from search/examples/sem.yaml, around the plan (trial 0); ResUNet with the plan's
    # full-resolution skip, so that on thin data trial 0 is the plan's model (search.planned)
    "architecture": {"choice": ["Unet", "FPN", "Linknet", "UnetPlusPlus", "ResUNet"]},
    "arch_kwargs": {"ResUNet": {"full_res_channels": 16}},
    "encoder": {"choice": ["resnet18", "resnet34"]},
    "lr": {"loguniform": [5.0e-4, 5.0e-3]},
    "augment": {"uniform": [0.0, 0.6]},
}
# --loss-space: SPACE with the loss mix around the plan's instead of augment (a seed003 ablation at 342 steps: the
# plan's Tversky 0.3/0.7 + Focal 0.930, Dice + CE 0.938). Searching a term leaves the whole mix to the
# space (search.planned), so every planned term is a dimension; trial 0 gets the plan's weights.
LOSS_SPACE = {k: v for k, v in SPACE.items() if k != "augment"} | {
    "loss.terms.tversky": {"uniform": [0.5, 1.0]},
    "focal_weight": {"uniform": [0.0, 1.0]},
    "ce_weight": {"uniform": [0.0, 1.0]},
    "loss.tversky_beta": {"uniform": [0.5, 0.7]},
}


def gigaseg(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; its output goes to ``log`` (the tail is printed when it fails)."""
    with open(log or os.devnull, "a") as out:
        proc = subprocess.run([sys.executable, "-m", "segcore.cli", *args], env={**os.environ, **(env or {})},
                              stdout=out, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 and log is not None:
        print(f"  `gigaseg {' '.join(args[:2])}` exited {proc.returncode}; tail of {log}:", flush=True)
        print("    " + "\n    ".join(log.read_text().splitlines()[-15:]), flush=True)
    return proc


def simulate(task: str, work: Path, quick: bool, recipes: dict[str, tuple[str, ...]] = SIMULATE) -> tuple[Path, Path]:
    """Train (seed 1) and test (seed 2) splits of ``task``, made by ``gigaseg simulate`` with ``recipes[task]``."""
    n_train, n_test, size = (QUICK_SIZES if quick else SIZES)[task]
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        gigaseg("simulate", *recipes.get(task, (task,)), "--out", str(work / split), "--n", str(n), "--size", str(size), "--seed", str(seed),
                log=work / "simulate.log")
    return work / "train", work / "test"


def test_scores(model: str, test: Path, out: Path, env: dict[str, str], log: Path) -> dict | None:
    """``gigaseg segment`` the test images with ``model``; mIoU and per-class IoU against the masks."""
    from pipelines.score import score_outputs

    if gigaseg("segment", "--model", model, "--input", str(test / "images"), "--output", str(out), "--no-progress",
               env=env, log=log).returncode != 0:
        return None
    return score_outputs(out, test)


def search_yaml(task: str, train: Path, work: Path, budget_min: float, share: float,
                space: dict = SPACE) -> Path:
    """The search config over ``space``: plan on, 2 trials at a time of a half of the trials' wall
    each (about 4 trials, so each trains long enough to be judged), then the best one refitted from
    its own weights on both CPUs."""
    trial_min = max(0.25, budget_min * share * 0.7 / 2)
    spec = {
        "name": f"svd-{task}", "data": {"train": str(train)}, "space": space, "engine": "tpe", "num_samples": 64,
        "tpe_startup_trials": 3, "time_budget_s": round(budget_min * 60 * share), "max_concurrent_trials": 2,
        "budget": {"minutes": round(trial_min, 3)}, "asha": {"reduction_factor": 2},
        "resources": {"cpus_per_trial": 1}, "refit": {"budget_fraction": 0.3, "top_k": 1},
        "storage_path": str(work / "searches"),
        "mlflow": {"experiment": f"svd-{task}", "registered_model_name": f"svd-{task}"},
    }
    path = work / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_task(task: str, work: Path, budget_min: float, quick: bool, share: float, space: dict = SPACE) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    env = {"GIGASEG_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    home.mkdir(exist_ok=True)
    train, test = (work / "train", work / "test") if (work / "test").is_dir() else simulate(task, work, quick)
    row: dict = {"task": task, "budget_min": budget_min}
    walls = work / "plan-wall.json"  # a rerun with the same --work reuses the trained plan model
    if not walls.is_file():
        t0 = time.perf_counter()
        ok = gigaseg("train", "--data", str(train), "--out", str(work / "plan-model"), "--budget-min",
                     str(budget_min), "--no-mlflow", env=env, log=work / "train.log").returncode == 0
        walls.write_text(json.dumps({"ok": ok, "wall_min": (time.perf_counter() - t0) / 60}))
    ok, row["plan_wall_min"] = json.loads(walls.read_text()).values()
    row["plan"] = test_scores(str(work / "plan-model"), test, work / "seg-plan", env, work / "seg-plan.log") if ok \
        else None
    t0 = time.perf_counter()
    ok = gigaseg("search", "--config", str(search_yaml(task, train, work, budget_min, share, space)), env=env,
                 log=work / "search.log").returncode == 0
    row["search_wall_min"] = (time.perf_counter() - t0) / 60
    row["search"] = test_scores(f"models:/svd-{task}@champion", test, work / "seg-search", env,
                                work / "seg-search.log") if ok else None
    row["search_notes"] = search_notes(work / "search.log")
    print(json.dumps(row), flush=True)
    return row


def search_notes(log: Path) -> str:
    """What the search's log says about trials, refit, ensemble and TTA (one line each, shortened)."""
    keys = ("search svd-", "refit kept:", "refit: the reserved", "ensemble of", "ensemble selection:", "flip TTA:")
    lines = [ln.split(": ", 1)[-1] if "refit" not in ln else ln[ln.index("refit"):]
             for ln in log.read_text().splitlines() if any(k in ln for k in keys)] if log.is_file() else []
    return " | ".join(ln[:200] for ln in lines)


def _m(scores: dict | None) -> float:
    return scores["miou"] if scores else math.nan


def print_table(rows: list[dict]) -> None:
    print(f"\n{'task':<8} {'budget':>7} {'plan wall':>9} {'search wall':>11} {'plan mIoU':>9} {'search mIoU':>11} "
          f"{'gain':>7}  per-class IoU (plan / search)")
    for r in rows:
        plan, search = r["plan"], r["search"]
        classes = (plan or search or {"iou": {}})["iou"]
        per_class = ", ".join(f"{c} {(plan or {}).get('iou', {}).get(c, math.nan):.3f}/"
                              f"{(search or {}).get('iou', {}).get(c, math.nan):.3f}" for c in classes)
        print(f"{r['task']:<8} {r['budget_min']:>6.1f}m {r['plan_wall_min']:>8.1f}m {r['search_wall_min']:>10.1f}m "
              f"{_m(plan):>9.4f} {_m(search):>11.4f} {_m(search) - _m(plan):>+7.4f}  {per_class}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="shapes,sem,ccd,seed003,lines")
    parser.add_argument("--budget-min", type=float, help="wall budget per task and model (default 10; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="~2 min per task, smaller data sets")
    parser.add_argument("--search-share", type=float, default=0.8,
                        help="time_budget_s = this x the budget (the rest: Ray start, planning, champion chain)")
    parser.add_argument("--loss-space", action="store_true", help="search the loss mix around the plan's instead of augment")
    parser.add_argument("--work", type=Path, help="keep the data, models and logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    budget = args.budget_min or (2.0 if args.quick else 10.0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gs-svd-") as tmp:
        root = args.work or Path(tmp)
        for task in args.tasks.split(","):
            rows.append(run_task(task, root / task, budget, args.quick, args.search_share,
                                 LOSS_SPACE if args.loss_space else SPACE))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
