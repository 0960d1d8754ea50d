"""One writer per output folder: an advisory lock file ``OUT/.gigaseg/lock``.

The lock is a small JSON file (host, pid, the process's start time, when the run started, a
random token) created with ``O_CREAT | O_EXCL``. Exclusive create is atomic on local
filesystems and on NFSv3+ (and most cluster filesystems), unlike ``flock``/``fcntl`` locks,
which NFS may silently not enforce. It is advisory: it keeps two ``gigaseg segment`` runs
from writing one folder, not other programs.

A lock left by a run that died (same host, its pid gone or reused by another process) is
taken over with a warning. A lock held from another host cannot be checked from here: the
error names the holder and says how to remove it once that run is known to be gone. The
take-over itself is serialised by a second exclusive file (``lock.takeover``), so two runs
finding the same stale lock cannot both win.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from segcore.errors import OutputError

log = logging.getLogger(__name__)

STATE_DIR = ".gigaseg"  # the same hidden folder as pipelines.layout.STATE_DIR
LOCK_NAME = "lock"
TAKEOVER_NAME = "lock.takeover"
TAKEOVER_STALE_S = 60.0  # a take-over file older than this was left by a killed process


def _process_started(pid: int) -> float | None:
    """When ``pid`` started (Linux: clock ticks after boot, from /proc; elsewhere -1 = unknown),
    or None if no such process is running (zombies count as gone). Comparing start times
    tells a dead holder whose pid was reused from a live one."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # exists, owned by another user
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return -1.0
    return None if fields[0] == "Z" else float(fields[19])


def _create_exclusive(path: Path, data: dict[str, Any]) -> bool:
    """Create ``path`` holding ``data`` as JSON, only if it does not exist yet (atomic)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data))
        f.flush()
        os.fsync(f.fileno())
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content; None if it is gone; {} if it is unreadable (a half-written lock)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class OutputLock:
    """``with OutputLock(out):`` holds ``out/.gigaseg/lock`` for the block, or raises OutputError."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / STATE_DIR / LOCK_NAME
        pid = os.getpid()
        self.info = {"host": socket.gethostname(), "pid": pid, "pid_started": _process_started(pid),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": secrets.token_hex(8)}
        self.held = False

    def acquire(self) -> None:
        """Take the lock; take over a stale one (with a warning); else raise :class:`OutputError`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder may release (or a take-over finish) between our steps
            if _create_exclusive(self.path, self.info):
                self.held = True
                return
            holder = _read(self.path)
            if holder is None:
                continue
            if not self._is_stale(holder):
                raise OutputError(self._held_message(holder))
            self._take_over(holder)
        holder = _read(self.path) or {}
        raise OutputError(self._held_message(holder))

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        """Same host and the holder's process is gone (or its pid now belongs to a newer process)."""
        if not holder:  # unreadable: a writer died between create and write; stale if old
            return self._age() > TAKEOVER_STALE_S
        if holder.get("host") != socket.gethostname():
            return False
        started = _process_started(int(holder.get("pid", -1)))
        if started is None:
            return True
        recorded = holder.get("pid_started")  # None or -1: unknown, so trust that the pid is the holder
        return started > 0 and recorded is not None and float(recorded) > 0 and started != float(recorded)

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Remove the stale lock, serialised by an exclusive take-over file."""
        guard = self.path.with_name(TAKEOVER_NAME)
        try:
            if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        if not _create_exclusive(guard, self.info):
            time.sleep(0.2)  # another run is taking over; the next attempt sees its lock
            return
        try:
            if _read(self.path) == holder:  # still the same stale lock
                log.warning("%s: taking over the lock of a run that is gone (host %s, pid %s, started %s)",
                            self.path, holder.get("host", "?"), holder.get("pid", "?"), holder.get("started", "?"))
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _held_message(self, holder: dict[str, Any]) -> str:
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}"
               if holder else "an unreadable lock file")
        return (f"{self.root}: another gigaseg segment run is writing to this folder ({who}). "
                f"Wait for it to finish or use another --output; if that run is gone, delete {self.path}.")

    def release(self) -> None:
        """Remove the lock if it is still ours (a take-over by another run is left alone)."""
        if self.held and (_read(self.path) or {}).get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
