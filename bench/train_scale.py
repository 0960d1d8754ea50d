"""Peak RSS and patches/s of the lazy patch loader against the in-memory one, for growing datasets.

    python bench/train_scale.py --gpx 0.06 0.25 1 4 --scale 1 4 --work /tmp/train-scale
    python bench/train_scale.py --baseline-src /tmp/old --repeat 3   # old lazy code, interleaved

Each dataset is ``n`` tiled uint16 BigTIFF scans (written tile by tile) with RGB-free class-id
masks ``--mask-scale`` times coarser and ``mask_scale`` in dataset.yaml, as a QEMSCAN-labelled SEM
archive. Every measurement runs in a fresh process (``--measure``), so its peak RSS
(``ru_maxrss``) is the loader's alone: build the dataset (lazy: scan + class index; memory:
``load_samples``, which holds every image as float32 and the mask upsampled to it) and draw
``--patches`` class-balanced patches. The in-memory loader is skipped where its arrays would not
fit in half the machine's RAM. ``read/needed`` is the image px the lazy loader read divided by
the level-0 px under its patches (``patches x (patch x scale)^2``): 1.00 means nothing beyond the
patches was read; ``read/model`` divides by the model px (``patches x patch^2``): ``scale^2``
when block-meaning level 0, 1 when a stored pyramid level of the model's scale is read
(``--pyramid`` writes levels 2 and 4 as SubIFDs). Both count ``ImageSource.pixels_read``.

On a shared machine timings drift, so ``--repeat`` runs every loader of a row in turn, repeatedly
(interleaved), and reports medians; ``--baseline-src DIR`` adds a ``base`` lazy loader run from
another source tree (e.g. ``git archive <commit> segcore | tar -x -C DIR``).
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
from typing import Any

import numpy as np

log = logging.getLogger("train_scale")

SIDE = 16384  # scan side; more scans for bigger datasets
TILE = 512


def make_dataset(folder: Path, gpx: float, mask_scale: int, pyramid: bool = False) -> Path:
    """``gpx`` giga-pixels of scans in ``folder`` (reused when already there); with ``pyramid``
    each scan also stores levels 2 and 4 (block means) as SubIFDs."""
    import tifffile
    import yaml
    from PIL import Image

    unit = TILE * 4 if pyramid else TILE  # whole tiles at every level
    side = min(SIDE, int(math.sqrt(gpx * 1e9)) // unit * unit)
    n = max(1, round(gpx * 1e9 / side**2))
    if (folder / "dataset.yaml").is_file():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    base = (np.add.outer(np.arange(TILE), np.arange(TILE)) * 37 % 50000).astype(np.uint16)
    grid = side // TILE
    for i in range(n):
        def tile(t: int, i: int = i) -> np.ndarray:
            return base + np.uint16((i * 131 + t) % 9000)

        def level(f: int, i: int = i) -> Any:
            """Level ``f`` tile by tile: block means of the f x f level-0 tiles under each."""
            for ty in range(grid // f):
                for tx in range(grid // f):
                    block = np.block([[tile((ty * f + a) * grid + tx * f + b) for b in range(f)] for a in range(f)])
                    yield np.round(block.reshape(TILE, f, TILE, f).mean(axis=(1, 3))).astype(np.uint16)

        with tifffile.TiffWriter(folder / "images" / f"scan_{i}.tif", bigtiff=True) as tif:
            opts = {"dtype": np.uint16, "tile": (TILE, TILE), "photometric": "minisblack"}
            tif.write((tile(t) for t in range(grid**2)), shape=(side, side), subifds=2 if pyramid else 0, **opts)
            for f in (2, 4) if pyramid else ():
                tif.write(level(f), shape=(side // f, side // f), subfiletype=1, **opts)
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
    read = getattr(getattr(dataset, "reader", None), "pixels_read", float("nan"))
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "patches_s": rate,
            "build_s": t_build, "read_over_needed": read / (patches * (patch * scale) ** 2),
            "read_over_model": read / (patches * patch**2)}


FIELDS = ("rss_mb", "patches_s", "build_s", "read_over_needed", "read_over_model")


def run_one(data: Path, loader: str, scale: float, patch: int, patches: int, src: Path | None = None) -> dict:
    """One measurement in a fresh process (``src``: import segcore from that tree instead)."""
    cmd = [sys.executable, __file__, "--measure", loader, "--data", str(data), "--scale", str(scale),
           "--patch", str(patch), "--patches", str(patches)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        log.warning("%s loader failed (exit %d): %s", loader, out.returncode, out.stderr.strip()[-500:])
        return dict.fromkeys(FIELDS, float("nan"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_row(data: Path, loaders: list[tuple[str, str, Path | None]], args: argparse.Namespace,
            scale: float) -> dict[str, dict]:
    """Median of ``args.repeat`` interleaved runs of each (label, loader, src) in ``loaders``."""
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in loaders}
    for _ in range(args.repeat):
        for label, loader, src in loaders:
            runs[label].append(run_one(data, loader, scale, args.patch, args.patches, src))
    return {label: {k: float(np.median([r.get(k, float("nan")) for r in rs])) for k in FIELDS}
            for label, rs in runs.items()}


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
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs per loader (median reported)")
    parser.add_argument("--baseline-src", type=Path, help="also run the lazy loader from this source tree")
    parser.add_argument("--pyramid", action="store_true", help="scans store levels 2 and 4 (SubIFDs)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gigaseg-train-scale"))
    parser.add_argument("--measure", choices=("lazy", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.data, args.measure, args.scale[0], args.patch, args.patches)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [f"{'GPx':>5} {'scale':>5} {'loader':>6} {'RSS MB':>8} {'patches/s':>9} {'build s':>7} "
            f"{'read/needed':>11} {'read/model':>10}"]
    for gpx in args.gpx:
        name = f"{gpx:g}gpx" + ("-pyramid" if args.pyramid else "")
        data = make_dataset(args.work / name, gpx, args.mask_scale, args.pyramid)
        for scale in args.scale:
            loaders = [("lazy", "lazy", None)]
            loaders += [("base", "lazy", args.baseline_src)] if args.baseline_src else []
            loaders += [("memory", "memory", None)] if scale == 1 and fits_in_memory(gpx) else []
            for label, r in run_row(data, loaders, args, scale).items():
                rows.append(f"{gpx:>5g} {scale:>5g} {label:>6} {r['rss_mb']:>8.0f} {r['patches_s']:>9.1f} "
                            f"{r['build_s']:>7.1f} {r['read_over_needed']:>11.2f} {r['read_over_model']:>10.2f}")
                log.info("%s", rows[-1])
    log.info("\n%s", "\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
