"""The Ray Data job: input files -> plan (``map_batches`` tasks, one block per work unit out) ->
segment (actor pool, model loaded once per actor) -> small result rows consumed by the driver,
which records progress, starts each file's finishing task and writes the manifest. Without a
cluster to use, the same steps run in this process (:mod:`pipelines.local`, :func:`choose_executor`).

Resource guard: actors ask for a fraction of a CPU (0.5 on CPU-only clusters, 0.25 next to a
GPU) and the pool is sized so that at least one CPU stays free; the planning and finishing
tasks ask for 0.25 CPU. Otherwise, with actors holding every CPU, the planning tasks upstream
could never be scheduled and the job would hang.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines.finalize import finalize_file
from pipelines.layout import STATE_DIR, Layout, Manifest, assign_stems, expand_inputs, input_identity
from pipelines.local import consume_local, local_cpus, unit_rows
from pipelines.lock import OutputLock
from pipelines.options import ModelInfo, SegmentOptions, load_for_run, one_actor_per_node, resolve_tiling
from pipelines.plan import OWNER_FIX, PLAN_FILE, ImagePlan, done_units, owner_problem, plan_batch
from pipelines.progress import FileState, ResultSink, Tracker
from pipelines.worker import TileSegmenter, peak_rss_mb
from segcore.errors import ConfigError, UserError
from segcore.modelio.ref import tracking_uri_for

log = logging.getLogger(__name__)

TASK_CPUS = 0.25  # planning and finishing tasks: mostly I/O; small so they schedule next to the actors
MAX_CPU_ACTORS = 32
RAY_RETRY_S = 5.0  # pause before the one retry of a failed local Ray start
# A local Ray starts without its dashboard unless this is "1": measured on a loaded 2-core machine,
# ray.init took 21-30 s without vs 26-45 s with it, and its process tree 10 processes / 0.88 GB RSS
# (0.53 GB PSS) vs 21 / 1.89 GB (0.78 GB PSS), memory every segment run paid for nothing.
DASHBOARD_ENV = "GIGASEG_RAY_DASHBOARD"
PROGRESS_S = 10.0  # seconds between progress lines in the driver
# Memory requests, so Ray schedules by them and Ray Data stops warning about unrequested memory.
# Measured on a 2-core CPU machine (Python 3.11, torch 2.15): a planning task peaked at 399 MiB
# (its imports dominate; the normalisation sample adds ~25 MiB). A segmenter actor: 582 MiB after
# imports, +290 MiB with a resnet34 U-Net loaded, then ~450 bytes per input pixel of a CPU forward
# pass (8 windows of 768 px: peak 2.97 GiB); on a GPU the activations live in GPU memory.
DRIVER_PLAN_FILES = 16  # archives this small are planned on the driver (no planning tasks, no task workers)
MAX_UNIT_BLOCKS = 4096  # blocks of driver-planned unit rows (one unit per block up to this many)
PLAN_MEMORY = 512 << 20  # bytes reserved per planning task
ACTOR_BASE_MEMORY = 900 << 20  # imports + model
ACTOR_BYTES_PER_PX = {"cpu": 450, "gpu": 64}  # per input pixel of one model call (batch x window)
# Ray Data's memory detector warns at the end of a run unless the request is >= 1.25 x the peak
# it saw (a 1.2 GiB actor warned against a 1.4 GiB request): the estimate gets that headroom.
ACTOR_MEMORY_HEADROOM = 1.3


Executor = Literal["auto", "local", "ray"]


@dataclass
class RunConfig:
    """How the job runs (no effect on the output bytes)."""

    executor: Executor = "auto"  # auto: Ray when a cluster is given or running or >1 GPU, else local
    workers: int | None = None  # actors (lanes when local); default: one per GPU, else from the window
    worker_cpus: float | None = None  # CPU request per actor (default 0.5, or 0.25 with a GPU)
    threads: int | None = None  # torch threads per actor (default: CPUs / actors, at least 1)
    overlap: bool = True  # two calls per actor: one reads/writes while the other predicts
    address: str | None = None  # Ray address; default RAY_ADDRESS, else a new local Ray
    overwrite: bool = False  # redo inputs the manifest lists as done
    progress_bars: bool = True


@dataclass
class RunReport:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    driver_rss_mb: float = 0.0
    wall_s: float = 0.0  # the whole call: model check, planning, segmenting, finishing
    stage_s: float = 0.0  # from starting the dataset to the last finished unit (actor start-up included)
    first_unit_s: float = 0.0  # from starting the dataset to the first finished unit (start-up latency)
    windows: int = 0
    pool: dict[str, Any] = field(default_factory=dict)


class RayStartError(UserError):
    """The local Ray could not be started (twice)."""


def init_ray(address: str | None) -> bool:
    """Reuse a running Ray; else connect to ``address`` / ``RAY_ADDRESS``; else start a local one.
    Returns whether this call initialised Ray (the caller then shuts it down). A local start
    that fails (a slow, overloaded machine times out) is retried once after a pause; then it
    is one :class:`RayStartError` line (the traceback is logged at debug level, ``-v``)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        _start_local_ray()
    return True


def _start_local_ray() -> None:
    import ray

    dashboard = os.environ.get(DASHBOARD_ENV, "") == "1"
    for attempt in range(2):
        try:
            ray.init(address="local", include_dashboard=dashboard)
            if not dashboard:
                log.info("local Ray started without its dashboard (%s=1 starts it)", DASHBOARD_ENV)
            return
        except Exception as err:  # Ray raises bare Exception/RuntimeError/TimeoutError/OSError on start-up
            ray.shutdown()  # stop whatever half-started, so no raylet or dashboard is left behind
            log.debug("local Ray start %d failed", attempt + 1, exc_info=True)
            cause = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            if attempt == 0:
                log.warning("local Ray did not start (%s); retrying in %.0f s", cause, RAY_RETRY_S)
                time.sleep(RAY_RETRY_S)
                continue
            tmp = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
            raise RayStartError(
                f"local Ray: did not start, twice ({cause}). The machine is probably overloaded, or {tmp} "
                f"holds stale sessions: stop old Ray processes of yours (ray stop), delete old "
                f"{tmp}/session_* folders, free CPU and memory and rerun, or pass --address of a running "
                "Ray cluster") from None


def _cpu_actors(cpus: float) -> int:
    """CPU-only pools: one single-threaded actor per CPU scales best on small machines; on big
    ones two threads each (and at most MAX_CPU_ACTORS) keep the model copies' memory in check."""
    return max(1, min(int(cpus) if cpus <= 4 else int(cpus) // 2, MAX_CPU_ACTORS))


def cpu_pool(cpus: float, nodes: int, window: int) -> tuple[int, int]:
    """(actors, torch threads per actor) for CPU-only nodes, from the window edge (tile + 2 halo).

    Big windows (:func:`pipelines.options.one_actor_per_node`, which says why): one actor per node
    with every CPU of the node as a torch thread. Smaller windows keep :func:`_cpu_actors`.
    Measured on a 2-core machine shared with other jobs (load 20+), a resnet18 U-Net forward of
    two 1536² windows took 59 s in one process with 2 threads against 32 s in two 1-thread
    processes side by side: under heavy oversubscription intra-op threads lose;
    ``--workers/--threads`` override. A pure function: the same node and tile give the same pool."""
    nodes = max(1, nodes)
    if not one_actor_per_node(window):
        size = _cpu_actors(cpus)
        return size, max(1, int(cpus // size))
    return min(nodes, MAX_CPU_ACTORS), max(1, int(cpus / nodes))


def choose_executor(run: RunConfig) -> tuple[str, str]:
    """("local" or "ray", why). ``auto`` runs in this process (:mod:`pipelines.local`) unless there is
    a cluster to use: ``--address``, ``RAY_ADDRESS`` (``ray job submit`` sets it), a Ray already
    initialised here, more than one GPU (one actor each) or ``--worker-cpus`` (a Ray request)."""
    if run.executor == "local":
        for given, flag in ((run.address, "--address"), (run.worker_cpus, "--worker-cpus")):
            if given is not None:
                raise ConfigError(f"--executor local with {flag} {given}: {flag} is for Ray actors and "
                                  f"local runs have none. Drop {flag}, or use --executor ray")
        return "local", "--executor local"
    if run.executor == "ray":
        return "ray", "--executor ray"
    ray = sys.modules.get("ray")  # a Ray initialised here has been imported
    if run.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return "ray", "a Ray cluster is given or running"
    if run.worker_cpus is not None:
        return "ray", "--worker-cpus asks Ray for actor CPUs"
    import torch

    if torch.cuda.device_count() > 1:
        return "ray", f"{torch.cuda.device_count()} GPUs: one actor each"
    return "local", "one machine and no Ray cluster given (--executor ray starts a local Ray)"


def local_pool(run: RunConfig, opts: SegmentOptions, window: int | None = None) -> dict[str, Any]:
    """Lanes (concurrent units) and torch threads for :mod:`pipelines.local`: the Ray pool's rule
    for one node (:func:`cpu_pool`) at ``window`` px (default the run's tile + 2 halo); one lane
    with 2 threads on a GPU; ``--workers`` sets the lanes."""
    import torch

    cpus = local_cpus()
    gpu = opts.device != "cpu" and torch.cuda.is_available()
    lanes, threads = (1, 2) if gpu else cpu_pool(cpus, 1, window or opts.tile + 2 * opts.halo)
    if run.workers:
        lanes, threads = run.workers, 2 if gpu else max(1, cpus // run.workers)
    return {"executor": "local", "size": lanes, "threads": run.threads or threads, "num_gpus": int(gpu),
            "cluster_cpus": cpus}


def actor_memory(opts: SegmentOptions, use_gpu: bool) -> int:
    """Bytes one segmenter actor asks for: base + its biggest model call (``batch_size`` windows or a
    strip of ``call_px``, :meth:`SegmentOptions.max_call_px`), with :data:`ACTOR_MEMORY_HEADROOM`."""
    need = ACTOR_BASE_MEMORY + ACTOR_BYTES_PER_PX["gpu" if use_gpu else "cpu"] * opts.max_call_px()
    return int(ACTOR_MEMORY_HEADROOM * need)


def _cpu_nodes() -> int:
    """Alive Ray nodes that have CPUs."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)


def pool_plan(run: RunConfig, opts: SegmentOptions) -> dict[str, Any]:
    """Actor count and per-actor resources that leave room for the upstream tasks."""
    import ray

    device = opts.device
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), int(res.get("GPU", 0))
    use_gpu = gpus > 0 and device != "cpu"
    cpu_size, cpu_threads = cpu_pool(cpus, _cpu_nodes(), opts.tile + 2 * opts.halo)
    size = run.workers or (gpus if use_gpu else cpu_size)
    per_cpu = run.worker_cpus if run.worker_cpus is not None else (0.25 if use_gpu else 0.5)
    free = max(1.0, 0.25 * cpus)  # kept for planning and finishing tasks
    if size * per_cpu > cpus - free:
        per_cpu = max(0.01, (cpus - free) / size) if cpus > free else 0.01
        log.info("actors ask for %.2f CPU each so that %.1f CPU stay free for reads", per_cpu, free)
    threads = run.threads or (2 if use_gpu else cpu_threads if not run.workers else max(1, int(cpus // size)))
    memory = actor_memory(opts, use_gpu)
    room = float(res.get("memory", 0)) - 2 * PLAN_MEMORY  # two planning tasks can always start
    if size * memory > room > 0:
        memory = int(room / size)
        log.info("actors ask for %.1f GiB memory each (estimated %.1f GiB) to fit the cluster's memory",
                 memory / 2**30, actor_memory(opts, use_gpu) / 2**30)
    return {"size": size, "num_cpus": per_cpu, "num_gpus": 1 if use_gpu else 0, "threads": threads,
            "memory": memory, "cluster_cpus": cpus, "cluster_gpus": gpus}


def build_dataset(items: list[dict[str, str]], opts: SegmentOptions, info: ModelInfo, out: Path,
                  signature: str, pool: dict[str, Any], run: RunConfig, run_id: str) -> Any:
    """input rows -> plan (tasks) -> segment (actor pool) -> result rows; built lazily."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    saved = ctx.target_max_block_size
    # One work unit per block, so the units of one huge image spread over all actors. The dataset
    # keeps a copy of the context made here. (A repartition would do the same in a separate task
    # asking for a whole CPU, which may not fit next to the actors: the hang guarded against.)
    ctx.target_max_block_size = 1
    plan_kwargs = _plan_kwargs(opts, info, out, signature, run_id)
    try:
        if len(items) <= DRIVER_PLAN_FILES:  # a header read takes milliseconds: no task round trip
            t0 = time.perf_counter()
            rows = list(unit_rows(items, plan_kwargs))
            log.info("planned %d input(s) on the driver in %.2f s: %d work units", len(items),
                     time.perf_counter() - t0, len(rows))
            ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), MAX_UNIT_BLOCKS)))
        else:
            ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 512)))
            # Planning reserves memory for its sample; the different resource request also keeps Ray
            # Data from fusing it into the actors, so its one-unit blocks spread over the actor pool.
            ds = ds.map_batches(plan_batch, batch_size=1, batch_format="numpy", num_cpus=TASK_CPUS,
                                memory=PLAN_MEMORY, fn_kwargs=plan_kwargs)
        compute = ActorPoolStrategy(size=pool["size"], max_concurrent_calls_per_actor=2 if run.overlap else 1,
                                    enable_true_multi_threading=run.overlap)
        return ds.map_batches(
            TileSegmenter, batch_size=1, batch_format="numpy", compute=compute,
            fn_constructor_kwargs={"opts": opts.model_dump(mode="json"), "info": info.model_dump(mode="json"),
                                   "threads": pool["threads"]},
            num_cpus=pool["num_cpus"], num_gpus=pool["num_gpus"] or None, memory=pool["memory"],
        )
    finally:
        ctx.target_max_block_size = saved


def _plan_kwargs(opts: SegmentOptions, info: ModelInfo, out: Path, signature: str, run_id: str) -> dict[str, Any]:
    return {"opts": opts.model_dump(mode="json"), "info": info.model_dump(mode="json"), "out": str(out),
            "signature": signature, "run_id": run_id}


def _owner(layout: Layout, stem: str, identity: dict[str, Any]) -> str:
    """Why ``stem``'s outputs belong to another input (from its saved plans or, without them, its
    summary), or "". Checked on the driver before any work; planning checks again (a guard)."""
    for plan_json in sorted((layout.root / STATE_DIR / stem).glob(f"*/{PLAN_FILE}")):
        saved = json.loads(plan_json.read_text())
        problem = owner_problem(saved["file"], saved.get("identity", {}), identity, layout.zarr_root(stem))
        if problem:
            return problem
    summary = layout.product(stem, ".json")
    if summary.exists():
        return owner_problem(json.loads(summary.read_text()).get("input", ""), {}, identity, layout.zarr_root(stem))
    return ""


def _todo(files: list[Path], stems: dict[Path, str], layout: Layout, signature: str,
          run: RunConfig, report: RunReport) -> list[dict[str, Any]]:
    """Inputs still to segment. Skipped: those the manifest lists as done for this very file
    (same identity), output name and signature. Failed at once: those whose output name holds
    another file's labels (see :func:`pipelines.plan.check_owner`), unless ``--overwrite``."""
    entries, manifest = Manifest(layout.manifest).load(), Manifest(layout.manifest)
    items = []
    for f in files:
        entry, identity, stem = entries.get(str(f), {}), input_identity(f), stems[f]
        done = entry.get("status") == "done" and entry.get("signature") == signature \
            and entry.get("stem") == stem and entry.get("identity") == identity
        if done and not run.overwrite and layout.product(stem, ".json").exists():
            report.skipped.append(str(f))
            continue
        if run.overwrite:
            shutil.rmtree(layout.root / STATE_DIR / stem, ignore_errors=True)
        problem = "" if run.overwrite else _owner(layout, stem, identity)
        if problem:
            report.failed[str(f)] = f"{problem}: {OWNER_FIX}."
            manifest.append({"input": str(f), "stem": stem, "status": "failed", "signature": signature,
                             "identity": identity, "error": report.failed[str(f)]})
            log.error("FAILED %s: %s", stem, report.failed[str(f)])
            continue
        items.append({"file": str(f), "stem": stem, "identity": identity})
    return items


def segment_archive(model: str, inputs: list[str], output: str | Path, run: RunConfig | None = None,
                    **options: Any) -> RunReport:
    """Segment every image matched by ``inputs`` into ``output``; ``options`` are
    :class:`SegmentOptions` fields (tile, halo, tta, blend_tile, only_class, tracking_uri, ...).

    Holds ``OUT/.gigaseg/lock`` throughout (one run per output folder, see :mod:`pipelines.lock`).
    Ctrl-C raises :class:`Interrupted` (a KeyboardInterrupt) saying how many units were written;
    a Ray started here is shut down on every exit."""
    layout = Layout(Path(output).resolve())
    layout.root.mkdir(parents=True, exist_ok=True)
    with OutputLock(layout.root):
        return _segment_locked(model, inputs, layout, run or RunConfig(), options)


def _segment_locked(model: str, inputs: list[str], layout: Layout, run: RunConfig,
                    options: dict[str, Any]) -> RunReport:
    t0, report = time.perf_counter(), RunReport()
    files = expand_inputs(inputs, exclude=layout.root)
    if not files:
        raise ConfigError(f"--input {' '.join(inputs)}: no image files found; check the paths and globs")
    stems = assign_stems(files)  # refuses clashing names before any work
    options["tracking_uri"] = tracking_uri_for(model, options.get("tracking_uri"))  # fixed once
    loaded, info = load_for_run(model, options.get("tracking_uri"))
    options = resolve_tiling(loaded, options, actors=run.workers)  # halo from the card, tile from the halo
    opts = SegmentOptions(model=info.ref, **{k: v for k, v in options.items() if v is not None})
    if opts.only_class:
        info.class_index(opts.only_class)
    del loaded
    signature = opts.signature(info.digest)
    items = _todo(files, stems, layout, signature, run, report)
    log.info("%d inputs: %d to segment, %d already done (manifest %s)", len(files), len(items),
             len(report.skipped), layout.manifest)
    if items:
        _execute(items, opts, info, layout, signature, run, report)
    report.driver_rss_mb, report.wall_s = peak_rss_mb(), time.perf_counter() - t0
    return report


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: says how many work units are safely written (the rerun resumes)."""

    def __init__(self, written: int, total: int) -> None:
        super().__init__(f"stopped: {written} of {total} units written; rerun the same command to resume")
        self.written, self.total = written, total


def unit_counts(layout: Layout, stems: list[str]) -> tuple[int, int]:
    """(units recorded as written, units planned) over the images of these outputs, from disk."""
    written = total = 0
    for stem in stems:
        for plan_json in (layout.root / STATE_DIR / stem).glob(f"*/{PLAN_FILE}"):
            plan = ImagePlan.load(plan_json.parent)
            total += len(plan.units)
            written += len(done_units(plan_json.parent))
    return written, total


def _run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _execute(items: list[dict[str, Any]], opts: SegmentOptions, info: ModelInfo, layout: Layout,
             signature: str, run: RunConfig, report: RunReport) -> None:
    executor, why = choose_executor(run)
    log.info("executor: %s (%s)", executor, why)
    if executor == "local":
        _execute_local(items, opts, info, layout, signature, run, report)
    else:
        _execute_ray(items, opts, info, layout, signature, run, report)


def _execute_local(items: list[dict[str, Any]], opts: SegmentOptions, info: ModelInfo, layout: Layout,
                   signature: str, run: RunConfig, report: RunReport) -> None:
    """The same units, resume log and finishing step as :func:`_execute_ray`, in this process. The
    pool follows the first image's real window: an archive of small frames (one 512² window each)
    ran 1.5x faster in two 1-thread lanes than in one 2-thread lane (60 FITS x 2 HDUs: 40.8 against
    60.2 s: the planning and finishing between frames starve a 2-thread forward on 2 cores)."""
    run_id = _run_id()
    rows = unit_rows(items, _plan_kwargs(opts, info, layout.root, signature, run_id))
    first = next(rows, None)
    rows = itertools.chain([first] if first else [], rows)
    report.pool = local_pool(run, opts, first_window(first) if first else None)  # None: no image planned
    log.info("actor pool: %s", report.pool)
    segmenter = TileSegmenter(opts.model_dump(mode="json"), info.model_dump(mode="json"),
                              threads=report.pool["threads"], lanes=report.pool["size"])
    finisher = _Finisher(layout, opts, info, signature, report, total=len(items),
                         identities={i["file"]: i["identity"] for i in items}, remote=False)
    try:
        consume_local(rows, segmenter, report.pool["size"] + int(run.overlap),
                      ResultSink(Tracker(run_id), finisher, report, PROGRESS_S))
    except KeyboardInterrupt:
        raise Interrupted(*unit_counts(layout, [i["stem"] for i in items])) from None


def first_window(row: dict[str, Any]) -> int | None:
    """The largest window edge (tile + 2 halo, within the image) of the image a unit row belongs to
    (None for a file that failed planning)."""
    if not row.get("state"):
        return None
    plan = ImagePlan.load(row["state"])
    return max(min(side, plan.tile + 2 * plan.halo) for side in plan.shape)


def _execute_ray(items: list[dict[str, Any]], opts: SegmentOptions, info: ModelInfo, layout: Layout,
                 signature: str, run: RunConfig, report: RunReport) -> None:
    import ray
    from ray.data import DataContext

    started = init_ray(run.address)
    try:
        DataContext.get_current().enable_progress_bars = run.progress_bars
        report.pool = {"executor": "ray", **pool_plan(run, opts)}
        log.info("actor pool: %s", report.pool)
        run_id = _run_id()
        ds = build_dataset([{"file": i["file"], "stem": i["stem"]} for i in items], opts, info, layout.root,
                           signature, report.pool, run, run_id)
        finisher = _Finisher(layout, opts, info, signature, report, total=len(items),
                             identities={i["file"]: i["identity"] for i in items})
        _consume(ds, ResultSink(Tracker(run_id), finisher, report, PROGRESS_S))
    except KeyboardInterrupt:
        raise Interrupted(*unit_counts(layout, [i["stem"] for i in items])) from None
    finally:
        if started:
            ray.shutdown()


def _consume(ds: Any, sink: ResultSink) -> None:
    """Drive the dataset: record finished units, finish complete files, log progress."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["unit"])):
            sink.add({k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()})
        sink.finisher.poll(block=False)
        sink.log_progress()
    sink.finisher.poll(block=True)
    sink.close()


class _Finisher:
    """Finishes each complete file (a Ray task, or here when ``remote`` is false) and writes
    manifest lines as they end."""

    def __init__(self, layout: Layout, opts: SegmentOptions, info: ModelInfo, signature: str,
                 report: RunReport, total: int, identities: dict[str, dict[str, Any]], remote: bool = True) -> None:
        if remote:
            import ray

            self.remote = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(finalize_file)
        else:
            self.remote = None
        self.layout, self.opts, self.info, self.signature = layout, opts, info, signature
        self.manifest, self.report, self.total = Manifest(layout.manifest), report, total
        self.pending: dict[Any, FileState] = {}
        self.identities = identities  # input -> layout.input_identity, recorded in the manifest

    def file_changed(self, fs: FileState) -> None:
        if fs.error:
            self._failed(fs, fs.error)
            return
        span = time.perf_counter() - fs.started  # first to last finished unit seen in this run
        args = (fs.complete, self.opts.model_dump(mode="json"), self.info.model_dump(mode="json"),
                str(self.layout.root), span)
        if self.remote is not None:
            self.pending[self.remote.remote(*args)] = fs
            return
        try:
            summary = finalize_file(*args)
        except Exception as err:  # a failed finish fails this file only (logged with its traceback)
            log.exception("finishing %s failed", fs.file)
            self._failed(fs, f"{fs.file}: finishing failed: {type(err).__name__}: {err}")
            return
        self._done(fs, summary)

    def poll(self, block: bool) -> None:
        import ray

        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            fs = self.pending.pop(ready[0])
            try:
                summary = ray.get(ready[0])
            except Exception as err:  # a failed finish fails this file only
                self._failed(fs, f"{fs.file}: finishing failed: {err}")
                continue
            self._done(fs, summary)

    def _count(self) -> str:
        return f"[{len(self.report.done) + len(self.report.failed)}/{self.total}]"

    def _done(self, fs: FileState, summary: dict[str, Any]) -> None:
        self.report.done.append(fs.file)
        self.report.summaries[fs.file] = summary
        self.manifest.append({"input": fs.file, "stem": fs.stem, "status": "done", "signature": self.signature,
                              "identity": self.identities.get(fs.file, {}), "outputs": summary["outputs"]})
        for warning in summary.get("warnings", []):  # planning ran on a worker: repeat them here
            log.warning("%s", warning)
        top = sorted(summary["area_fractions"].items(), key=lambda kv: -kv[1])[:4]
        t = summary["timings"]
        log.info("%s done %s: %d windows this run; worker s read %.1f predict %.1f write %.1f; finish %.1f s; %s",
                 self._count(), fs.stem, fs.windows, t["read_s"], t["predict_s"], t["write_s"], t["finalize_s"],
                 ", ".join(f"{k} {100 * v:.1f}%" for k, v in top))

    def _failed(self, fs: FileState, error: str) -> None:
        self.report.failed[fs.file] = error
        self.manifest.append({"input": fs.file, "stem": fs.stem, "status": "failed", "signature": self.signature,
                              "identity": self.identities.get(fs.file, {}), "error": error})
        log.error("%s FAILED %s: %s", self._count(), fs.stem, error)
