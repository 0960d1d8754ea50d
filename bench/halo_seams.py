"""No seams, at a measured cost: trained U-Nets, their measured exact halo, the tile ``segment``
chooses from it, forward pixels per output pixel and labels differing from the whole image.

    python bench/halo_seams.py                                  # trains resnet18 and resnet34 U-Nets first
    python bench/halo_seams.py --model models:/sem@champion     # existing models (repeat --model)

Training (cached in --workdir): ``configs/train-sem.yaml`` on a small simulated SEM set
(16 images of 256 px, validation on 2 images of 512 px); ``segcore.train.train`` measures the
exact halo at the end and stores it on the card (``card.extra["halo"]``).

Then, on a synthetic SEM scan (--size px a side), each model predicts the whole image once,
padded only to its size multiple (the reference, :func:`segcore.tiling.predict_whole`), and
tile by tile for: the previous ``segment`` defaults (tile 512, halo 128), the measured halo at
tile 512 (many seams: a stress test of the halo), and the measured halo at the tile ``segment``
now chooses (:func:`pipelines.options.resolve_tiling`, target x1.35). Printed per row: halo,
tile, forward px per output px on this image (border windows read no outer halo) and for
interior windows, the labels differing from the whole image (%, px, and how many of those
are float ties: top-two probabilities within 1e-6 in the whole-image prediction), and seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from pipelines.options import resolve_tiling, tile_overhead
from segcore.config import TrainConfig, parse_config, read_yaml_mapping
from segcore.data.normalize import apply_norm, compute_norm_stats
from segcore.modelio.folder import LoadedModel
from segcore.modelio.ref import load_model
from segcore.simulate.sem import render_sem
from segcore.tiling import forward_pixels, pad_to_multiple, predict_tiled, predict_whole

log = logging.getLogger("bench.halo_seams")
ROOT = Path(__file__).resolve().parents[1]
TIE = 1e-6  # top-two probability margin below which a label is a float tie, not a seam


def train_models(workdir: Path, encoders: list[str], epochs: int | None) -> list[str]:
    """Train a U-Net per encoder with configs/train-sem.yaml (reused when already trained)."""
    from segcore.simulate.sem import generate_sem
    from segcore.train import train

    data = workdir / "sem-train"
    for name, n, size, seed in [("sem-train", 16, 256, 1), ("sem-val", 2, 512, 2)]:
        if not (workdir / name).exists():
            generate_sem(workdir / name, n, size, seed)
    refs = []
    for enc in encoders:
        out = workdir / f"unet-{enc}"
        if not (out / "config.json").exists():
            raw = read_yaml_mapping(ROOT / "configs" / "train-sem.yaml")
            raw["model"]["encoder"] = enc
            if epochs:
                raw["epochs"] = epochs
            t0 = time.perf_counter()
            train(parse_config(raw, TrainConfig), data, out, val_dir=workdir / "sem-val")
            log.info("trained %s in %.0f s", out, time.perf_counter() - t0)
        remeasure_if_stale(out, workdir / "sem-val")
        refs.append(str(out))
    return refs


def remeasure_if_stale(model_dir: Path, val_dir: Path) -> None:
    """A cached model measured by an older method (no ``tol`` on the card, or another tolerance) is
    measured again with :func:`segcore.halo.loaded_halo` on the same validation images, and its card updated."""
    from segcore.data import load_samples
    from segcore.halo import HALO_TOL, MEASURED_ON_KEY, loaded_halo
    from segcore.modelio.folder import save_model_dir

    loaded = load_model(str(model_dir), device="cpu", fold_bn=False)  # saved back below
    if loaded.card.extra.get(MEASURED_ON_KEY, {}).get("tol") == HALO_TOL:
        return
    images = [s.image for s in load_samples(val_dir, normalize=loaded.card.train.normalize)]
    loaded.card.extra.update(loaded_halo(loaded, images))
    save_model_dir(model_dir, loaded.model, loaded.card)
    log.info("%s: halo measured again: %s", model_dir, loaded.card.extra[MEASURED_ON_KEY])


def seam_rows(name: str, loaded: LoadedModel, image: np.ndarray, settings: list[tuple[str, int, int, int]]) -> list[dict]:
    """One row per (label, tile, halo, batch): cost and labels differing from the whole image."""
    m = loaded.size_multiple
    predict = pad_to_multiple(loaded.predict_proba, m)
    t0 = time.perf_counter()
    proba = predict_whole(image, predict)
    whole = loaded.labels_from_proba(proba)
    top2 = np.sort(proba, axis=0)[-2:]
    tie = (top2[1] - top2[0]) < TIE  # float ties: a different conv blocking alone can flip them
    del proba, top2
    log.info("%s: whole-image forward %s in %.0f s; %d float ties", name, image.shape[-2:], time.perf_counter() - t0,
             int(tie.sum()))
    rows = []
    for label, tile, halo, batch in settings:
        t0 = time.perf_counter()
        differ = loaded.labels_from_proba(predict_tiled(image, predict, tile=tile, halo=halo, batch_size=batch)) != whole
        rows.append({"model": name, "setting": label, "halo": halo, "tile": tile,
                     "fwd_px": forward_pixels(image.shape[-2:], tile, halo, m), "interior": tile_overhead(tile, halo),
                     "differ_pct": 100 * float(differ.mean()), "differ_px": int(differ.sum()),
                     "ties_px": int((differ & tie).sum()), "s": time.perf_counter() - t0})
        log.info("%s", rows[-1])
    return rows


def model_rows(ref: str, raw: np.ndarray, before: tuple[int, int], which: set[str]) -> list[dict]:
    loaded = load_model(ref, device="cpu")
    image = apply_norm(raw[None], compute_norm_stats(raw, loaded.card.train.normalize))
    chosen = resolve_tiling(loaded, {"tile": None, "halo": None, "batch_size": 8})
    halo, on = chosen["halo"], loaded.card.extra.get("halo_measured_on", {})
    log.info("%s: card halo %s (measured on %s); chosen tile %d, batch %d", ref, loaded.card.extra.get("halo"),
             on, chosen["tile"], chosen["batch_size"])
    name = f"{loaded.card.train.model.arch}-{loaded.card.train.model.encoder}"
    settings = [(f"before: tile {before[0]}, halo {before[1]}", before[0], before[1], 4),
                ("measured halo, tile 512", 512, halo, 4),
                ("measured halo, chosen tile", chosen["tile"], halo, chosen["batch_size"])]
    settings = [s for s, key in zip(settings, ("before", "stress", "chosen"), strict=True) if key in which]
    rows = seam_rows(name, loaded, image, settings)
    for r in rows:
        r["measured"] = {"halo": loaded.card.extra.get("halo"), **on}
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<14} {'setting':<28} {'halo':>5} {'tile':>5} {'fwd px/out px':>14} {'interior':>9} "
          f"{'labels differ':>14} {'px':>7} {'of them ties':>12} {'s':>6}")
    for r in rows:
        print(f"{r['model']:<14} {r['setting']:<28} {r['halo']:>5} {r['tile']:>5} {r['fwd_px']:>14.3f} "
              f"{r['interior']:>9.3f} {r['differ_pct']:>13.5f}% {r['differ_px']:>7} {r['ties_px']:>12} {r['s']:>6.0f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="model directory or MLflow URI (repeatable)")
    p.add_argument("--encoders", default="resnet18,resnet34", help="U-Net encoders to train when no --model")
    p.add_argument("--epochs", type=int, default=None, help="override train-sem.yaml's epochs")
    p.add_argument("--workdir", default="/tmp/gigaseg-halo-seams", help="training data and models (reused)")
    p.add_argument("--size", type=int, default=4096, help="test scan edge (px)")
    p.add_argument("--before", default="512,128", help="tile,halo of the previous segment defaults")
    p.add_argument("--rows", default="before,stress,chosen",
                   help="which rows: previous defaults, measured halo at tile 512, measured halo at the chosen tile")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    refs = args.model or train_models(workdir, args.encoders.split(","), args.epochs)
    raw, _ = render_sem((args.size, args.size), seed=args.seed)
    tile, halo = (int(v) for v in args.before.split(","))
    rows = [r for ref in refs for r in model_rows(ref, raw, (tile, halo), set(args.rows.split(",")))]
    print_table(rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
