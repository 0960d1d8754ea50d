"""Release the placement groups of Ray Train runs whose Tune trial was stopped or crashed.

A multi-worker trial runs a TorchTrainer from inside the Tune trial. Its controller actor (owned
by the trial actor) creates the workers' placement group, whose lifetime belongs to the *job*,
not to the controller. When ASHA stops the trial, the trial actor exits, the controller and
workers die with it, but the placement group stays reserved until the search driver exits, so
later trials wait forever for its CPUs/GPUs (ray-project/ray#53921, #54305). Ray 2.60 adds a
cleaner actor for this, but it asks the State API (the dashboard) whether the controller is
alive, which fails without a dashboard or when the worker cannot find the cluster's address.

Here instead: a :class:`LedgerCallback` in the Train run registers ``(controller handle, group)``
with a per-search :class:`PlacementGroupLedger` actor; the driver's :class:`LedgerSweeper`
(a Tune callback) periodically has the ledger ping each controller and remove the groups of
dead ones. No State API, no dashboard, no address lookup.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback

log = logging.getLogger(__name__)

NAMESPACE = "gigaseg"


@ray.remote(num_cpus=0)
class PlacementGroupLedger:
    """Placement groups of running Train controllers; ``sweep`` frees those whose controller died."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Any, Any]] = {}  # pg id -> (controller handle, placement group)

    def register(self, controller: Any, pg: Any) -> None:
        self.entries[pg.id.hex()] = (controller, pg)

    def unregister(self, pg_id: str) -> None:
        self.entries.pop(pg_id, None)

    def size(self) -> int:
        return len(self.entries)

    def sweep(self, timeout_s: float = 2.0) -> int:
        """Remove the groups of controllers that are dead; returns how many were removed."""
        from ray.exceptions import RayActorError
        from ray.util.placement_group import remove_placement_group

        removed = 0
        for pg_id, (controller, pg) in list(self.entries.items()):
            ref = controller.__ray_ready__.remote()
            ready, _ = ray.wait([ref], timeout=timeout_s)
            if not ready:
                continue  # busy or slow: treat as alive
            try:
                ray.get(ref)
                continue
            except RayActorError:
                pass
            try:
                remove_placement_group(pg)
                removed += 1
                log.warning("released placement group %s of a stopped Train run", pg_id)
            except Exception as exc:  # already removed by Train itself
                log.debug("placement group %s: %s", pg_id, exc)
            self.entries.pop(pg_id, None)
        return removed


def get_ledger(name: str) -> Any:
    """The search's ledger actor (created if missing, so a resumed search gets a fresh one)."""
    return PlacementGroupLedger.options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime=None
    ).remote()


class LedgerCallback(WorkerGroupCallback):
    """Runs inside the Train controller: tells the ledger about each worker group's placement group."""

    def __init__(self, ledger_name: str) -> None:
        self.ledger_name = ledger_name
        self._pg_id: str | None = None

    def after_worker_group_start(self, worker_group: Any) -> None:
        try:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            controller = ray.get_runtime_context().current_actor
            ledger = ray.get_actor(self.ledger_name, namespace=NAMESPACE)
            ray.get(ledger.register.remote(controller, pg))
            self._pg_id = pg.id.hex()
        except Exception as exc:  # never break training over bookkeeping
            log.warning("could not register the placement group with %s: %s", self.ledger_name, exc)

    def after_worker_group_shutdown(self, worker_group_context: Any) -> None:
        if self._pg_id is None:
            return
        try:
            ledger = ray.get_actor(self.ledger_name, namespace=NAMESPACE)
            ray.get(ledger.unregister.remote(self._pg_id))
        except Exception as exc:
            log.debug("ledger unregister: %s", exc)
        self._pg_id = None


class LedgerSweeper(tune.Callback):
    """Driver side: sweep the ledger every few seconds and whenever a trial ends."""

    def __init__(self, ledger_name: str, every_s: float = 3.0) -> None:
        self.ledger_name = ledger_name
        self.every_s = every_s
        self._last = 0.0

    def _sweep(self) -> None:
        self._last = time.monotonic()
        try:
            get_ledger(self.ledger_name).sweep.remote()
        except Exception as exc:
            log.debug("ledger sweep: %s", exc)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._sweep()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._sweep()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._sweep()
