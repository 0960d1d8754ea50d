"""Train-and-test quality on the synthetic generators, through the real CLI.

For each generator: simulate a training set and a test set (different seeds), run
``gigaseg train`` on the first, ``gigaseg evaluate`` on the second, and print test mIoU
against training wall time. Goal for ``shapes``: mIoU >= 0.95 within 10 CPU-minutes.

    python bench/train_quality.py --kinds shapes,sem,ccd
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"shapes": (24, 192), "sem": (16, 256), "ccd": (8, 256)}


def gigaseg(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "segcore.cli", *args], check=True)


def _child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_kind(kind: str, work: Path, epochs: int | None) -> dict:
    n, size = SIZES[kind]
    gigaseg("simulate", kind, "--out", str(work / "train"), "--n", str(n), "--size", str(size), "--seed", "1")
    gigaseg("simulate", kind, "--out", str(work / "test"), "--n", str(max(4, n // 4)), "--size", str(size), "--seed", "2")
    extra = ["--epochs", str(epochs)] if epochs else []
    t0, c0 = time.perf_counter(), _child_cpu_s()
    gigaseg("train", "--data", str(work / "train"), "--out", str(work / "model"),
            "--config", str(REPO / "configs" / f"train-{kind}.yaml"), "--no-mlflow", *extra)
    train_s, train_cpu_s = time.perf_counter() - t0, _child_cpu_s() - c0
    gigaseg("evaluate", "--model", str(work / "model"), "--data", str(work / "test"), "--out", str(work / "eval"))
    metrics = json.loads((work / "eval" / "metrics.json").read_text())["metrics"]
    return {"kind": kind, "train_s": train_s, "train_cpu_s": train_cpu_s, "test_miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="shapes,sem,ccd")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gs-quality-") as tmp:
        for kind in args.kinds.split(","):
            rows.append(run_kind(kind, Path(tmp) / kind, args.epochs))
    print(f"\n{'generator':<10} {'train wall (min)':>17} {'train CPU (min)':>16} {'test mIoU':>10} {'pixel acc':>10}")
    for r in rows:
        print(f"{r['kind']:<10} {r['train_s'] / 60:>17.2f} {r['train_cpu_s'] / 60:>16.2f} "
              f"{r['test_miou']:>10.4f} {r['pixel_acc']:>10.4f}")


if __name__ == "__main__":
    main()
