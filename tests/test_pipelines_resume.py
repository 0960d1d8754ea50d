"""Stop and resume: ``python -m pipelines.segment`` is killed (SIGKILL) after some work units are
written; rerunning the same command finishes the job, and the output is byte-identical to an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipelines_helpers import (
    HALO,
    TILE,
    make_model,
    tree_digest,
    write_tiled_tiff8,
)

from pipelines.plan import done_units
from pipelines.runner import RunConfig, segment_archive

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
    state = out / ".gigaseg" / "big" / "image"
    proc = subprocess.Popen(_cli(model, image, out, address), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(done_units(state)) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(done_units(state))
    assert 4 <= n_before < 60 and not (out / "big.json").exists()

    rerun = subprocess.run(_cli(model, image, out, address), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert entries[-1]["status"] == "done"
    assert len(done_units(state)) == 60 and len(list(state.glob("done.*.jsonl"))) == 2  # one log per run

    clean = tmp_path / "clean"
    report = segment_archive(str(model), [str(image)], clean, RunConfig(workers=1, threads=1, progress_bars=False),
                             tile=TILE, halo=HALO, batch_size=2)
    assert len(report.done) == 1
    assert tree_digest(out / "big.zarr") == tree_digest(clean / "big.zarr")
    assert (out / "big.png").read_bytes() == (clean / "big.png").read_bytes()
    assert _comparable(out / "big.json") == _comparable(clean / "big.json")
