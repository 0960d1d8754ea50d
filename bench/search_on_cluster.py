"""The search where it is meant to run: N workers of C optimizer steps each (issue 23).

Counting in optimizer steps makes this 2-CPU machine stand for a cluster: every contender gets
the same worker-steps it would get on N GPUs, only later. For each task (a train split and a
held-out test split, other seeds), C = the optimizer steps the plan makes in ``--minutes`` on this
CPU (its own step timing, ``search.budget.plan_steps``), and three contenders run:

* **A**: ``gigaseg train --steps C``: what a user with one GPU gets in the same wall time;
* **B**: ``gigaseg train --workers N --steps C``: the whole cluster on one model (Ray Train DDP,
  gloo; N x the samples of A at the same per-worker batch);
* **S**: ``gigaseg search`` with ``cluster: {workers: N, steps_per_worker: C}``, no written space
  (the space around the plan), ``engine: pbt`` (a population of N) on half of each worker's steps,
  and the best member refitted data-parallel on all N workers from its weights with the rest
  (``refit.budget_fraction: 0.5``); then the champion chain (ensemble, calibration, TTA).

Every model is scored the same way: ``gigaseg segment`` on the test images, the written label maps
against the test masks (``pipelines.score``). Prints test mIoU of A, B and S, per-class IoU, S's
worker-steps used and its champion's make-up with its forward cost, and each contender's wall.

    python bench/search_on_cluster.py                         # N = 4, C = 5 plan minutes, all tasks
    python bench/search_on_cluster.py --tasks seed003 --minutes 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_vs_default import SIZES, _m, gigaseg, simulate, test_scores  # noqa: E402

TASKS = ("seed003", "shapes", "sem", "ccd")
RECIPES = {"seed003": ("lines", "--style", "seed003-hard")}  # seed 003's recipe, shaded and textured as its real data


def plan_steps_for(train: Path, minutes: float) -> int:
    """C: the optimizer steps the plan makes in ``minutes`` on this CPU (the search's own conversion)."""
    from search.budget import plan_steps
    from segcore.plan import plan_training

    return plan_steps(plan_training(train, minutes), minutes)


def search_yaml(task: str, train: Path, work: Path, workers: int, steps: int, cpus: float) -> Path:
    """Contender S: PBT over the space around the plan on half the worker-steps, a DDP refit on the rest."""
    spec = {
        "name": f"soc-{task}", "data": {"train": str(train)}, "engine": "pbt",
        "cluster": {"workers": workers, "steps_per_worker": steps},
        "refit": {"budget_fraction": 0.5}, "resources": {"cpus_per_trial": cpus},
        "storage_path": str(work / "searches"),
        "mlflow": {"experiment": f"soc-{task}", "registered_model_name": f"soc-{task}"},
    }
    path = work / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def timed(*args: str, env: dict[str, str], log: Path) -> tuple[bool, float]:
    t0 = time.perf_counter()
    ok = gigaseg(*args, env=env, log=log).returncode == 0
    return ok, (time.perf_counter() - t0) / 60


def champion_makeup(env: dict[str, str], task: str) -> dict:
    """S's worker-steps and champion from its parent MLflow run (what the search logged)."""
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(f"soc-{task}")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`gigaseg.kind` = 'search'") if exp else []
    if not runs:
        return {}
    m, p, t = runs[0].data.metrics, runs[0].data.params, runs[0].data.tags
    return {"worker_steps": m.get("worker_steps_used"), "worker_steps_budget": m.get("worker_steps_budget"),
            "members": p.get("ensemble.members", ""), "forward_cost": m.get("champion_forward_cost"),
            "refit_kept": t.get("refit.kept"), "tta_gain": m.get("tta_gain")}


def run_task(task: str, work: Path, minutes: float, workers: int, cpus: float, steps: int | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    home.mkdir(exist_ok=True)
    env = {"GIGASEG_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    train, test = (work / "train", work / "test") if (work / "test").is_dir() else \
        simulate(task, work, quick=False, recipes=RECIPES)
    steps = steps or plan_steps_for(train, minutes)
    row: dict = {"task": task, "workers": workers, "steps": steps, "minutes": minutes, "images": SIZES[task]}
    print(f"{task}: C = {steps} steps (the plan's in {minutes:g} min); N = {workers}", flush=True)
    contenders = {
        "A": ("train", "--data", str(train), "--out", str(work / "A"), "--steps", str(steps), "--no-mlflow"),
        "B": ("train", "--data", str(train), "--out", str(work / "B"), "--steps", str(steps), "--no-mlflow",
              "--workers", str(workers), "--cpus-per-worker", str(cpus)),
        "S": ("search", "--config", str(search_yaml(task, train, work, workers, steps, cpus))),
    }
    for name, args in contenders.items():
        done = work / f"{name}.json"  # a rerun with the same --work reuses a finished contender
        if not done.is_file():
            ok, wall = timed(*args, env=env, log=work / f"{name}.log")
            model = f"models:/soc-{task}@champion" if name == "S" else str(work / name)
            scores = test_scores(model, test, work / f"seg-{name}", env, work / f"seg-{name}.log") if ok else None
            done.write_text(json.dumps({"wall": wall, "scores": scores}))
        got = json.loads(done.read_text())
        row[name], row[f"{name}_wall_min"] = got["scores"], got["wall"]
        print(f"  {name}: {row[name] and round(row[name]['miou'], 4)} in {row[f'{name}_wall_min']:.1f} min",
              flush=True)
    row["S_makeup"] = champion_makeup(env, task)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"\n{'task':<8} {'N':>2} {'C':>6} {'A mIoU':>7} {'B mIoU':>7} {'S mIoU':>7} {'S-B':>7} "
          f"{'S worker-steps':>15} {'walls A/B/S (min)':>18}  S champion")
    for r in rows:
        mk = r.get("S_makeup", {})
        used = f"{mk.get('worker_steps') or math.nan:.0f}/{mk.get('worker_steps_budget') or math.nan:.0f}"
        walls = "/".join(f"{r.get(f'{k}_wall_min', math.nan):.1f}" for k in "ABS")
        champion = (f"members {mk.get('members') or '?'}, refit kept {mk.get('refit_kept')}, "
                    f"forward cost {mk.get('forward_cost')}")
        print(f"{r['task']:<8} {r['workers']:>2} {r['steps']:>6} {_m(r['A']):>7.4f} {_m(r['B']):>7.4f} "
              f"{_m(r['S']):>7.4f} {_m(r['S']) - _m(r['B']):>+7.4f} {used:>15} {walls:>18}  {champion}")
    print("\nper-class IoU (A / B / S)")
    for r in rows:
        classes = next((s["iou"] for s in (r["A"], r["B"], r["S"]) if s), {})
        print(f"  {r['task']}: " + ", ".join(
            f"{c} " + "/".join(f"{(r[k] or {}).get('iou', {}).get(c, math.nan):.3f}" for k in "ABS") for c in classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--workers", type=int, default=4, help="N (default 4)")
    parser.add_argument("--minutes", type=float, default=5.0, help="C = the plan's steps in this many minutes")
    parser.add_argument("--steps", type=int, help="C itself (e.g. timed on an idle machine), instead of timing the plan")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5,
                        help="each worker's CPUs here (N x this <= the machine's CPUs: all N run at once)")
    parser.add_argument("--work", type=Path, help="keep the data, models and logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gs-soc-") as tmp:
        root = args.work or Path(tmp)
        for task in args.tasks.split(","):
            rows.append(run_task(task, root / task, args.minutes, args.workers, args.cpus_per_worker, args.steps))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
