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
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.readers import reader_name, safe_name

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


def assign_stems(paths: list[Path]) -> dict[Path, str]:
    """Output stems: the file name without suffix; clashing names get parent folders prefixed
    (``a/x.tif`` and ``b/x.tif`` -> ``a__x``, ``b__x``). Deterministic for a given input list."""
    depth = {p: 0 for p in paths}

    def name(p: Path) -> str:
        parents = [safe_name(q.name) for q in list(p.parents)[: depth[p]]][::-1]
        return "__".join([*parents, _stem(p)])

    for _ in range(64):
        names: dict[str, list[Path]] = {}
        for p in paths:
            names.setdefault(name(p), []).append(p)
        clashes = [ps for ps in names.values() if len(ps) > 1]
        if not clashes:
            break
        for ps in clashes:
            for p in ps:
                depth[p] += 1
    return {p: name(p) for p in paths}


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
