"""Search efficiency: TPE+ASHA vs random search vs a study-style grid, at equal trial-epochs.

All three search the same space on a synthetic ``shapes`` dataset: architecture x encoder x
freeze strategy (with per-encoder "pretrained" weights made here by a short pre-training on
another shapes set), plus learning rate and the focal weight. The grid enumerates
arch x encoder x freeze with the study's fixed recipe (lr, focal weight), like the SEM study's
comparison; random search runs as many full trials as the grid; TPE+ASHA gets the same budget in
trial-epochs (``max_trial_epochs``) and spends it on more, partly early-stopped, trials.

Prints the best validation mIoU seen after N trial-epochs for each engine, side by side.
Default size: ~5-10 minutes on 2 CPU cores.

    python bench/search_efficiency.py [--epochs 4] [--images 8] [--size 128] [--work DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.search_efficiency")

ARCHS = ["Unet", "Linknet"]
ENCODERS = ["resnet18", "tu-mobilenetv3_small_050"]
FREEZE = ["full", "frozen-encoder", "staged"]
SHOWN = ("architecture", "encoder", "freeze", "lr", "focal_weight")
STUDY_RECIPE = {"lr": 3.0e-3, "focal_weight": 0.5}  # the grid's fixed training recipe
BASE = {
    "data": {"patches_per_epoch": 48, "batch_size": 8, "val_tile": 64, "val_halo": 16, "val_fraction": 0.25},
    "optim": {"schedule": "constant"},
    "augment": {"strength": 0.2},
}
ARCH_KWARGS = {"Unet": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}, "Linknet": {"encoder_depth": 3}}


def pretrain_encoders(work: Path, size: int, epochs: int) -> dict[str, str]:
    """'Pretrained' weights per encoder: a short training on another shapes set (whole-model file)."""
    from segcore.config import TrainConfig, parse_config
    from segcore.simulate import generate_shapes
    from segcore.train import train

    data = generate_shapes(work / "pretrain-shapes", n=4, size=size, seed=99)
    weights = {}
    for encoder in ENCODERS:
        cfg = parse_config({**BASE, "model": {"arch": "Unet", "encoder": encoder,
                                              "arch_kwargs": ARCH_KWARGS["Unet"]},
                            "data": {**BASE["data"], "patch_size": 64}, "epochs": epochs}, TrainConfig)
        out = train(cfg, data, work / "pretrained" / encoder)
        weights[encoder] = str(Path(out.model_dir) / "model.safetensors")
        log.info("pretrained %s: val mIoU %.3f", encoder, out.metrics["val_miou"])
    return weights


def spec_for(engine: str, data: Path, weights: dict[str, str], epochs: int, storage: Path,
             concurrency: int, seed: int) -> dict[str, Any]:
    """The same space for every engine; the grid fixes lr and focal weight (the study's recipe)."""
    n_grid = len(ARCHS) * len(ENCODERS) * len(FREEZE)
    budget = n_grid * epochs
    ranges = {"lr": {"loguniform": [5.0e-4, 1.0e-2]}, "focal_weight": {"uniform": [0.0, 1.0]}}
    space = {
        "architecture": {"choice": ARCHS},
        "encoder": {"choice": ENCODERS},
        "arch_kwargs": ARCH_KWARGS,
        "encoder_weights": weights,
        "freeze": {"choice": FREEZE},
        "unfreeze_epoch": 1,
        **(STUDY_RECIPE if engine == "grid" else ranges),
        "patch_size": 64,
        "epochs": epochs,
    }
    return {
        "name": f"bench-{engine.replace('+', '-')}",
        "data": {"train": str(data)},
        "base": BASE,
        "space": space,
        "engine": "tpe" if engine == "tpe+asha" else engine,
        "seed": seed,
        "num_samples": 4 * n_grid if engine == "tpe+asha" else n_grid,
        "tpe_startup_trials": 4,
        "max_trial_epochs": budget,
        "max_concurrent_trials": concurrency,
        "asha": {"enabled": engine == "tpe+asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpus_per_trial": 1},
        "storage_path": str(storage),
        "mlflow": {"experiment": f"bench-{engine.replace('+', '-')}"},
    }


def best_curve(uri: str, parent_run_id: str, experiment: str) -> list[float]:
    """Best val mIoU after each reported trial-epoch, in the order the epochs were reported."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    points = sorted((m.timestamp, m.value) for r in runs for m in client.get_metric_history(r.info.run_id, "val_miou"))
    best, curve = 0.0, []
    for _, value in points:
        best = max(best, value)
        curve.append(best)
    return curve


def format_table(curves: dict[str, list[float]], info: dict[str, str], budget: int) -> str:
    marks = sorted({max(1, budget * k // 8) for k in range(1, 9)})
    engines = list(curves)
    lines = [f"{'trial-epochs':>12} | " + " | ".join(f"{e:>10}" for e in engines)]
    lines.append("-" * len(lines[0]))
    for n in marks:
        cells = [f"{c[min(n, len(c)) - 1]:10.4f}" if c else f"{'-':>10}" for c in curves.values()]
        lines.append(f"{n:>12} | " + " | ".join(cells))
    lines.append("")
    lines += [f"{e:>10}: {info[e]}" for e in engines]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    import ray

    from search import parse_search_spec, run_search
    from segcore.simulate import generate_shapes

    work = Path(args.work or tempfile.mkdtemp(prefix="gs-bench-search-")).resolve()
    os.environ["GIGASEG_HOME"] = str(work / "home")
    uri = f"sqlite:///{work / 'home' / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    (work / "home").mkdir(parents=True, exist_ok=True)
    data = generate_shapes(work / "shapes", n=args.images, size=args.size, seed=1)
    weights = pretrain_encoders(work, args.size, args.pretrain_epochs)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
    curves, info = {}, {}
    try:
        for engine in ("tpe+asha", "random", "grid"):
            t0 = time.perf_counter()
            spec = parse_search_spec(spec_for(engine, data, weights, args.epochs, work / "searches",
                                              args.concurrency, args.seed), source=f"bench {engine}")
            outcome = run_search(spec)
            curves[engine] = best_curve(uri, outcome.parent_run_id, spec.experiment)
            best = {k: v for k, v in outcome.best_params.items() if k in SHOWN}
            info[engine] = (f"{sum(outcome.counts.values())} trials {outcome.counts}, "
                            f"{len(curves[engine])} trial-epochs, {time.perf_counter() - t0:.0f} s, best {best}")
    finally:
        ray.shutdown()
    budget = len(ARCHS) * len(ENCODERS) * len(FREEZE) * args.epochs
    return format_table(curves, info, budget)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per full trial [4]")
    parser.add_argument("--images", type=int, default=8, help="shapes images [8]")
    parser.add_argument("--size", type=int, default=128, help="image size [128]")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for the local Ray [2]")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once [2]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="working folder (default: a new temp folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
