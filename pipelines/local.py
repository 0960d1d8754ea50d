"""In-process execution on one machine: the Ray Data job's plan -> segment -> finish steps
(:mod:`pipelines.runner`) run in the calling process, without starting Ray.

Why: on a workstation or a small node the Ray path's fixed cost dominates. Measured on an idle
2-core machine, a local Ray took 4-8 s to start and an actor 2-10 s more to import torch and load
the model, and the driver, raylet, GCS and actor processes each hold their own imports (a 4096²
scan's run peaked at 2.4x MONAI's single-process RSS). Here the model is loaded once, in this
process, and its work units run on ``lanes`` threads (torch releases the GIL inside operators):

* ``lanes`` and torch ``threads`` come from the same rule as the Ray pool of one node
  (:func:`pipelines.runner.cpu_pool`, :func:`pipelines.options.one_actor_per_node`): big windows
  get one lane with every CPU as a torch thread; smaller windows one single-threaded lane per CPU,
  which was 1.17x faster on 512² windows (2 x 1 thread 0.69 MP/s against 1 x 2 threads 0.59 MP/s);
* one more thread than lanes, so reading and writing overlap the forward passes (``--no-overlap``
  turns it off), as the actors' two concurrent calls do;
* the same units, the same ``done.jsonl`` resume log, the same finishing step and manifest:
  the output bytes equal the Ray path's, and a run may resume what the other started.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from pipelines.plan import plan_file
from pipelines.progress import ResultSink

log = logging.getLogger(__name__)


def local_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def unit_rows(items: list[dict[str, Any]], plan_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Plan each input as it is reached (a header read and a small sample) and yield its unit rows,
    so the first file's windows start before the last file is planned."""
    for item in items:
        yield from plan_file({"file": item["file"], "stem": item["stem"]}, **plan_kwargs)


def run_units(rows: Iterator[dict[str, Any]], segment: Any, workers: int, on_result: Any) -> None:
    """Run ``segment(row)`` for every row on ``workers`` threads, at most ``workers + 1`` in flight,
    and hand each result to ``on_result`` in this thread (the one writer of the resume logs)."""
    pending: set[Future] = set()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gigaseg-lane")
    try:
        for row in rows:
            pending.add(pool.submit(segment, row))
            while len(pending) > workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    on_result(future.result())
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_result(future.result())
    except BaseException:
        # Ctrl-C (or an error here): drop the queued units and let the running ones end (a unit is one
        # band of windows): a write cut off at interpreter exit would print a traceback. Units not
        # recorded are redone on resume.
        log.info("stopping: waiting for the %d unit(s) in progress", sum(f.running() for f in pending))
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def consume_local(rows: Iterator[dict[str, Any]], segmenter: Any, workers: int, sink: ResultSink) -> None:
    """Drive the units through ``segmenter``; each result goes to ``sink`` in this thread, as the
    Ray dataset's result rows do in :func:`pipelines.runner._consume`."""

    def on_result(row: dict[str, Any]) -> None:
        sink.add(row)
        sink.log_progress()

    run_units(rows, segmenter.segment_row, workers, on_result)
    sink.close()
