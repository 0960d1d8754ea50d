"""N gloo workers against one worker at equal samples, through the real CLI (issue 26).

Simulates the shapes training set and a held-out test set (the README's *Train one model* sizes),
then trains with the plan (``--budget-min``, no ``--config``):

* **1 worker**: ``gigaseg train --steps N*S`` in one process (batch b, the plan's lr);
* **N workers**: ``gigaseg train --workers N --steps S`` on a private local Ray (batch b per worker,
  global batch N*b, the plan's lr x sqrt(N)), with the 1-worker plan's patch and batch pinned, so both
  see N*S*b patches;

scores both through ``gigaseg segment`` on the test images (labels read back from the written zarr)
and prints test mIoU, per-class IoU and walls. On one machine the workers share its cores, so the
N-worker wall says what gloo costs here, not what N GPUs would take.

    python bench/train_workers.py                      # S = 200, N = 2 (about 15 min on 2 cores)
    python bench/train_workers.py --steps 100 --quick --small   # a depth-3 U-Net: a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from search_vs_default import gigaseg, simulate, test_scores

SMALL = ["--arch", "Unet", "--set", "model.arch_kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}"]


def train(work: Path, name: str, train_dir: Path, flags: list[str]) -> dict:
    """One ``gigaseg train`` run: wall, what it trained with (patch, batch, lr: its card) and its clocks."""
    t0 = time.perf_counter()
    ok = gigaseg("train", "--data", str(train_dir), "--out", str(work / name), "--no-mlflow", *flags,
                 log=work / f"{name}.log").returncode == 0
    row = {"name": name, "wall_min": (time.perf_counter() - t0) / 60.0, "ok": ok}
    if ok:
        cfg = json.loads((work / name / "config.json").read_text())["train"]
        last = json.loads((work / name / "metrics.json").read_text())["history"][-1]
        row.update(patch=cfg["data"]["patch_size"], batch=cfg["data"]["batch_size"], lr=cfg["optim"]["lr"],
                   steps=last["steps"], train_min=last["train_minutes"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per worker of the N-worker run")
    parser.add_argument("--budget-min", type=float, default=10.0, help="the plan's budget (patch, batch, cadence)")
    parser.add_argument("--quick", action="store_true", help="the smaller datasets of bench/search_vs_default.py")
    parser.add_argument("--small", action="store_true", help="a depth-3 U-Net (the tests' model), for a busy machine")
    parser.add_argument("--work", type=Path, help="working folder (default: a temp folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-workers-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"GIGASEG_HOME": str(work / "home")}
    os.environ.update(env)
    train_dir, test_dir = simulate("shapes", work, args.quick)
    n, plan = args.workers, ["--budget-min", str(args.budget_min), *(SMALL if args.small else [])]
    one = train(work, "one", train_dir, [*plan, "--steps", str(n * args.steps)])
    pinned = ["--patch-size", str(one["patch"]), "--batch-size", str(one["batch"])]
    many = train(work, f"workers{n}", train_dir, [*plan, *pinned, "--steps", str(args.steps), "--workers", str(n)])
    for row in (one, many):
        row["test"] = test_scores(str(work / row["name"]), test_dir, work / f"seg-{row['name']}", env,
                                  work / "segment.log") if row["ok"] else None
    print(f"shapes, {n} gloo workers x {args.steps} steps vs 1 worker x {n * args.steps} steps (equal samples); "
          f"work folder {work}")
    print(f"{'run':<10} {'patch x batch':>13} {'lr':>8} {'steps':>6} {'train min':>9} {'wall min':>8} "
          f"{'test mIoU':>9}  per class")
    for r in (one, many):
        test = r.get("test") or {}
        per_class = ", ".join(f"{c} {v:.3f}" for c, v in test.get("iou", {}).items())
        print(f"{r['name']:<10} {r.get('patch', 0):>7} x {r.get('batch', 0):<3} {r.get('lr', 0):>8.3g} "
              f"{r.get('steps', 0):>6.0f} {r.get('train_min', 0):>9.2f} {r['wall_min']:>8.2f} "
              f"{test.get('miou', float('nan')):>9.3f}  {per_class}")


if __name__ == "__main__":
    main()
