"""Driver-side bookkeeping: record finished units (the resume log), notice when an image and
then a whole file is complete, and collect per-worker statistics. One writer (the driver)
for every ``done.jsonl`` and the manifest, so no file locking is needed."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipelines.plan import done_file, done_units

log = logging.getLogger(__name__)


@dataclass
class FileState:
    file: str
    stem: str
    n_images: int = 1
    images: dict[str, set[int]] = field(default_factory=dict)  # state -> finished unit ids
    complete: list[str] = field(default_factory=list)
    submitted: bool = False
    error: str = ""
    started: float = field(default_factory=time.perf_counter)
    windows: int = 0


@dataclass
class WorkerStats:
    node: str
    pid: int
    units: int = 0
    windows: int = 0
    rss_mb: float = 0.0


class Tracker:
    """Consumes the result rows of the segmentation stage."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.files: dict[str, FileState] = {}
        self.workers: dict[tuple[str, int], WorkerStats] = {}
        self.units = 0
        self.windows = 0
        self.planned: dict[str, int] = {}  # image state -> its number of units

    def on_row(self, row: dict[str, Any]) -> tuple[FileState, bool]:
        """Record one row; returns the file's state and whether the file just became complete
        (every unit of every image finished, in this run or an earlier one) or just failed.
        Units are counted as a set, so retried tasks that repeat rows change nothing."""
        fs = self.files.setdefault(row["file"], FileState(row["file"], row["stem"]))
        self._worker(row)
        if fs.error or fs.submitted:
            return fs, False
        if row["status"] == "failed":
            fs.error = str(row["error"])
            return fs, True
        fs.n_images = int(row["n_images"])
        state = str(row["state"])
        self.planned[state] = int(row["n_units"])
        if state not in fs.images:
            fs.images[state] = set(done_units(state))  # progress of earlier runs
        units = fs.images[state]
        if row["status"] == "work" and int(row["unit"]) not in units:
            units.add(int(row["unit"]))
            self._record_done(row)
            fs.windows += int(row["n_windows"])
        if len(units) >= int(row["n_units"]) and state not in fs.complete:
            fs.complete.append(state)
        if len(fs.complete) == fs.n_images:
            fs.submitted = True
            return fs, True
        return fs, False

    def progress_line(self, n_files: int) -> str:
        """One line for the driver's log (Ray Data's own progress bars need a terminal)."""
        written = sum(len(units) for fs in self.files.values() for units in fs.images.values())
        planned = sum(self.planned.values())
        ended = sum(1 for fs in self.files.values() if fs.submitted or fs.error)
        pct = 100.0 * written / planned if planned else 0.0
        return (f"progress: {written} of {planned} units written ({pct:.0f}%) in the "
                f"{len(self.planned)} images planned so far; {ended} of {n_files} files segmented or failed")

    def _record_done(self, row: dict[str, Any]) -> None:
        self.units += 1
        self.windows += int(row["n_windows"])
        line = {k: row[k] for k in ("unit", "n_windows", "t_read", "t_predict", "t_write")}
        path = done_file(row["state"], self.run_id)
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def _worker(self, row: dict[str, Any]) -> None:
        if int(row.get("pid", 0) or 0) <= 0:
            return
        key = (str(row["node"]), int(row["pid"]))
        ws = self.workers.setdefault(key, WorkerStats(*key))
        ws.rss_mb = max(ws.rss_mb, float(row["rss_mb"]))
        if row["status"] == "work":
            ws.units += 1
            ws.windows += int(row["n_windows"])


class ResultSink:
    """Where both executors hand their result rows: the tracker records them (resume logs), the
    stage is timed on ``report``, completed files go to ``finisher`` and progress is logged."""

    def __init__(self, tracker: Tracker, finisher: Any, report: Any, progress_s: float) -> None:
        self.tracker, self.finisher, self.report, self.progress_s = tracker, finisher, report, progress_s
        self.t0 = self.last_log = time.perf_counter()

    def add(self, row: dict[str, Any]) -> None:
        fs, changed = self.tracker.on_row(row)
        if row["status"] == "work":
            self.report.stage_s = time.perf_counter() - self.t0
            self.report.first_unit_s = self.report.first_unit_s or self.report.stage_s
        if changed:
            self.finisher.file_changed(fs)

    def log_progress(self) -> None:
        """One progress line at most every ``progress_s`` seconds."""
        if time.perf_counter() - self.last_log > self.progress_s:
            log.info("%s", self.tracker.progress_line(self.finisher.total))
            self.last_log = time.perf_counter()

    def close(self) -> None:
        self.report.windows = self.tracker.windows
        self.report.workers = [vars(w) for w in self.tracker.workers.values()]
