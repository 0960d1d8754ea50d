"""Stop a search whose first trials all fail the same way, and say why a search produced nothing.

A search whose trials all raise the same error (a corrupt weights file, an out-of-memory patch
size, a bug) would otherwise run every trial to the same failure and end "successfully" with no
champion. :class:`SameErrorStop` watches trials as they finish: if the first ``first_n`` all
failed with the same error, it stops the whole search and keeps that error as the reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.stopper import Stopper

log = logging.getLogger(__name__)

_MAX_CHARS = 600
_WRAPPERS = ("TuneError", "StartTraceback", "StartTracebackWithWorkerRank")  # Tune wraps trial errors


def error_message(exc: BaseException | None) -> str | None:
    """``"Type: message"`` of the root cause of a trial error (Ray/Tune wrappers unwrapped)."""
    from ray.exceptions import RayError

    if exc is None:
        return None
    seen: set[int] = set()
    while id(exc) not in seen and (isinstance(exc, RayError) or type(exc).__name__ in _WRAPPERS):
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = str(exc).strip()
    if "Traceback (most recent call last)" in text:  # a text trace (error not picklable): keep its last line
        text = text.splitlines()[-1].strip()
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message if len(message) <= _MAX_CHARS else message[:_MAX_CHARS] + "..."


def _text_error(text: str) -> str | None:
    """The last line of a text traceback (``module.Type: message``), without the module path."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    name, sep, rest = lines[-1].partition(": ")
    return f"{name.rsplit('.', 1)[-1]}{sep}{rest}"[:_MAX_CHARS]


def trial_error_message(trial: Any) -> str:
    """The error a Tune trial ended with. When Tune tells callbacks, the error files exist only in
    the driver's staging folder (``trial.local_path``), not yet in storage: read those first."""
    import cloudpickle

    readers = (
        (trial.pickled_error_file, lambda p: error_message(cloudpickle.loads(Path(p).read_bytes()))),
        (trial.error_file, lambda p: _text_error(Path(p).read_text(errors="replace"))),
    )
    for path, read in readers:
        try:
            message = read(path) if path and Path(path).is_file() else None
        except Exception as exc:  # unreadable error file: fall back to the next form
            log.debug("trial %s: cannot read %s: %s", trial.trial_id, path, exc)
            continue
        if message:
            return message
    return "unknown error (see the trial's error.txt)"


def most_common_error(errors: list[str]) -> str | None:
    """The most frequent error message, with how many trials had it when more than one did."""
    if not errors:
        return None
    message, n = Counter(errors).most_common(1)[0]
    return f"{message} ({n} of {len(errors)} failed trials)" if len(errors) > 1 else message


class SameErrorStop(tune.Callback, Stopper):
    """Callback + stopper (pass the same object to both): stop all once the first ``first_n``
    finished trials all failed with one and the same error. ``first_n=0`` disables it."""

    def __init__(self, first_n: int) -> None:
        self.first_n = first_n
        self.finished: list[str | None] = []  # in finishing order: error message, or None if fine
        self.reason: str | None = None

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished.append(None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished.append(trial_error_message(trial))
        self._check()

    def _check(self) -> None:
        first = self.finished[: self.first_n]
        if self.reason or not self.first_n or len(first) < self.first_n or len(set(first)) != 1 or first[0] is None:
            return
        self.reason = f"the first {self.first_n} trials all failed with the same error, so the search was stopped: {first[0]}"
        log.error("%s", self.reason)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.reason is not None
