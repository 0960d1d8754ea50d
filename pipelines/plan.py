"""Planning: one input file -> per-image plans -> the work units still to do.

A *work unit* is a fixed run of windows in one row of the window grid: ``batch_size``
windows on files with fast random access, a whole row (one band read) on striped TIFFs and
row-compressed FITS. Units are fixed by the plan, so a resumed run predicts exactly the same
batches as an uninterrupted one (byte-identical output).

``plan_batch`` is the Ray Data planning stage (``map_batches``, one file per call; it fuses
with the repartition into one-unit blocks, so both run under one small CPU request): it opens the file, computes normalisation
statistics from a strided sample (once per image; reused on resume), creates the output
store, and emits one small row per unit still to do (paths and grid indices, never pixels).
A file that cannot be planned yields a single ``failed`` row.

Resume is bound to the input: ``plan.json`` records the file's identity (resolved path, size,
mtime, SHA-256 of its first 64 KiB). A saved plan is resumed only for that very file; outputs
that hold another file's labels (or an earlier version's) are refused with ``OutputError`` for
that input, never re-planned over silently; ``--overwrite`` removes them first.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import omezarr
from pipelines.layout import Layout, input_identity
from pipelines.options import ModelInfo, SegmentOptions
from segcore.data.errors import DataError
from segcore.data.normalize import apply_norm, compute_norm_stats, range_warning
from segcore.errors import OutputError, UserError
from segcore.readers import ImageSource, open_sources
from segcore.readers.scaled import output_factor, scaled
from segcore.tiling import balanced_tile, grid_shape, round_up, strip_cols

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
DONE_GLOB = "done.*.jsonl"  # one file per run: done.<run id>.jsonl


def done_file(state: str | Path, run_id: str) -> Path:
    """Where the driver of run ``run_id`` records the units it saw finish."""
    return Path(state) / f"done.{run_id}.jsonl"


@dataclass
class ImagePlan:
    """Everything a worker needs to segment one image; saved as ``plan.json``."""

    key: str  # "<stem>" or "<stem>/<HDU>"
    file: str
    stem: str
    index: int  # FITS HDU index, -1 otherwise
    name: str  # HDU name, "" otherwise
    shape: tuple[int, int]
    channels: int
    dtype: str
    tile: int
    halo: int
    unit_cols: int  # windows per unit (a whole row when slow)
    norm_offset: float
    norm_scale: float
    group: str  # OME-Zarr image group
    state: str  # state directory
    signature: str
    slow: bool = False
    warnings: list[str] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)  # layout.input_identity of the file segmented
    scale: float = 1.0  # image px per model px: shape, tile and halo are model px (segcore.readers.scaled)
    out_scale: int = 1  # labels are written at model px x out_scale (the input's grid when scale is whole)
    input_shape: tuple[int, int] | None = None  # the input's own size (None: shape)
    settings: dict[str, Any] = field(default_factory=dict)  # SegmentOptions.signed: what the signature covers

    @property
    def out_shape(self) -> tuple[int, int]:
        """Shape of the label arrays: the input's grid, or the model grid (``out_scale`` 1)."""
        return tuple(self.input_shape or self.shape) if self.out_scale > 1 else tuple(self.shape)

    @property
    def units(self) -> list[tuple[int, int, int]]:
        """(grid row, first col, end col) of every unit, in row-band order."""
        rows, cols = grid_shape(self.shape, self.tile)
        return [(i, j, min(j + self.unit_cols, cols)) for i in range(rows) for j in range(0, cols, self.unit_cols)]

    def save(self) -> None:
        Path(self.state).mkdir(parents=True, exist_ok=True)
        tmp = Path(self.state) / (PLAN_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(Path(self.state) / PLAN_FILE)

    @classmethod
    def load(cls, state: str | Path) -> ImagePlan:
        data = json.loads((Path(state) / PLAN_FILE).read_text())
        data["shape"] = tuple(data["shape"])
        return cls(**data)


def done_units(state: str | Path, exclude_run: str | None = None) -> dict[int, dict[str, Any]]:
    """Units recorded as finished (one JSON line each, written by a driver after the worker's
    writes returned), over all runs except ``exclude_run``; torn lines of a killed driver are
    ignored. Planning excludes the current run, so a planning task re-executed mid-run (Ray
    lineage reconstruction after a node loss) emits exactly the rows it emitted the first time."""
    done: dict[int, dict[str, Any]] = {}
    skip = done_file(state, exclude_run).name if exclude_run else None
    for path in sorted(Path(state).glob(DONE_GLOB)):
        if path.name == skip:
            continue
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[int(row["unit"])] = row
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return done


def to_model_channels(block: np.ndarray, channels: int, in_channels: int) -> np.ndarray:
    """(h, w) or (h, w, C) pixels -> (in_channels, h, w); RGB(A) becomes grey for 1-channel models."""
    if block.ndim == 2:
        return block[None]
    if in_channels == 1 and channels in (3, 4):
        return block[..., :3].mean(axis=-1, dtype=np.float32)[None]
    return np.moveaxis(block, -1, 0)


def check_channels(source: ImageSource, in_channels: int) -> str | None:
    """None if the image fits the model, a warning for RGB -> grey; DataError otherwise."""
    if source.channels == in_channels:
        return None
    if in_channels == 1 and source.channels in (3, 4):
        return f"{source.label}: {source.channels}-channel image averaged to grey for a 1-channel model"
    raise DataError(source.label, f"has {source.channels} channels but the model takes {in_channels}",
                    "convert the image or use a model trained on this many channels")


def image_tile(shape: tuple[int, int], opts: SegmentOptions, stride: int) -> int:
    """The tile of one image: ``opts.tile``, or, when the whole image fits one model call
    (``call_px``, set with a chosen tile), one window the size of the image: no halo at all
    (x1.0, exact), where a 3000² scan at tile 2784 and halo 224 would evaluate x1.15 in strips.
    A chosen tile (``balance_tile``) shrinks to the smallest that gives the image as many windows
    (:func:`segcore.tiling.balanced_tile`): a 4096² scan at tile 2400 gets 2048, the same x1.20
    forward px in four windows of 5.0 MP instead of 6.7 to 3.6 MP."""
    if opts.call_px is None or opts.blend_tile:
        return opts.tile
    fits_one_call = round_up(shape[0], stride) * round_up(shape[1], stride) <= opts.call_px
    if max(shape) > opts.tile and fits_one_call:
        return round_up(max(shape), stride)
    # a chosen tile shrinks to the image's grid; for a one-window image that also makes its output one
    # small chunk (a 512² HDU's labels: one zstd chunk of 512² instead of 1984², 44 -> 10 ms to write)
    return balanced_tile(shape, opts.tile, stride) if opts.balance_tile else opts.tile


def _unit_cols(shape: tuple[int, int], opts: SegmentOptions, tile: int, stride: int) -> int:
    """Windows per work unit: ``batch_size``, or, with a tile chosen for the memory budget
    (``call_px``), as many as fit one strip (:func:`segcore.tiling.strip_cols`): a 4096² scan at
    tile 2784 becomes two whole-row units of one forward pass each. Blended sub-tiles keep batches."""
    if opts.blend_tile or opts.call_px is None:
        return opts.batch_size
    return max(opts.batch_size, strip_cols(shape, tile, opts.halo, opts.call_px, stride))


def _new_plan(source: ImageSource, key: str, stem: str, opts: SegmentOptions, info: ModelInfo,
              layout: Layout, signature: str) -> ImagePlan:
    warnings = [w for w in [check_channels(source, info.in_channels)] if w]
    sample = source.sample()
    if source.channels > 1:
        sample = to_model_channels(sample[:, None, :], source.channels, info.in_channels)
    stats = compute_norm_stats(sample.astype(source.dtype, copy=False), info.normalize, source.header,
                               source=source.label)
    warnings += [w for w in [range_warning(apply_norm(sample, stats), info.input_range, source.label)] if w]
    tile = image_tile(source.shape, opts, info.stride)
    cols = grid_shape(source.shape, tile)[1]
    if source.slow_random_access and source.shape[0] > tile + 2 * opts.halo:  # more than one band
        warnings.append(f"{source.label}: striped/row-compressed storage has slow random access; "
                        f"reading it band by band (one band of {tile + 2 * opts.halo} rows per row of windows)")
    return ImagePlan(
        key=key, file=str(source.path), stem=stem, index=source.index, name=source.name,
        shape=source.shape, channels=source.channels, dtype=str(source.dtype), tile=tile, halo=opts.halo,
        unit_cols=cols if source.slow_random_access else _unit_cols(source.shape, opts, tile, info.stride),
        norm_offset=stats.offset, norm_scale=stats.scale,
        group=str(layout.image_group(stem, source.name)), state=str(layout.state(stem, source.name)),
        signature=signature, slow=source.slow_random_access, warnings=warnings,
        scale=info.scale, out_scale=output_factor(info.scale) if opts.labels_at == "input" else 1, input_shape=getattr(source, "base", source).shape,
    )


OWNER_FIX = "pass --overwrite to replace them, or use another --output"


def owner_problem(old_file: str, old_identity: dict[str, Any], identity: dict[str, Any],
                  product: Path) -> str:
    """Why the outputs at ``product`` (written for ``old_file``) are not this input's, or ""."""
    if old_file != identity["path"]:
        return f"{product} holds the labels of {old_file}, not {identity['path']}"
    changed = [k for k in ("size", "mtime_ns", "head_sha256") if old_identity and old_identity.get(k) != identity[k]]
    if changed:  # plans written before identities were recorded have none: their path must do
        return (f"{product} holds the labels of an earlier version of {old_file} "
                f"(changed since: {', '.join(changed)})")
    return ""


def check_owner(old_file: str, old_identity: dict[str, Any], identity: dict[str, Any], product: Path) -> None:
    """Refuse (OutputError) to resume into outputs that belong to another file or version."""
    problem = owner_problem(old_file, old_identity, identity, product)
    if problem:
        raise OutputError(f"{problem}: {OWNER_FIX}.")


def prepare_image(source: ImageSource, stem: str, opts: SegmentOptions, info: ModelInfo,
                  layout: Layout, signature: str, identity: dict[str, Any]) -> ImagePlan:
    """Reuse the saved plan and output when they are this input's (same identity) and the
    signature matches (resume); re-plan when only settings or model changed; refuse with
    :class:`OutputError` when they hold another file's labels (never overwrite them silently)."""
    state = layout.state(stem, source.name)
    key = f"{stem}/{source.name}" if source.name else stem
    if (state / PLAN_FILE).exists():
        old = ImagePlan.load(state)
        check_owner(old.file, old.identity, identity, layout.zarr_root(stem))
        if old.signature == signature and Path(old.group, omezarr.LEVEL0).exists():
            omezarr.remove_partial_files(Path(old.group))
            return old
        log.info("%s: %s changed since the last run; segmenting it again", key,
                 changed_settings(old.settings, opts.signed(info.digest)))
    shutil.rmtree(state, ignore_errors=True)
    plan = _new_plan(source, key, stem, opts, info, layout, signature)
    plan.identity, plan.settings = identity, opts.signed(info.digest)
    for warning in plan.warnings:
        log.warning("%s", warning)
    omezarr.create_image_group(Path(plan.group), plan.out_shape, plan.tile * plan.out_scale, len(info.class_names),
                               opts.probabilities, opts.uncertainty)
    plan.save()
    return plan


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"tile 64 -> 128, model_digest ..."``: the signed settings that differ (for the re-plan log)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not old or not keys:
        return "settings or model"
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def unit_rows(plan: ImagePlan, n_images: int, run_id: str) -> list[dict[str, Any]]:
    """Rows for the units not yet done (one ``noop`` row if all are, so the driver finishes it).
    ``n_units`` is the image's total: the driver counts distinct finished units against it, so a
    retried planning task that emits fewer (or repeated) rows cannot confuse it."""
    done = done_units(plan.state, exclude_run=run_id)
    todo = [(u, rc) for u, rc in enumerate(plan.units) if u not in done]
    base = {"file": plan.file, "stem": plan.stem, "key": plan.key, "state": plan.state, "n_images": n_images,
            "n_units": len(plan.units), "error": ""}
    if not todo:
        return [{**base, "status": "noop", "unit": -1, "row": -1, "col0": -1, "col1": -1}]
    return [{**base, "status": "work", "unit": u, "row": r, "col0": c0, "col1": c1} for u, (r, c0, c1) in todo]


def failed_row(file: str, stem: str, error: str) -> dict[str, Any]:
    return {"file": file, "stem": stem, "key": stem, "state": "", "n_images": 1, "n_units": 1, "error": error,
            "status": "failed", "unit": -1, "row": -1, "col0": -1, "col1": -1}


def plan_file(row: dict[str, Any], opts: dict[str, Any], info: dict[str, Any], out: str,
              signature: str, run_id: str) -> list[dict[str, Any]]:
    """One input row ``{file, stem}`` -> unit rows (or one failed row)."""
    file, stem = str(row["file"]), str(row["stem"])
    layout, options, model = Layout(Path(out)), SegmentOptions(**opts), ModelInfo(**info)
    sources: list[ImageSource] = []
    try:
        identity = input_identity(file)
        sources = [scaled(s, model.scale) for s in open_sources(file)]
        plans = [prepare_image(s, stem, options, model, layout, signature, identity) for s in sources]
        if sources[0].index >= 0:
            omezarr.ensure_root_group(layout.zarr_root(stem), [p.name for p in plans])
        rows = [r for p in plans for r in unit_rows(p, len(plans), run_id)]
    except Exception as err:  # one bad file is recorded as failed; the job goes on
        log.error("%s", err)
        message = str(err) if isinstance(err, UserError) else f"{file}: {type(err).__name__}: {err}"
        return [failed_row(file, stem, message)]
    finally:
        for s in sources:
            s.close()
    return rows


def plan_batch(batch: dict[str, Any], **kwargs: Any) -> dict[str, list[Any]]:
    """``map_batches`` form of :func:`plan_file`: a batch of input rows -> columns of unit rows."""
    rows = [r for i in range(len(batch["file"]))
            for r in plan_file({"file": str(batch["file"][i]), "stem": str(batch["stem"][i])}, **kwargs)]
    return {k: [r[k] for r in rows] for k in rows[0]}
