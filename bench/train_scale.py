"""Peak RSS and patches/s of the lazy patch loader against the in-memory one, for growing datasets.

    python bench/train_scale.py --gpx 0.06 0.25 1 4 --scale 1 4 --work /tmp/train-scale

Each dataset is ``n`` tiled uint16 BigTIFF scans (written tile by tile) with RGB-free class-id
masks ``--mask-scale`` times coarser and ``mask_scale`` in dataset.yaml, as a QEMSCAN-labelled SEM
archive. Every measurement runs in a fresh process (``--measure``), so its peak RSS
(``ru_maxrss``) is the loader's alone: build the dataset (lazy: scan + class index; memory:
``load_samples``, which holds every image as float32 and the mask upsampled to it) and draw
``--patches`` class-balanced patches. The in-memory loader is skipped where its arrays would not
fit in half the machine's RAM. ``read/needed`` is the image px the lazy loader decoded divided by
the px under its patches (``patches x (patch x scale)^2``): 1.00 means nothing beyond the
patches was read (counted by ``PatchReader.pixels_read``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("train_scale")

SIDE = 16384  # scan side; more scans for bigger datasets
TILE = 512


def make_dataset(folder: Path, gpx: float, mask_scale: int) -> Path:
    """``gpx`` giga-pixels of scans in ``folder`` (reused when already there)."""
    import tifffile
    import yaml
    from PIL import Image

    side = min(SIDE, int(math.sqrt(gpx * 1e9)) // TILE * TILE)
    n = max(1, round(gpx * 1e9 / side**2))
    if (folder / "dataset.yaml").is_file():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    base = (np.add.outer(np.arange(TILE), np.arange(TILE)) * 37 % 50000).astype(np.uint16)
    for i in range(n):
        tiles = (base + np.uint16((i * 131 + t) % 9000) for t in range((side // TILE) ** 2))
        tifffile.imwrite(folder / "images" / f"scan_{i}.tif", tiles, shape=(side, side), dtype=np.uint16,
                         tile=(TILE, TILE), bigtiff=True, photometric="minisblack")
        m = side // mask_scale
        mask = ((np.arange(m)[:, None] // 7 + np.arange(m)[None, :] // 11 + i) % 4).astype(np.uint8)
        Image.fromarray(mask).save(folder / "masks" / f"scan_{i}.png")
    spec = {"classes": ["pore", "quartz", "albite", "clay"], "mask_scale": mask_scale,
            "normalize": {"mode": "percentile"}}
    (folder / "dataset.yaml").write_text(yaml.safe_dump(spec))
    log.info("wrote %d scans of %d px (%.2f GPx) to %s", n, side, n * side**2 / 1e9, folder)
    return folder


def measure(data: Path, loader: str, scale: float, patch: int, patches: int) -> dict:
    """Build one loader and draw ``patches`` patches; runs in its own process."""
    from segcore.data import PatchDataset, load_samples, load_spec
    from segcore.data.lazy import LazyPatchDataset, scan_dataset

    spec = load_spec(data)
    t0 = time.perf_counter()
    if loader == "lazy":
        dataset = LazyPatchDataset(scan_dataset(data, spec), patch, patches, scale=scale, num_classes=4)
    else:
        dataset = PatchDataset(load_samples(data, spec), patch, patches, num_classes=4)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(patches):
        dataset[i]
    rate = patches / (time.perf_counter() - t0)
    needed = patches * (patch * scale) ** 2
    read = dataset.reader.pixels_read / needed if loader == "lazy" else float("nan")
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "patches_s": rate,
            "build_s": t_build, "read_over_needed": read}


def run_one(data: Path, loader: str, scale: float, patch: int, patches: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", loader, "--data", str(data), "--scale", str(scale),
           "--patch", str(patch), "--patches", str(patches)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        log.warning("%s loader failed (exit %d): %s", loader, out.returncode, out.stderr.strip()[-500:])
        nan = float("nan")
        return {"rss_mb": nan, "patches_s": nan, "build_s": nan, "read_over_needed": nan}
    return json.loads(out.stdout.strip().splitlines()[-1])


MEMORY_BYTES_PER_PX = 30  # in-memory loader's peak: measured 7.1 GB for 0.25 GPx (float32 image, int64 mask, index)


def fits_in_memory(gpx: float) -> bool:
    """Whether the in-memory loader's peak fits in half the RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return gpx * 1e9 * MEMORY_BYTES_PER_PX < ram / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpx", type=float, nargs="+", default=[0.06, 0.25, 1.0, 4.0])
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--mask-scale", type=int, default=16)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--patches", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gigaseg-train-scale"))
    parser.add_argument("--measure", choices=("lazy", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.data, args.measure, args.scale[0], args.patch, args.patches)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [f"{'GPx':>5} {'scale':>5} {'loader':>6} {'RSS MB':>8} {'patches/s':>9} {'build s':>7} {'read/needed':>11}"]
    for gpx in args.gpx:
        data = make_dataset(args.work / f"{gpx:g}gpx", gpx, args.mask_scale)
        for scale in args.scale:
            loaders = ["lazy"] + (["memory"] if scale == 1 and fits_in_memory(gpx) else [])
            for loader in loaders:
                r = run_one(data, loader, scale, args.patch, args.patches)
                rows.append(f"{gpx:>5g} {scale:>5g} {loader:>6} {r['rss_mb']:>8.0f} {r['patches_s']:>9.1f} "
                            f"{r['build_s']:>7.1f} {r['read_over_needed']:>11.2f}")
                log.info("%s", rows[-1])
    log.info("\n%s", "\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
