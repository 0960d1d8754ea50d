"""Train-and-test quality on the synthetic generators, through the real CLI.

For each generator: simulate a training set and a test set (different seeds), run
``gigaseg train`` on the first, ``gigaseg evaluate`` on the second, and print test mIoU
against training wall time. Goal for ``shapes``: mIoU >= 0.95 within 10 CPU-minutes.

    python bench/train_quality.py --kinds shapes,sem,ccd

``--adversarial WEIGHT`` instead compares, per generator and training seed, the config's U-Net
with and without pix2pix's adversarial term (``loss.adversarial.weight``) at *equal wall time*:
the adversarial run gets fewer epochs, in the ratio of the two variants' epoch costs measured
in-process, alternately, on the same data (see :func:`epoch_time_ratio`). Issue 10:

    python bench/train_quality.py --kinds sem --adversarial 0.1 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

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


def _train_eval(kind: str, work: Path, name: str, sets: list[str], epochs: int) -> dict:
    """``gigaseg train`` (with ``--set`` overrides) + ``gigaseg evaluate`` on the held-out set."""
    sets_args = [a for kv in sets for a in ("--set", kv)]
    t0, c0 = time.perf_counter(), _child_cpu_s()
    gigaseg("train", "--data", str(work / "train"), "--out", str(work / name), "--no-mlflow", "--epochs", str(epochs),
            "--config", str(REPO / "configs" / f"train-{kind}.yaml"), *sets_args)
    train_s, train_cpu_s = time.perf_counter() - t0, _child_cpu_s() - c0
    gigaseg("evaluate", "--model", str(work / name), "--data", str(work / "test"), "--out", str(work / name / "eval"))
    metrics = json.loads((work / name / "eval" / "metrics.json").read_text())["metrics"]
    return {"train_s": train_s, "train_cpu_s": train_cpu_s, "test_miou": metrics["miou"], "epochs": epochs}


def epoch_time_ratio(kind: str, data: Path, sets: list[str], common: list[str], reps: int = 2) -> float:
    """(epoch cost with ``sets``) / (epoch cost without): training + validation, in-process, alternately,
    after one untimed warm-up epoch each. Cost is this process's CPU time, which a machine shared with
    other jobs inflates far less than wall time; on a dedicated machine the two are proportional."""
    from segcore.config import load_yaml_config, parse_config, set_dotted
    from segcore.train import build_run, train_one_epoch, validate

    base = load_yaml_config(REPO / "configs" / f"train-{kind}.yaml").model_dump()
    for kv in common:
        key, value = kv.split("=", 1)
        set_dotted(base, key, yaml.safe_load(value))
    variant = json.loads(json.dumps(base))
    for kv in sets:
        key, value = kv.split("=", 1)
        set_dotted(variant, key, yaml.safe_load(value))
    runs = [build_run(parse_config(cfg), data) for cfg in (base, variant)]
    for run in runs:
        train_one_epoch(run, 0)
    cpu, wall = [0.0, 0.0], [0.0, 0.0]
    for epoch in range(1, reps + 1):
        for i, run in enumerate(runs):
            c0, t0 = time.process_time(), time.perf_counter()
            train_one_epoch(run, epoch)
            validate(run)
            cpu[i] += time.process_time() - c0
            wall[i] += time.perf_counter() - t0
    print(f"epoch cost ratio: CPU {cpu[1] / cpu[0]:.2f} (wall {wall[1] / wall[0]:.2f})", flush=True)
    return cpu[1] / cpu[0]


def run_adversarial(kind: str, work: Path, epochs: int, weight: float, seeds: list[int], n: int | None,
                    common: list[str]) -> list[dict]:
    """U-Net with and without the adversarial term at equal wall time, one pair of runs per seed.

    ``common``: ``KEY=VALUE`` overrides for both variants (e.g. a smaller ``data.patches_per_epoch``).
    """
    n_train, size = SIZES[kind]
    n_train = n or n_train
    gigaseg("simulate", kind, "--out", str(work / "train"), "--n", str(n_train), "--size", str(size), "--seed", "1")
    gigaseg("simulate", kind, "--out", str(work / "test"), "--n", str(max(4, n_train // 2)), "--size", str(size),
            "--seed", "2")
    adv = [f"loss.adversarial.weight={weight}"]
    ratio = epoch_time_ratio(kind, work / "train", adv, common)
    adv_epochs = max(1, round(epochs / ratio))
    print(f"adversarial epoch costs {ratio:.2f}x: {epochs} epochs without, {adv_epochs} with", flush=True)
    rows = []
    for seed in seeds:
        for variant, sets, n_epochs in (("U-Net", [], epochs), (f"U-Net + GAN {weight:g}", adv, adv_epochs)):
            name = f"{'adv' if sets else 'base'}-s{seed}"
            row = _train_eval(kind, work, name, [*common, f"seed={seed}", *sets], n_epochs)
            rows.append({"kind": kind, "variant": variant, "seed": seed, "ratio": ratio, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def print_adversarial(rows: list[dict]) -> None:
    print(f"\n{'generator':<10} {'variant':<18} {'epochs':>6} {'train wall (min)':>17} {'test mIoU (mean ± sd)':>22} "
          f"{'per seed':>24}")
    for key in dict.fromkeys((r["kind"], r["variant"]) for r in rows):
        group = [r for r in rows if (r["kind"], r["variant"]) == key]
        mious = [r["test_miou"] for r in group]
        sd = statistics.stdev(mious) if len(mious) > 1 else 0.0
        wall = statistics.mean(r["train_s"] for r in group) / 60
        per_seed = " ".join(f"{m:.3f}" for m in mious)
        print(f"{key[0]:<10} {key[1]:<18} {group[0]['epochs']:>6} {wall:>17.2f} "
              f"{statistics.mean(mious):>14.4f} ± {sd:.4f} {per_seed:>24}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="shapes,sem,ccd")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--adversarial", type=float, metavar="WEIGHT",
                        help="compare with/without loss.adversarial.weight=WEIGHT at equal wall time")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds for --adversarial")
    parser.add_argument("--n", type=int, help="training images per generator (default: the SIZES table)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--adversarial: config override for both variants, e.g. data.patches_per_epoch=128")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gs-quality-") as tmp:
        for kind in args.kinds.split(","):
            if args.adversarial is not None:
                seeds = [int(s) for s in args.seeds.split(",")]
                rows += run_adversarial(kind, Path(tmp) / kind, args.epochs or 8, args.adversarial, seeds, args.n,
                                        args.set)
            else:
                rows.append(run_kind(kind, Path(tmp) / kind, args.epochs))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.adversarial is not None:
        print_adversarial(rows)
        return
    print(f"\n{'generator':<10} {'train wall (min)':>17} {'train CPU (min)':>16} {'test mIoU':>10} {'pixel acc':>10}")
    for r in rows:
        print(f"{r['kind']:<10} {r['train_s'] / 60:>17.2f} {r['train_cpu_s'] / 60:>16.2f} "
              f"{r['test_miou']:>10.4f} {r['pixel_acc']:>10.4f}")


if __name__ == "__main__":
    main()
