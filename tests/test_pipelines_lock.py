"""One writer per output folder: ``OUT/.gigaseg/lock`` refuses a second run (in-process and from a
live process holding it), a lock left by an exited process is taken over with a warning, and
the lock is released on exit. Refusal happens before the model is even loaded."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.lock import OutputLock
from pipelines.runner import RunConfig, segment_archive
from segcore.errors import OutputError

HOLD = "import sys, time; from pathlib import Path; from pipelines.lock import OutputLock\n" \
       "with OutputLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)\n"


def test_second_run_into_locked_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "O"
    with OutputLock(out):
        with pytest.raises(OutputError) as err:
            segment_archive(str(tmp_path / "model"), [str(tmp_path / "x.tif")], out, RunConfig())
    message = str(err.value)
    assert "another gigaseg segment run is writing to this folder" in message
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in message and "--output" in message
    assert not (out / ".gigaseg" / "lock").exists()  # released by the holder


def test_cli_refused_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "O"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        cli = subprocess.run([sys.executable, "-m", "pipelines.segment", "--model", str(tmp_path / "model"),
                              "--input", str(tmp_path / "x.tif"), "--output", str(out)],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2, cli.stderr[-2000:]
        assert f"pid {holder.pid}" in cli.stderr and "Traceback" not in cli.stderr
        assert time.monotonic() - t0 < 60
        assert json.loads((out / ".gigaseg" / "lock").read_text())["pid"] == holder.pid  # left alone
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = tmp_path / "O" / ".gigaseg" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="pipelines.lock"), OutputLock(tmp_path / "O") as held:
        assert json.loads(lock.read_text())["token"] == held.info["token"]
    assert f"taking over the lock of a run that is gone (host {socket.gethostname()}, pid {gone.pid}" in caplog.text
    assert not lock.exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / ".gigaseg" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "node-7", "pid": 1, "started": "2026-01-01T00:00:00"}))
    with pytest.raises(OutputError, match=r"host node-7, pid 1.*delete .*\.gigaseg/lock"):
        OutputLock(tmp_path).acquire()
    assert lock.exists()
