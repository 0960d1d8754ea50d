"""Stop and resume: ``python -m pipelines.segment`` is killed (SIGKILL) after some work units are
written; rerunning the same command finishes the job, and the output is byte-identical to an
uninterrupted run. Also the output-changing options: --only-class, probabilities, uncertainty,
flip TTA and Gaussian blending."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from pipelines_helpers import (
    CLASSES,
    HALO,
    TILE,
    make_model,
    reference_labels,
    tree_digest,
    write_tiled_tiff8,
)

from pipelines.plan import DONE_FILE, ImagePlan
from pipelines.runner import RunConfig, segment_archive
from segcore.data.normalize import NormStats

pytestmark = pytest.mark.ray

SHAPE = (640, 704)  # 10 x 11 windows of 64; batch 2 -> 60 work units


def _cli(model: Path, image: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.segment", "--model", str(model), "--input", str(image),
            "--output", str(out), "--tile", str(TILE), "--halo", str(HALO), "--batch-size", "2",
            "--workers", "1", "--threads", "1", "--address", address, "--no-progress"]


def _comparable(summary_path: Path) -> dict:
    summary = json.loads(summary_path.read_text())
    for key in ("timings", "created"):
        summary.pop(key)
    for image in summary["images"]:
        image.pop("work_s")
    return summary


@pytest.mark.slow
def test_killed_run_resumes_byte_identical(tmp_path: Path, ray_local: None) -> None:
    import ray

    model, image = make_model(tmp_path / "model"), tmp_path / "big.tif"
    write_tiled_tiff8(image, SHAPE)
    address = ray.get_runtime_context().gcs_address
    out = tmp_path / "killed"
    done = out / ".gigaseg" / "big" / "image" / DONE_FILE
    proc = subprocess.Popen(_cli(model, image, out, address), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if done.exists() and len(done.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(done.read_text().splitlines())
    assert 4 <= n_before < 60 and not (out / "big.json").exists()

    rerun = subprocess.run(_cli(model, image, out, address), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert entries[-1]["status"] == "done"
    assert len({json.loads(line)["unit"] for line in done.read_text().splitlines()}) == 60

    clean = tmp_path / "clean"
    report = segment_archive(str(model), [str(image)], clean, RunConfig(workers=1, threads=1, progress_bars=False),
                             tile=TILE, halo=HALO, batch_size=2)
    assert len(report.done) == 1
    assert tree_digest(out / "big.zarr") == tree_digest(clean / "big.zarr")
    assert (out / "big.png").read_bytes() == (clean / "big.png").read_bytes()
    assert _comparable(out / "big.json") == _comparable(clean / "big.json")


def test_only_class_probabilities_uncertainty_tta(tmp_path: Path, ray_local: None) -> None:
    model, image = make_model(tmp_path / "model"), tmp_path / "small.tif"
    pixels = write_tiled_tiff8(image, (100, 150))
    out = tmp_path / "out"
    report = segment_archive(str(model), [str(image)], out, RunConfig(progress_bars=False), tile=TILE, halo=HALO,
                             tta=True, only_class="glow", probabilities=True, uncertainty=True)
    assert len(report.done) == 1, report.failed
    group = zarr.open_group(str(out / "small.zarr"), mode="r")
    plan = ImagePlan.load(out / ".gigaseg" / "small" / "image")
    ref = reference_labels(model, pixels, NormStats(plan.norm_offset, plan.norm_scale), tta=True)
    mask = group["0"][:]
    assert set(np.unique(mask)) == {0, 1}
    assert np.array_equal(mask, (ref == CLASSES.index("glow")).astype(np.uint8))
    proba = group["probabilities"][:]
    assert proba.dtype == np.float16 and proba.shape == (4, 100, 150)
    assert np.allclose(proba.astype(np.float32).sum(0), 1, atol=5e-3)
    # float16 storage may flip a rare near-tie, so compare by agreement
    assert ((proba.astype(np.float32).argmax(0) == 1) == mask.astype(bool)).mean() > 0.99
    unc = group["uncertainty"][:]
    assert unc.dtype == np.float16 and 0 <= unc.min() and unc.max() <= 1 and unc.std() > 0
    summary = json.loads((out / "small.json").read_text())
    assert summary["class_names"] == ["not glow", "glow"] and summary["only_class"] == "glow"
    assert summary["pixel_counts"]["glow"] == int(mask.sum())


def test_blended_windows_cover_and_stay_close(tmp_path: Path, ray_local: None) -> None:
    model, image = make_model(tmp_path / "model"), tmp_path / "small.tif"
    write_tiled_tiff8(image, (90, 130))
    plain, blend = tmp_path / "plain", tmp_path / "blend"
    segment_archive(str(model), [str(image)], plain, RunConfig(progress_bars=False), tile=TILE, halo=HALO)
    segment_archive(str(model), [str(image)], blend, RunConfig(progress_bars=False), tile=TILE, halo=HALO,
                    blend_tile=64, blend_overlap=0.5)
    a = zarr.open_array(str(plain / "small.zarr" / "0"), mode="r")[:]
    b = zarr.open_array(str(blend / "small.zarr" / "0"), mode="r")[:]
    agreement = (a == b).mean()
    assert 0.8 < agreement < 1.0  # blending changes labels only near sub-tile borders


def test_gigaseg_cli_registers_segment() -> None:
    from segcore.cli import build_parser

    args = build_parser().parse_args(["segment", "--model", "m", "--input", "a.tif", "b.fits", "--output", "o",
                                      "--only-class", "cluster", "--tta"])
    assert args.func.__module__ == "pipelines.segment" and args.input == ["a.tif", "b.fits"] and args.tta


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    from pipelines.segment import main

    model = make_model(tmp_path / "model")
    assert main(["--model", str(tmp_path / "nope"), "--input", "x.tif", "--output", str(tmp_path / "o")]) == 2
    assert main(["--model", str(model), "--input", str(tmp_path / "none*.tif"), "--output", str(tmp_path / "o")]) == 2
    assert main(["--model", str(model), "--input", "x.tif", "--output", str(tmp_path / "o"),
                 "--only-class", "quartz"]) == 2
