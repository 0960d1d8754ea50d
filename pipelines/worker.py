"""The Ray Data actor: load the model once, then for each work unit read its band of pixels,
normalise, predict window batches and write each window's write region straight into the
output zarr. Only a small row per unit goes back (class counts, timings, memory), never pixels.

Writes are idempotent: a unit always writes the same whole chunks with the same bytes, so a
unit retried after a worker or node died simply overwrites them.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import omezarr
from pipelines.options import ModelInfo, SegmentOptions
from pipelines.plan import ImagePlan, to_model_channels
from pipelines.predictor import PostProcessor, Products, build_predictor
from segcore.data.normalize import NormStats, apply_norm
from segcore.readers import ImageSource, open_source
from segcore.readers.scaled import scaled, upsample_write
from segcore.tiling import (
    Window,
    region_in,
    shape_batches,
    strip_groups,
    union_read,
    window_at,
    window_from_block,
)

log = logging.getLogger(__name__)

RESULT_KEYS = ("file", "stem", "key", "state", "status", "unit", "n_units", "n_images", "error",
               "n_windows", "counts", "nodata", "t_read", "t_predict", "t_write", "pid", "node", "rss_mb")


class _Cache(OrderedDict):
    """A tiny LRU that closes what it evicts."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            _, old = self.popitem(last=False)
            if hasattr(old, "close"):
                old.close()
        return value


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TileSegmenter:
    """Callable class for ``Dataset.map_batches``: one model per actor, many units per call. The
    in-process executor (:mod:`pipelines.local`) calls :meth:`segment_row` from ``lanes`` threads."""

    def __init__(self, opts: dict[str, Any], info: dict[str, Any], threads: int | None = None,
                 lanes: int = 1) -> None:
        import torch

        from segcore.modelio.ref import load_model

        if threads:
            torch.set_num_threads(threads)
        self.opts = SegmentOptions(**opts)
        self.info = ModelInfo(**info)
        self.loaded = load_model(self.opts.model, device=self.opts.device, tracking_uri=self.opts.tracking_uri)
        self.predict = build_predictor(self.loaded, self.opts, self.info.stride)
        only = self.info.class_index(self.opts.only_class) if self.opts.only_class else None
        self.post = PostProcessor.for_run(self.loaded, self.opts, only)
        # forward passes at a time: one on a GPU (its memory) or per actor; ``lanes`` in one process
        self._model_lock = threading.BoundedSemaphore(1 if self.loaded.device.type == "cuda" else lanes)
        self._cache_lock = threading.Lock()
        self._plans: _Cache = _Cache(1024)
        self._sources: _Cache = _Cache(8)
        self._arrays: _Cache = _Cache(16)
        self.node = os.uname().nodename
        log.info("worker %d loaded %s on %s", os.getpid(), self.opts.model, self.loaded.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["unit"])
        results = [self.segment_row({k: _scalar(v[i]) for k, v in batch.items()}) for i in range(n)]
        return {k: np.array([r[k] for r in results]) for k in RESULT_KEYS}

    def segment_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """One unit row -> its result row (:data:`RESULT_KEYS`); a failure fails the unit, not the call."""
        out = {k: row.get(k, "") for k in ("file", "stem", "key", "state", "status", "error")}
        out.update(unit=int(row["unit"]), n_units=int(row["n_units"]), n_images=int(row["n_images"]),
                   n_windows=0, counts="[]", nodata=0, t_read=0.0, t_predict=0.0, t_write=0.0)
        if row["status"] == "work":
            try:
                out.update(self._segment_unit(row))
            except Exception as err:  # one bad unit fails its image, never the job
                log.exception("unit %s of %s failed", row["unit"], row["key"])
                out.update(status="failed", error=str(err) if str(row["file"]) in str(err)
                           else f"{row['file']}: {type(err).__name__}: {err}")
        out.update(pid=os.getpid(), node=self.node, rss_mb=peak_rss_mb())
        return out

    def _context(self, state: str) -> tuple[ImagePlan, ImageSource, dict[str, Any]]:
        with self._cache_lock:
            plan = self._plans.get(state) or self._plans.put(state, ImagePlan.load(state))
            source = self._sources.get(state) or self._sources.put(
                state, scaled(open_source(plan.file, plan.index), plan.scale))
            arrays = self._arrays.get(state) or self._arrays.put(state, omezarr.open_arrays(Path(plan.group)))
        return plan, source, arrays

    def _segment_unit(self, row: dict[str, Any]) -> dict[str, Any]:
        plan, source, arrays = self._context(str(row["state"]))
        windows = [window_at(plan.shape, plan.tile, plan.halo, int(row["row"]), j)
                   for j in range(int(row["col0"]), int(row["col1"]))]
        t0 = time.perf_counter()
        rows, cols = union_read(windows)
        block, nodata = read_normalised(source, rows, cols, plan, self.info.in_channels)
        t_read, t_predict, t_write = time.perf_counter() - t0, 0.0, 0.0
        counts, n_nodata, origin = np.zeros(self.post.n_values, dtype=np.int64), 0, (rows.start, cols.start)
        for chunk in self._calls(windows):
            with self._model_lock:  # time the forward pass only, not the wait for the other call
                t0 = time.perf_counter()
                products = [self.post(p, _window_mask(nodata, origin, w))
                            for w, p in zip(chunk, self._predict_call(block, origin, chunk), strict=True)]
                t1 = time.perf_counter()
            for w, prod in zip(chunk, products, strict=True):
                self._write(arrays, w, prod, plan)
                counts, n_nodata = counts + prod.counts, n_nodata + prod.nodata
            t_predict, t_write = t_predict + t1 - t0, t_write + time.perf_counter() - t1
        return {"n_windows": len(windows), "counts": json.dumps(counts.tolist()), "nodata": n_nodata,
                "t_read": t_read, "t_predict": t_predict, "t_write": t_write}

    def _calls(self, windows: list[Window]) -> Any:
        """The unit's windows grouped into model calls: strips within the call's pixel budget
        (:func:`segcore.tiling.strip_groups`), or, for blended sub-tiles, batches of one shape."""
        if self.opts.blend_tile:  # the sub-tile grid follows each window: keep windows apart
            return shape_batches(windows, self.opts.batch_size)  # border windows are smaller
        return strip_groups(windows, self.opts.max_call_px(), self.info.stride)

    def _predict_call(self, block: np.ndarray, origin: tuple[int, int], chunk: list[Window]) -> list[Any]:
        """Each window's write-region probabilities from one model call over ``chunk``."""
        if self.opts.blend_tile:
            proba = self.predict(np.stack([window_from_block(block, origin, w) for w in chunk]))
            return [p[(slice(None), *w.crop)] for w, p in zip(chunk, proba, strict=True)]
        region = union_read(chunk)
        strip = self.predict(region_in(block, origin, region)[None])[0]
        return [region_in(strip, (region[0].start, region[1].start), w.write) for w in chunk]

    @staticmethod
    def _write(arrays: dict[str, Any], window: Window, prod: Products, plan: ImagePlan) -> None:
        """Write one window's products (labels last, so a unit is done when its labels are), on the
        input's grid when the model works at a whole-number scale (nearest, chunk-aligned)."""
        def up(values: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray]:
            return upsample_write(window.write, values, plan.out_scale, plan.shape, plan.out_shape)

        if prod.proba is not None and omezarr.PROBABILITIES in arrays:
            where, values = up(prod.proba)
            arrays[omezarr.PROBABILITIES][(slice(None), *where)] = values
        if prod.entropy is not None and omezarr.UNCERTAINTY in arrays:
            where, values = up(prod.entropy)
            arrays[omezarr.UNCERTAINTY][where] = values
        where, values = up(prod.labels)
        arrays[omezarr.LEVEL0][where] = values


def read_normalised(source: ImageSource, rows: slice, cols: slice, plan: ImagePlan,
                    in_channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Model-ready (C, h, w) float32 pixels of a region, and its no-data mask (NaN/inf in any
    channel; None when there is none). No-data pixels are fed to the model as 0 and labelled
    :data:`pipelines.predictor.NODATA` afterwards."""
    block = to_model_channels(source.read(rows, cols), plan.channels, in_channels)
    nodata = None
    if np.issubdtype(block.dtype, np.floating):
        bad = ~np.isfinite(block).all(axis=0)
        if bad.any():
            nodata = bad
    block = apply_norm(block, NormStats(plan.norm_offset, plan.norm_scale))
    if nodata is not None:
        block[:, nodata] = 0.0
    return block, nodata


def _window_mask(nodata: np.ndarray | None, origin: tuple[int, int], window: Window) -> np.ndarray | None:
    """The part of a block's no-data mask under ``window``'s write region."""
    return None if nodata is None else region_in(nodata, origin, window.write)


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
