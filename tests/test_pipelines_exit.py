"""Clean starts and exits of ``python -m pipelines.segment``, in this process (``--executor local``)
and when it starts its own local Ray (``--executor ray``): after a run that ends with failed
inputs, after Ctrl-C (SIGINT) mid-run, and after a local Ray that cannot start, no process it started is left, and the user sees one line, no traceback.
Each run gets a private RAY_TMPDIR and a marker variable, so its processes are found in /proc
(whatever their parent now is) and nothing of the shared test Ray is touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from pipelines_helpers import HALO, TILE, make_model, write_tiled_tiff8

from pipelines.plan import PLAN_FILE, changed_settings, done_units
from pipelines.runner import RunConfig, segment_archive

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _env(tmpdir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": tmpdir, "GIGASEG_EXIT_TEST": uuid.uuid4().hex}


def _marked(mark: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``mark``: the CLI and all it started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark.encode() in (entry / "environ").read_bytes() and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _gone(mark: str, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _cli(model: Path, inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.segment", "--model", str(model), "--input", *map(str, inputs),
            "--output", str(out), "--tile", str(TILE), "--halo", str(HALO), "--workers", "1", "--threads", "1",
            "--no-progress", *extra]


@pytest.fixture
def ray_tmp() -> str:
    path = tempfile.mkdtemp(prefix="gsx-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_failed_inputs_exit_1_and_leave_no_process(tmp_path: Path, ray_tmp: str, executor: str) -> None:
    model = make_model(tmp_path / "model")
    write_tiled_tiff8(tmp_path / "good.tif", (150, 200))
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\xff" * 200)
    env = _env(ray_tmp)
    proc = subprocess.run(_cli(model, [tmp_path / "good.tif", tmp_path / "broken.tif"], tmp_path / "O",
                               "--executor", executor), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 done, 1 failed" in proc.stderr
    assert _gone(env["GIGASEG_EXIT_TEST"]) == []


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path: Path, ray_tmp: str, ray_local: None,
                                                  executor: str) -> None:
    model, image, out = make_model(tmp_path / "model"), tmp_path / "big.tif", tmp_path / "O"
    write_tiled_tiff8(image, (640, 704))
    env = _env(ray_tmp)
    proc = subprocess.Popen(_cli(model, [image], out, "--batch-size", "2", "--executor", executor), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / ".gigaseg" / "big" / "image"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and proc.poll() is None and len(done_units(state)) < 3:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if "stopped:" in line]
    assert len(stopped) == 1 and "units written; rerun the same command to resume" in stopped[0], stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert _gone(env["GIGASEG_EXIT_TEST"]) == []
    written = len(done_units(state))
    assert f"stopped: {written} of 60 units written" in stopped[0]

    planned = json.loads((state / PLAN_FILE).read_text())
    report = segment_archive(str(model), [str(image)], out, RunConfig(progress_bars=False), tile=TILE,
                             halo=HALO, batch_size=2)
    replanned = json.loads((state / PLAN_FILE).read_text())
    assert len(report.done) == 1, report
    # resumed: the recorded units are not redone (if re-planned, the settings diff says why)
    assert report.windows < 110, changed_settings(planned.get("settings", {}), replanned.get("settings", {}))
    assert len(done_units(state)) == 60


def test_ray_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model")
    write_tiled_tiff8(tmp_path / "good.tif", (64, 64))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    env = _env(str(not_a_dir))  # Ray cannot create its session folder under a file
    proc = subprocess.run(_cli(model, [tmp_path / "good.tif"], tmp_path / "O", "--executor", "ray"), env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "local Ray: did not start, twice" in proc.stderr and "--address" in proc.stderr
    assert _gone(env["GIGASEG_EXIT_TEST"]) == []
