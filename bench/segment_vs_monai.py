"""``gigaseg segment`` side by side with MONAI's ``sliding_window_inference`` and a bare forward
loop (issue 14): same image, same model, same normalisation, 2 CPU threads in total, one
interleaved round.

    pip install -e ".[bench]"                    # MONAI (never a core dependency)
    python bench/segment_vs_monai.py --quick     # 1536² scan, 20 small FITS frames (< 4 min once the model is cached)
    python bench/segment_vs_monai.py             # 4096² scan, 60 FITS frames x 2 HDUs x 512²
    python bench/segment_vs_monai.py --pools default,1x2,2x1   # gigaseg rows per actor pool (actors x threads)
    python bench/segment_vs_monai.py --pools default,mem1.5   # and with --memory-gb 1.5 (less RSS, more halo)

Model: a resnet18 U-Net trained with ``configs/train-sem.yaml`` on simulated SEM data, as in
bench/halo_seams.py (cached in --workdir; --epochs / --quick shorten training; its halo is
measured at the end of training and stored on the card), or --model.

Contenders, each in its own process (wall time includes Python and torch imports; gigaseg runs
its CLI, so its Ray start counts), each given 2 torch threads in total:

* bare forward: 512² tiles, no overlap, with gigaseg's CPU tuning (the speed limit; seams everywhere);
* MONAI ``sliding_window_inference``: roi 512, overlap 0.25, gaussian blending, batch 4, on the
  model as its user holds it (as trained, torch's default allocator); ``--monai-tuned`` adds a row
  with gigaseg's CPU tuning (BatchNorm folded into the convolutions, segcore.models.fold; huge
  pages for big buffers, segcore/__init__);
* ``gigaseg segment`` with its defaults (tile from the card's halo, pool from the node).

Seams: every method's labels are compared with one whole-image forward of a centred crop
(2048², --quick 1024²), scored inside the crop minus a 256 px margin (the halo measurement's
cap), so the crop's own border does not count. Peak RSS is the sum over the process tree,
sampled every 0.25 s (driver, raylet, GCS, dashboard, actors...); PSS is shown too (shared
pages counted once). Archive case: many small multi-HDU FITS frames, gigaseg against a bare
per-frame loop (read, normalise, whole-frame forward, argmax), labels compared.

The last line is one JSON object: speed_vs_monai (MONAI wall / gigaseg wall), seam_fraction
(gigaseg's fraction of labels differing), seam_px_that_are_float_ties (of those, the pixels whose
top-two probabilities are within 1e-6 in the whole-image forward: a different conv blocking alone
flips them), seam_px_that_are_near_ties (within 4e-5: the measured halo keeps every probability
within HALO_TOL = 2e-5 of the whole image's, so only these can flip), archive_vs_bare (bare wall / gigaseg wall),
rss_vs_monai (gigaseg's peak tree RSS / MONAI's), and with --monai-tuned speed_vs_monai_tuned
(against MONAI with gigaseg's CPU tuning). Goals (2 CPU cores): >= 1.5 at 0, >= 0.8, <= 1.5.
No timing assertions: on a shared machine, compare rows of one round only (load is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.segment_vs_monai")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THREADS = 2  # torch threads in total, every contender
BARE_TILE, MONAI_ROI, MONAI_BATCH, BARE_BATCH = 512, 512, 4, 4
REF_MARGIN = 256  # crop border excluded from the seam score (the halo measurement's cap)
TIE = 1e-6  # top-two probability margin below which a label is a float tie, not a seam (as halo_seams.py)
NEAR_TIE = 4e-5  # 2 x segcore.halo.HALO_TOL: the margin within which the measured halo lets a label change
PAGE = os.sysconf("SC_PAGE_SIZE")
PSS_EVERY = 8  # RSS samples (0.25 s apart) per PSS sample, see _mem
MILESTONES = {"model": r"tile \d+ (chosen|\(given\))", "ray": r"actor pool:", "planned": r"planned \d+ input",
              "dataset_done": r"Dataset .* execution finished", "first_file_done": r"\] done ",
              "finished": r"gigaseg.segment: finished in"}


# ---------------------------------------------------------------- process-tree memory
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _mem(pid: int, pss: bool) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process (0, 0 when it is gone; PSS 0 unless asked). PSS walks the
    process's page tables under its mmap lock, which stalls a process that is faulting in memory:
    sampled every 0.25 s, it slowed a 6 GB gigaseg run by a fifth, so it is read only every 2 s."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        if not pss:
            return rss, 0
        return rss, next((int(line.split()[1]) * 1024 for line in
                          Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines() if line.startswith("Pss:")), 0)
    except (OSError, ValueError, IndexError):
        return 0, 0


class TreeSampler(threading.Thread):
    """Peak of the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.peak_rss = self.peak_pss = self.peak_procs = 0

    def run(self) -> None:
        tick = 0
        while not self.stop.is_set():
            pids, pss = _tree(self.pid), tick % PSS_EVERY == 0
            mems = [_mem(p, pss) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(m[0] for m in mems))
            self.peak_pss = max(self.peak_pss, sum(m[1] for m in mems))
            tick += 1
            self.peak_procs = max(self.peak_procs, len(pids))
            self.stop.wait(self.every)


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall time, peak tree RSS/PSS, and each output line stamped with seconds since start."""
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    lines = []
    with log_path.open("w") as fh:
        for line in proc.stdout:  # type: ignore[union-attr]
            stamp = time.perf_counter() - t0
            lines.append((stamp, line))
            fh.write(f"{stamp:8.2f} {line}")
            fh.flush()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if rc:
        tail = "".join(line for _, line in lines[-30:])
        raise RuntimeError(f"{cmd[:4]}... exited {rc}; log {log_path}:\n{tail}")
    return {"wall_s": wall, "rss": sampler.peak_rss, "pss": sampler.peak_pss, "procs": sampler.peak_procs,
            "load": load, "lines": lines}


# ---------------------------------------------------------------- contenders (child processes)
def _load(spec: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    from segcore.modelio.ref import load_model

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    loaded = load_model(spec["model"], device="cpu", fold_bn=spec.get("fold_bn", True))
    return loaded, loaded.size_multiple


def _normalised_image(spec: dict[str, Any], normalize: Any) -> np.ndarray:
    import tifffile

    from segcore.data.normalize import apply_norm, compute_norm_stats

    raw = tifffile.imread(spec["image"])
    return apply_norm(raw[None], compute_norm_stats(raw, normalize))


def contender_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """512² tiles, no overlap, batches of 4: one forward px per output px."""
    from segcore.tiling import pad_to_multiple

    loaded, m = _load(spec)
    image = _normalised_image(spec, loaded.card.train.normalize)
    predict = pad_to_multiple(loaded.predict_proba, m)
    t0, (_, h, w), t = time.perf_counter(), image.shape, BARE_TILE
    labels = np.zeros((h, w), np.uint8)
    tiles = [(r, c) for r in range(0, h, t) for c in range(0, w, t)]
    fwd = 0
    for k in range(0, len(tiles), BARE_BATCH):
        group = tiles[k:k + BARE_BATCH]
        shapes = {image[:, r:r + t, c:c + t].shape for r, c in group}
        for shape in shapes:  # border tiles may be smaller: one call per shape
            sub = [(r, c) for r, c in group if image[:, r:r + t, c:c + t].shape == shape]
            proba = predict(np.stack([image[:, r:r + t, c:c + t] for r, c in sub]))
            fwd += proba.shape[0] * proba.shape[-1] * proba.shape[-2]
            for (r, c), p in zip(sub, proba, strict=True):
                labels[r:r + t, c:c + t] = loaded.labels_from_proba(p)
    return {"compute_s": time.perf_counter() - t0, "fwd": fwd / (h * w), "labels": labels}


def contender_monai(spec: dict[str, Any]) -> dict[str, Any]:
    """MONAI sliding_window_inference, roi 512, overlap 0.25, gaussian, sw_batch_size 4."""
    import torch
    from monai.inferers import sliding_window_inference

    loaded, m = _load(spec)
    image = _normalised_image(spec, loaded.card.train.normalize)
    fwd = 0

    def predictor(x: torch.Tensor) -> torch.Tensor:
        nonlocal fwd
        fwd += x.shape[0] * x.shape[-1] * x.shape[-2]
        return loaded.predict_tensor(x)

    t0 = time.perf_counter()
    with torch.inference_mode():
        proba = sliding_window_inference(torch.from_numpy(image)[None], (MONAI_ROI, MONAI_ROI), MONAI_BATCH,
                                         predictor, overlap=0.25, mode="gaussian")
    # max(0).indices == argmax(0) (first maximum) but 10x faster on a CPU over the class axis; MONAI's
    # own AsDiscrete(argmax=True) takes the slow argmax: MONAI is given the fast one here
    labels = proba[0].max(0).indices.to(torch.uint8).numpy()
    h, w = labels.shape
    return {"compute_s": time.perf_counter() - t0, "fwd": fwd / (h * w), "labels": labels}


def contender_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """One whole-image forward of the crop (padded only to the model's size multiple); also where
    its labels are float ties (top-two probabilities within :data:`TIE`)."""
    from segcore.tiling import pad_to_multiple, predict_whole

    loaded, m = _load(spec)
    image = _normalised_image(spec, loaded.card.train.normalize)
    (r0, r1), (c0, c1) = spec["crop"]
    t0 = time.perf_counter()
    proba = predict_whole(image[:, r0:r1, c0:c1], pad_to_multiple(loaded.predict_proba, m))
    top2 = np.sort(proba, axis=0)[-2:]
    np.save(Path(spec["workdir"]) / "margin-reference.npy", (top2[1] - top2[0]).astype(np.float32))
    return {"compute_s": time.perf_counter() - t0, "fwd": 1.0, "labels": loaded.labels_from_proba(proba).astype(np.uint8)}


def contender_bare_archive(spec: dict[str, Any]) -> dict[str, Any]:
    """Per frame and HDU: read, normalise (same stats as segment), whole-frame forward, argmax."""
    from astropy.io import fits

    from segcore.data.normalize import apply_norm, compute_norm_stats
    from segcore.tiling import pad_to_multiple, predict_whole

    loaded, m = _load(spec)
    predict = pad_to_multiple(loaded.predict_proba, m)
    t0, labels, px = time.perf_counter(), {}, 0
    for f in spec["frames"]:
        with fits.open(f) as hdul:
            for hdu in hdul[1:]:
                data = np.asarray(hdu.data)
                x = apply_norm(data[None], compute_norm_stats(data, loaded.card.train.normalize))
                labels[f"{Path(f).stem}/{hdu.name}"] = loaded.labels_from_proba(predict_whole(x, predict)).astype(np.uint8)
                px += data.size
    return {"compute_s": time.perf_counter() - t0, "fwd": 1.0, "labels": labels, "px": px}


CONTENDERS = {"bare": contender_bare, "monai": contender_monai, "monai-tuned": contender_monai,
              "reference": contender_reference, "bare_archive": contender_bare_archive}
# MONAI runs the model as its user holds it: as trained (BatchNorm unfolded), torch's default
# allocator. "monai-tuned" gives it gigaseg's CPU tuning: BatchNorm folded into the convolutions
# (segcore.models.fold) and huge pages for big buffers (THP_MEM_ALLOC_ENABLE, see segcore/__init__).
# Every other contender, the seam reference included, runs tuned, as gigaseg does.
UNTUNED = {"monai"}


def child_main(name: str, spec_path: str) -> None:
    """Run one contender and save its result (labels cropped to the scoring crop) next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    result = CONTENDERS[name]({**spec, "fold_bn": name not in UNTUNED})
    labels = result.pop("labels")
    out = Path(spec["workdir"]) / f"labels-{name}.npz"
    if isinstance(labels, dict):
        np.savez(out, **labels)
    else:
        (r0, r1), (c0, c1) = spec["crop"]
        np.savez(out, crop=labels if name == "reference" else labels[r0:r1, c0:c1])
    Path(spec["workdir"], f"result-{name}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- inputs
def prepare_model(args: argparse.Namespace, workdir: Path) -> str:
    """--model, else a resnet18 U-Net trained with configs/train-sem.yaml (cached per epoch count)."""
    if args.model:
        return args.model
    sys.path.insert(0, str(HERE))
    from halo_seams import train_models

    return train_models(workdir / f"model-e{args.epochs or 'yaml'}", ["resnet18"], args.epochs)[0]


def size_multiple(model: str) -> int:
    """The model's input size multiple, from its card (no weights loaded)."""
    from segcore.modelio.ref import load_model

    return load_model(model, device="cpu").size_multiple


def prepare_image(workdir: Path, size: int, seed: int) -> Path:
    """A simulated uint16 SEM scan as a tiled TIFF (cached)."""
    import tifffile

    from segcore.simulate.sem import render_sem

    path = workdir / f"sem_{size}_s{seed}.tif"
    if not path.exists():
        raw, _ = render_sem((size, size), seed=seed)
        tifffile.imwrite(path.with_suffix(".tmp"), raw, tile=(512, 512), photometric="minisblack")
        path.with_suffix(".tmp").replace(path)
    return path


def prepare_frames(workdir: Path, n: int, size: int, hdus: int) -> list[Path]:
    """``n`` multi-extension FITS files of ``hdus`` uint16 SEM-like amplifiers (AMP1..) each (cached)."""
    from astropy.io import fits

    from segcore.simulate.sem import render_sem

    folder = workdir / f"frames-{n}x{hdus}x{size}"
    paths = [folder / f"frame_{i:03d}.fits" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        hdul = [fits.PrimaryHDU()] + [fits.ImageHDU(render_sem((size, size), seed=1000 + i * hdus + k)[0],
                                                    name=f"AMP{k + 1}") for k in range(hdus)]
        fits.HDUList(hdul).writeto(path, overwrite=True)
    return paths


# ---------------------------------------------------------------- runs (parent)
def run_child(name: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "THP_MEM_ALLOC_ENABLE": "0" if name in UNTUNED else "1"}
    meas = run_measured([sys.executable, __file__, "--child", name, str(spec_path)], workdir / f"log-{name}.txt", env)
    meas.update(json.loads((workdir / f"result-{name}.json").read_text()))
    return meas


def gigaseg_cmd() -> list[str]:
    exe = shutil.which("gigaseg")
    return [exe, "segment"] if exe else [sys.executable, "-m", "pipelines.segment"]


def run_gigaseg(name: str, model: str, inputs: list[str], workdir: Path, pool: str) -> dict[str, Any]:
    """``gigaseg segment`` (CLI, fresh local Ray) into a fresh output folder; milestones from its log."""
    out = workdir / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if pool == "default":
        extra = []
    elif pool.startswith("mem"):  # memN: --memory-gb N (a smaller tile and calls, less RSS)
        extra = ["--memory-gb", pool[3:]]
    else:
        extra = ["--workers", pool.split("x")[0], "--threads", pool.split("x")[1]]
    cmd = [*gigaseg_cmd(), "--model", model, "--input", *inputs, "--output", str(out), "--no-progress", *extra]
    meas = run_measured(cmd, workdir / f"log-{name}.txt", env)
    meas["out"] = out
    meas["milestones"] = {key: next((round(t, 1) for t, line in meas["lines"] if re.search(rx, line)), None)
                          for key, rx in MILESTONES.items()}
    text = "".join(line for _, line in meas["lines"])
    tile = re.search(r"tile (\d+) (?:chosen for halo|\(given\), halo) (\d+)", text)
    meas["tile"], meas["halo"] = (int(tile.group(1)), int(tile.group(2))) if tile else (None, None)
    pool_line = re.search(r"actor pool: (\{.*\})", text)
    meas["pool"] = pool_line.group(1) if pool_line else "?"
    return meas


def differing(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of labels that differ inside the crop minus REF_MARGIN (or everywhere for frames)."""
    if a.shape != b.shape:
        raise ValueError(f"label shapes differ: {a.shape} vs {b.shape}")
    return float((a != b).mean())


def _inner(labels: np.ndarray) -> np.ndarray:
    m = REF_MARGIN if min(labels.shape) > 3 * REF_MARGIN else min(labels.shape) // 4
    return labels[m:-m, m:-m]


def image_rows(args: argparse.Namespace, model: str, image: Path, workdir: Path, multiple: int) -> list[dict]:
    """bare, MONAI and gigaseg (per pool) on one scan, interleaved, then the crop's reference."""

    size, c = args.size, args.crop
    r0 = (size - c) // 2
    spec = {"model": model, "image": str(image), "workdir": str(workdir), "crop": [[r0, r0 + c], [r0, r0 + c]]}
    rows = []
    monai = ["monai", "monai-tuned"] if args.monai_tuned else ["monai"]
    for name in ["bare", *monai, *[f"gigaseg {p}" for p in args.pools.split(",")]]:
        log.info("running %s (load %.1f)", name, os.getloadavg()[0])
        if name.startswith("gigaseg"):
            meas = run_gigaseg(name.replace(" ", "-"), model, [str(image)], workdir, name.split()[1])
            import zarr

            crop = np.asarray(zarr.open_array(str(meas["out"] / f"{image.stem}.zarr" / "0"), mode="r")[r0:r0 + c, r0:r0 + c])
            meas["fwd"] = planned_forward_px(meas["out"], multiple)
        else:
            meas = run_child(name, spec, workdir)
            crop = np.load(workdir / f"labels-{name}.npz")["crop"]
        rows.append({"method": name, "crop": crop, "px": size * size, **meas})
        log.info("%s: %.1f s wall, peak tree RSS %.2f GB", name, meas["wall_s"], meas["rss"] / 1e9)
    meas = run_child("reference", spec, workdir)
    ref = _inner(np.load(workdir / "labels-reference.npz")["crop"])
    margin = _inner(np.load(workdir / "margin-reference.npy"))
    ties, near = margin < TIE, margin <= NEAR_TIE
    log.info("reference: whole-image forward of the %d² crop in %.1f s; %d float ties, %d near ties", c,
             meas["compute_s"], int(ties.sum()), int(near.sum()))
    for row in rows:
        crop = _inner(row.pop("crop"))
        row["differ"] = differing(crop, ref)
        row["ties"] = int(((crop != ref) & ties).sum())
        row["near"] = int(((crop != ref) & near).sum())
    return rows


def planned_forward_px(out: Path, multiple: int) -> float:
    """Model px per output px that ``segment`` evaluated, from its saved plans: each unit's windows
    in strips within the call's pixel budget (as the worker groups them), padded to ``multiple``."""
    from pipelines.options import SegmentOptions
    from pipelines.plan import PLAN_FILE, ImagePlan
    from segcore.tiling import round_up, strip_groups, union_read, window_at

    fwd = px = 0
    for plan_json in sorted(out.glob(f".gigaseg/*/*/{PLAN_FILE}")):
        plan = ImagePlan.load(plan_json.parent)
        budget = SegmentOptions(**{k: v for k, v in plan.settings.items()
                                   if k in SegmentOptions.model_fields}).max_call_px()
        for r, c0, c1 in plan.units:
            windows = [window_at(plan.shape, plan.tile, plan.halo, r, j) for j in range(c0, c1)]
            for strip in strip_groups(windows, budget, multiple):
                rows, cols = union_read(strip)
                fwd += round_up(rows.stop - rows.start, multiple) * round_up(cols.stop - cols.start, multiple)
        px += plan.shape[0] * plan.shape[1]
    return fwd / px if px else float("nan")


def archive_rows(args: argparse.Namespace, model: str, workdir: Path, multiple: int) -> list[dict]:
    """Many small multi-HDU FITS frames: a bare per-frame loop, then gigaseg (default pool)."""
    import zarr


    frames = prepare_frames(workdir, args.frames, args.frame_size, args.hdus)
    spec = {"model": model, "frames": [str(f) for f in frames], "workdir": str(workdir), "crop": None}
    px = args.frames * args.hdus * args.frame_size**2
    log.info("running bare archive loop (load %.1f)", os.getloadavg()[0])
    bare = {"method": "bare per-frame loop", "px": px, **run_child("bare_archive", spec, workdir)}
    log.info("running gigaseg archive (load %.1f)", os.getloadavg()[0])
    seg = {"method": "gigaseg default", "px": px,
           **run_gigaseg("gigaseg-archive", model, [str(frames[0].parent / "*.fits")], workdir, "default")}
    ref = np.load(workdir / "labels-bare_archive.npz")
    diffs = [float((np.asarray(zarr.open_array(str(seg["out"] / f"{key.split('/')[0]}.zarr" / key.split("/")[1] / "0"),
                                               mode="r")[:]) != ref[key]).sum()) for key in ref.files]
    seg["differ"] = sum(diffs) / px
    bare["differ"] = 0.0
    seg["fwd"] = planned_forward_px(seg["out"], multiple)
    return [bare, seg]


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| method | wall s | compute s | output MP/s | fwd px per out px | peak RSS GB (tree) | peak PSS GB "
          "| procs | % labels differing | of them float ties (px) | of them near ties (px) | load at start |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        compute = f"{r['compute_s']:.1f}" if "compute_s" in r else "-"
        print(f"| {r['method']} | {r['wall_s']:.1f} | {compute} | {r['px'] / 1e6 / r['wall_s']:.3f} | {r['fwd']:.2f} "
              f"| {r['rss'] / 1e9:.2f} | {r['pss'] / 1e9:.2f} | {r['procs']} | {100 * r['differ']:.3g} | {r.get('ties', '-')} "
              f"| {r.get('near', '-')} "
              f"| {r['load']:.1f} |")
    for r in rows:
        if "milestones" in r:
            print(f"  {r['method']}: tile {r['tile']}, halo {r['halo']}; s since start: {r['milestones']}; pool {r['pool']}")


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1536² scan, 1024² crop, 20 frames of 256², 3 training epochs")
    p.add_argument("--model", default=None, help="model directory or MLflow URI (default: train the resnet18 recipe)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: train-sem.yaml's; --quick 3)")
    p.add_argument("--size", type=int, default=None, help="scan edge px (default 4096; --quick 1536)")
    p.add_argument("--crop", type=int, default=None, help="seam-scoring crop edge px (default 2048; --quick 1024)")
    p.add_argument("--frames", type=int, default=None, help="FITS files in the archive case (default 60; --quick 20)")
    p.add_argument("--frame-size", type=int, default=None, help="HDU edge px (default 512; --quick 256)")
    p.add_argument("--hdus", type=int, default=2, help="HDUs per FITS file")
    p.add_argument("--pools", default="default",
                   help="gigaseg rows: default, AxT (actors x torch threads) and/or memN (--memory-gb N)")
    p.add_argument("--no-archive", action="store_true", help="skip the archive case")
    p.add_argument("--monai-tuned", action="store_true",
                   help="also run MONAI with gigaseg's CPU tuning (BatchNorm folded, huge pages)")
    p.add_argument("--workdir", default="/tmp/gigaseg-segment-vs-monai", help="model, inputs, outputs (cached)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    q = args.quick
    args.epochs = args.epochs or (3 if q else None)
    args.size, args.crop = args.size or (1536 if q else 4096), args.crop or (1024 if q else 2048)
    args.frames, args.frame_size = args.frames or (20 if q else 60), args.frame_size or (256 if q else 512)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = prepare_model(args, workdir)
    multiple = size_multiple(model)
    image = prepare_image(workdir, args.size, args.seed)
    rows = image_rows(args, model, image, workdir, multiple)
    print_table(f"{args.size}² simulated SEM scan, model {model}, {THREADS} CPU threads in total, one interleaved round "
                f"(seams: {args.crop}² centred crop minus {REF_MARGIN} px)", rows)
    arch = [] if args.no_archive else archive_rows(args, model, workdir, multiple)
    if arch:
        print_table(f"archive: {args.frames} FITS x {args.hdus} HDUs x {args.frame_size}² "
                    f"(labels compared with the bare loop's whole-frame forward)", arch)
    by = {r["method"]: r for r in rows}
    seg = by.get("gigaseg default") or next(r for r in rows if r["method"].startswith("gigaseg"))
    print(f"\ntotal bench time {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()}")
    print(json.dumps({"speed_vs_monai": round(by["monai"]["wall_s"] / seg["wall_s"], 3),
                      "seam_fraction": seg["differ"], "seam_px_that_are_float_ties": seg["ties"],
                      "seam_px_that_are_near_ties": seg["near"],
                      "archive_vs_bare": round(arch[0]["wall_s"] / arch[1]["wall_s"], 3) if arch else None,
                      "rss_vs_monai": round(seg["rss"] / by["monai"]["rss"], 3),
                      **({"speed_vs_monai_tuned": round(by["monai-tuned"]["wall_s"] / seg["wall_s"], 3)}
                         if "monai-tuned" in by else {})}))


if __name__ == "__main__":
    main()
