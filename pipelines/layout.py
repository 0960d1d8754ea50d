"""Where things go under ``--output``: per-input products, hidden resume state, the manifest.

::

    OUT/manifest.jsonl            one line per input and attempt: done | failed (+ error); last line wins
    OUT/<stem>.zarr               OME-Zarr label image (FITS: a group with one OME-Zarr image per HDU)
    OUT/<stem>.png                colour preview with legend (FITS: one panel per HDU)
    OUT/<stem>.json               summary: shape, classes, pixel counts, fractions, model, timings
    OUT/<stem>.labels.fits        FITS only: one label HDU per input image HDU
    OUT/<stem>.clusters.{fits,csv}  FITS only: connected components of class "cluster"
    OUT/.gigaseg/<stem>/<image>/  plan.json (stats, signature) + done.jsonl (finished work units)
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.lock import LOCK_NAME, TAKEOVER_NAME
from segcore.errors import ConfigError
from segcore.readers import reader_name, safe_name

log = logging.getLogger(__name__)

STATE_DIR = ".gigaseg"
MANIFEST = "manifest.jsonl"
SINGLE_IMAGE = "image"  # state sub-directory name for files holding one image


@dataclass(frozen=True)
class Layout:
    """Output paths for one ``--output`` directory."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def product(self, stem: str, suffix: str) -> Path:
        return self.root / f"{stem}{suffix}"

    def zarr_root(self, stem: str) -> Path:
        return self.product(stem, ".zarr")

    def image_group(self, stem: str, image: str) -> Path:
        """The OME-Zarr image group of one image (``image`` is "" for single-image files)."""
        return self.zarr_root(stem) / image if image else self.zarr_root(stem)

    def state(self, stem: str, image: str) -> Path:
        return self.root / STATE_DIR / stem / (image or SINGLE_IMAGE)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".fits.fz", ".fits.gz"):
        if name.lower().endswith(suffix):
            return safe_name(name[: -len(suffix)])
    return safe_name(path.stem if path.suffix else name)


RESERVED_STEMS = frozenset({LOCK_NAME, TAKEOVER_NAME})  # files of pipelines.lock next to the state folders


def _name(path: Path, suffix: bool, depth: int) -> str:
    """The stem (or the file name, suffix kept) with ``depth`` parent folders prefixed."""
    parents = [safe_name(q.name) for q in list(path.parents)[:depth]][::-1]
    return "__".join([*parents, safe_name(path.name) if suffix else _stem(path)])


def _suffix_helps(group: list[Path], suffix: dict[Path, bool]) -> bool:
    """Whether keeping the suffix may resolve this clash (a reserved name, or differing file names)."""
    if all(suffix[p] for p in group):
        return False
    return len(group) == 1 or len({safe_name(p.name).casefold() for p in group}) > 1


def assign_stems(paths: list[Path]) -> dict[Path, str]:
    """A unique, readable output name per input; deterministic for a given input list.

    The name is the file's stem; only names that clash (ignoring case, so outputs survive a
    case-insensitive filesystem) grow: first the suffix is kept when it tells them apart
    (``scan.tif``, ``scan.png``), then parent folders are prefixed until they differ
    (``a__scan``, ``b__scan``), never up to the filesystem root. Raises :class:`ConfigError`
    listing the inputs whose names cannot be made unique (``X.tif`` and ``x.tif`` in one
    folder), so the run stops before any work."""
    suffix, depth = dict.fromkeys(paths, False), dict.fromkeys(paths, 0)
    while True:
        groups: dict[str, list[Path]] = {}
        for p in paths:
            groups.setdefault(_name(p, suffix[p], depth[p]).casefold(), []).append(p)
        clashes = [ps for key, ps in groups.items() if len(ps) > 1 or key in RESERVED_STEMS]
        if not clashes:
            return {p: _name(p, suffix[p], depth[p]) for p in paths}
        for ps in clashes:
            if _suffix_helps(ps, suffix):
                suffix.update(dict.fromkeys(ps, True))
                continue
            stuck = [p for p in ps if depth[p] + 1 >= len(p.parents)]
            if stuck:
                raise ConfigError(
                    "--input: these inputs would write to the same output name "
                    f"({', '.join(sorted(str(p) for p in ps))}). Rename one of them, or segment them "
                    "into different --output folders")
            depth.update({p: depth[p] + 1 for p in ps})


IDENTITY_BYTES = 64 << 10  # bytes hashed at the start of each input


def _zarr_metadata(path: Path) -> list[Path]:
    return [path / n for n in ("zarr.json", ".zarray", ".zgroup", ".zattrs") if (path / n).is_file()]


def input_identity(path: str | Path) -> dict[str, Any]:
    """What ties an output to one input: resolved path, size, mtime and the SHA-256 of the first
    64 KiB (a zarr directory: of its top-level metadata). Recorded in each plan and manifest line,
    so a reused output folder is never mistaken for the labels of another file of the same name."""
    path = Path(path).resolve()
    files = _zarr_metadata(path) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            digest.update(fh.read(IDENTITY_BYTES))
    st = path.stat()
    return {"path": str(path), "size": sum(f.stat().st_size for f in files), "mtime_ns": st.st_mtime_ns,
            "head_sha256": digest.hexdigest()}


def _inside_zarr(path: Path) -> bool:
    return any(parent.suffix.lower() == ".zarr" for parent in path.parents)


def expand_inputs(patterns: list[str], exclude: Path | None = None) -> list[Path]:
    """Files (and ``.zarr`` directories) matched by ``patterns`` (``**`` recurses; a plain
    directory means everything below it), sorted, without duplicates, unsupported suffixes,
    zarr internals, or anything under ``exclude``."""
    found: set[Path] = set()
    excluded = exclude.resolve() if exclude else None
    for pattern in patterns:
        if Path(pattern).is_dir() and Path(pattern).suffix.lower() != ".zarr":
            pattern = os.path.join(pattern, "**", "*")
        matches = glob.glob(os.path.expanduser(pattern), recursive=True) or (
            [pattern] if Path(pattern).exists() else []
        )
        if not matches:
            log.warning("--input %s matches no file", pattern)
        for m in matches:
            path = Path(m).resolve()
            if excluded and (path == excluded or excluded in path.parents):
                continue
            if _inside_zarr(path) or (path.is_dir() and path.suffix.lower() != ".zarr"):
                continue
            if reader_name(path) is None:
                log.warning("skipping %s: not an image type gigaseg reads", path)
                continue
            found.add(path)
    return sorted(found)


class Manifest:
    """``manifest.jsonl``: appended by the driver only (one writer); the last line per input wins."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return entries
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
                entries[entry["input"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s:%d: unreadable manifest line ignored (a killed run may leave half a line)",
                            self.path, n)
        return entries

    def append(self, entry: dict[str, Any]) -> None:
        entry = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a killed run left half a line: end it
                    f.write(b"\n")
            f.write((json.dumps(entry) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
