"""Test-only hooks of the trial function, driven by the ``testing:`` section of a search YAML.

* ``barrier_dir`` + ``barrier_parties``: before training, each trial registers a file in the
  folder and waits (up to ``barrier_timeout_s``) until ``barrier_parties`` trials have arrived.
  At arrival it writes how many trials were live (arrived, not done) including itself, so a
  test can check that N trials run at once and an (N+1)-th never does.
* ``fail_once_at_epoch``: the trial raises once at that epoch (before reporting it), leaving a
  marker in its trial folder, so a retry from the last checkpoint succeeds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from search.spec import TestingSection

log = logging.getLogger(__name__)


def barrier_arrive(testing: TestingSection | None, trial_id: str) -> int | None:
    """Meet the other trials; returns the live-trial count seen at arrival (None: no barrier)."""
    if testing is None or testing.barrier_dir is None or testing.barrier_parties <= 0:
        return None
    folder = Path(testing.barrier_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{trial_id}.arrived").touch()
    arrived = {p.stem for p in folder.glob("*.arrived")}
    live = len(arrived - {p.stem for p in folder.glob("*.done")})
    (folder / f"{trial_id}.live").write_text(str(live))
    deadline = time.monotonic() + testing.barrier_timeout_s
    while len(list(folder.glob("*.arrived"))) < testing.barrier_parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier: only {len(list(folder.glob('*.arrived')))} of "
                               f"{testing.barrier_parties} trials arrived in {testing.barrier_timeout_s}s")
        time.sleep(0.2)
    return live


def barrier_done(testing: TestingSection | None, trial_id: str) -> None:
    if testing is not None and testing.barrier_dir is not None and testing.barrier_parties > 0:
        (Path(testing.barrier_dir) / f"{trial_id}.done").touch()


class FailOnce:
    """Raises at ``fail_once_at_epoch`` the first time only (marker file in ``trial_dir``)."""

    def __init__(self, testing: TestingSection | None, trial_dir: Path | None) -> None:
        self.epoch = testing.fail_once_at_epoch if testing else None
        self.marker = trial_dir / "gigaseg_failed_once" if trial_dir else None

    def __call__(self, epoch: int) -> None:
        if self.epoch is None or self.marker is None or epoch != self.epoch or self.marker.exists():
            return
        self.marker.write_text(str(epoch))
        log.warning("testing hook: failing once at epoch %d", epoch)
        raise RuntimeError(f"testing hook: fail_once_at_epoch={epoch}")
