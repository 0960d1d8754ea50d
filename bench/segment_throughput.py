"""Throughput of ``gigaseg segment`` against a bare single-process loop of the same model over
the same tiles, on synthetic SEM BigTIFFs (tiled, written tile by tile).

    python bench/segment_throughput.py                          # default sizes, a tiny random-init Unet
    python bench/segment_throughput.py --sizes 0.25,1,4         # gigapixels (the lead's full run)
    python bench/segment_throughput.py --model models:/sem@champion --tile 512 --halo 64

Printed per size: output megapixels/s of the bare loop (read + normalise + predict + argmax,
one process, the faster of 1 or all-CPU torch threads, no writes) and of the pipeline (Ray
Data, local Ray; the "stage" rate counts from starting the dataset to the last finished unit,
actor start-up included; the "end-to-end" rate the whole call including model check,
planning, pyramid and preview), their ratio (goal >= 0.9), forward pixels per output pixel (halo overhead), and peak RSS of the driver
and of every worker actor (reported back by the actors). No timing assertions anywhere:
numbers on a shared machine are noisy; compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipelines.plan import to_model_channels
from pipelines.runner import RunConfig, segment_archive
from pipelines.worker import peak_rss_mb
from segcore.config import ModelConfig, TrainConfig
from segcore.data.normalize import apply_norm, compute_norm_stats
from segcore.modelio.card import ModelCard
from segcore.modelio.folder import save_model_dir
from segcore.modelio.ref import load_model
from segcore.models import build_model
from segcore.readers import open_sources
from segcore.tiling import (
    grid_shape,
    pad_to_multiple,
    shape_batches,
    union_read,
    window_at,
    window_from_block,
)

log = logging.getLogger("bench.segment_throughput")


def make_bench_model(path: Path, encoder: str, depth: int) -> Path:
    """A random-init Unet; speed does not depend on the weights."""
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(arch="Unet", encoder=encoder, classes=4,
                                        arch_kwargs={"encoder_depth": depth,
                                                     "decoder_channels": [32, 16, 8, 8, 8][:depth]}))
    card = ModelCard(train=cfg, class_names=["pore", "quartz", "albite", "clay"])
    return save_model_dir(path, build_model(cfg.model), card)


def sem_image(workdir: Path, gigapixels: float, tile: int) -> Path:
    """A square synthetic SEM BigTIFF of about ``gigapixels`` (cached between runs)."""
    side = int(round(math.sqrt(gigapixels * 1e9) / 16)) * 16
    path = workdir / f"sem_{side}.tif"
    if not path.exists():
        from segcore.simulate.sem import write_sem_bigtiff

        t0 = time.perf_counter()
        write_sem_bigtiff(path.with_suffix(".tmp.tif"), side, side, tile=tile, seed=1)
        path.with_suffix(".tmp.tif").replace(path)
        log.info("wrote %s (%d x %d) in %.0f s", path, side, side, time.perf_counter() - t0)
    return path


def bare_loop(model_ref: str, image: Path, tile: int, halo: int, batch: int, max_windows: int,
              threads: int) -> dict:
    """The same reads, normalisation, windows, batches and model, in one plain Python loop."""
    torch.set_num_threads(threads)
    loaded = load_model(model_ref)
    stride = 2 ** int(loaded.card.train.model.arch_kwargs.get("encoder_depth", 5))
    predict = pad_to_multiple(loaded.predict_proba, stride)
    (src,) = open_sources(image)
    stats = compute_norm_stats(src.sample(), loaded.card.train.normalize)
    n_rows, n_cols = grid_shape(src.shape, tile)
    chunks = [[window_at(src.shape, tile, halo, i, j) for j in range(j0, min(j0 + batch, n_cols))]
              for i in range(n_rows) for j0 in range(0, n_cols, batch)]  # the pipeline's work units
    chunks = chunks[: max(1, max_windows // batch)]
    t0, pixels = time.perf_counter(), 0
    for chunk in chunks:
        rows, cols = union_read(chunk)  # one row of windows, as a pipeline work unit reads it
        block = apply_norm(to_model_channels(src.read(rows, cols), 1, 1), stats)
        for sub in shape_batches(chunk, batch):  # border windows are smaller: one call per shape
            proba = predict(np.stack([window_from_block(block, (rows.start, cols.start), w) for w in sub]))
            for w, p in zip(sub, proba, strict=True):
                labels = p[(slice(None), *w.crop)].argmax(0).astype(np.uint8)
                pixels += labels.size
    return {"mpx_s": pixels / 1e6 / (time.perf_counter() - t0), "windows": sum(len(c) for c in chunks),
            "rss_mb": peak_rss_mb(), "threads": threads}


def best_bare_loop(*args: object) -> dict:
    """The bare loop with 1 torch thread and with one per CPU, each in a fresh process (its memory
    peak must not count as the driver's); the faster one is the baseline (a conservative ratio)."""
    runs = []
    for threads in sorted({1, os.cpu_count() or 1}):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs.append(pool.submit(bare_loop, *args, threads).result())
        log.info("bare loop, %d torch threads: %.3f MP/s", threads, runs[-1]["mpx_s"])
    return max(runs, key=lambda r: r["mpx_s"])


def pipeline(model_ref: str, image: Path, out: Path, tile: int, halo: int, batch: int, run: RunConfig) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    report = segment_archive(model_ref, [str(image)], out, run, tile=tile, halo=halo, batch_size=batch)
    if report.failed:
        raise RuntimeError(f"pipeline failed: {report.failed}")
    summary = next(iter(report.summaries.values()))
    h, w = summary["shape"]
    return {"mpx_stage": h * w / 1e6 / report.stage_s, "mpx_e2e": h * w / 1e6 / report.wall_s,
            "startup_s": report.first_unit_s, "wall_s": report.wall_s, "windows": report.windows,
            "fwd": report.windows * (tile + 2 * halo) ** 2 / (h * w), "driver_mb": report.driver_rss_mb,
            "worker_mb": sorted(round(x["rss_mb"]) for x in report.workers), "shape": (h, w),
            "units": sorted(x["units"] for x in report.workers)}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'GPx':>6} {'H x W':>13} {'windows':>8} {'fwd/out':>7} {'bare MP/s (thr)':>15} {'pipe MP/s':>10} "
          f"{'ratio':>6} {'e2e MP/s':>9} {'start s':>8} {'wall s':>7} {'bare MB':>8} {'driver MB':>9}  "
          "worker MB (units)")
    for r in rows:
        p = r["pipe"]
        print(f"{r['gpx']:>6} {p['shape'][0]:>6}x{p['shape'][1]:<6} {p['windows']:>8} {p['fwd']:>7.2f} "
              f"{r['bare']['mpx_s']:>10.3f} ({r['bare']['threads']:>2}) {p['mpx_stage']:>10.3f} {p['mpx_stage'] / r['bare']['mpx_s']:>6.2f} "
              f"{p['mpx_e2e']:>9.3f} {p['startup_s']:>8.1f} {p['wall_s']:>7.1f} {r['bare']['rss_mb']:>8.0f} "
              f"{p['driver_mb']:>9.0f}  "
              f"{p['worker_mb']} ({p['units']})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.01,0.04", help="image sizes in gigapixels, comma-separated")
    p.add_argument("--model", default=None, help="model reference (default: a tiny random-init Unet)")
    p.add_argument("--encoder", default="timm-mobilenetv3_small_minimal_100", help="encoder of the default model")
    p.add_argument("--depth", type=int, default=3, help="encoder depth of the default model")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--halo", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bare-max-windows", type=int, default=256, help="windows timed in the bare loop")
    p.add_argument("--workers", type=int, default=None, help="pipeline actors (default: one per CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per actor (default: CPUs / actors)")
    p.add_argument("--no-overlap", action="store_true", help="one call at a time per actor")
    p.add_argument("--workdir", default="/tmp/gigaseg-bench", help="cached images, model and outputs")
    p.add_argument("--address", default=None, help="Ray address (default: a new local Ray)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or str(make_bench_model(workdir / f"model-{args.encoder}-d{args.depth}", args.encoder, args.depth))
    run = RunConfig(workers=args.workers, threads=args.threads, overlap=not args.no_overlap, address=args.address,
                    progress_bars=False)
    rows = []
    for gpx in [float(s) for s in args.sizes.split(",")]:
        image = sem_image(workdir, gpx, args.tile)
        bare = best_bare_loop(model, image, args.tile, args.halo, args.batch_size, args.bare_max_windows)
        pipe = pipeline(model, image, workdir / f"out-{gpx}", args.tile, args.halo, args.batch_size, run)
        log.info("pipeline %.3f MP/s (stage), %.3f MP/s end to end", pipe["mpx_stage"], pipe["mpx_e2e"])
        rows.append({"gpx": gpx, "bare": bare, "pipe": pipe})
    print_table(rows)


if __name__ == "__main__":
    main()
