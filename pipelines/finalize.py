"""Finishing one input file once all its work units are written: pyramid levels and pixel
counts (one chunked pass over level 0), OME-Zarr metadata, the PNG preview, the JSON
summary and, for FITS, the label FITS and the cluster catalogue. Runs as a Ray task."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipelines import omezarr
from pipelines.fitsout import cluster_rows, gigaseg_version, provenance, write_catalog, write_labels_fits
from pipelines.layout import Layout
from pipelines.options import ModelInfo, SegmentOptions
from pipelines.plan import ImagePlan, done_units
from pipelines.preview import MAX_SIDE, compose_preview, save_preview
from segcore.readers import open_source

log = logging.getLogger(__name__)

CLUSTER_CLASS = "cluster"


def value_names(opts: SegmentOptions, info: ModelInfo) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Names and colours of the values stored in level 0 (all classes, or other/class for a mask)."""
    if opts.only_class:
        color = info.class_colors[info.class_index(opts.only_class)]
        return [f"not {opts.only_class}", opts.only_class], [(0, 0, 0), color if any(color) else (255, 255, 255)]
    return list(info.class_names), list(info.class_colors)


def _image_summary(plan: ImagePlan, names: list[str], counts: np.ndarray, shapes: list[tuple[int, int]],
                   root: Path) -> dict:
    counts, nodata = counts[:-1], int(counts[-1])
    total = int(counts.sum())
    done = done_units(plan.state).values()
    return {
        "name": plan.name, "hdu": plan.index if plan.index >= 0 else None, "shape": list(plan.input_shape or plan.shape),
        "zarr": str(Path(plan.group).relative_to(root)), "levels": [list(s) for s in shapes],
        "pixel_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
        "area_fractions": {n: (float(c) / total if total else 0.0) for n, c in zip(names, counts, strict=True)},
        "nodata_pixels": nodata, "nodata_value": omezarr.NODATA,
        "normalisation": {"offset": plan.norm_offset, "scale": plan.norm_scale},
        "work_s": {k: round(sum(float(d.get(f"t_{k}", 0.0)) for d in done), 3) for k in ("read", "predict", "write")},
        "windows": sum(int(d.get("n_windows", 0)) for d in done), "warnings": plan.warnings,
    }


def _finish_image(plan: ImagePlan, opts: SegmentOptions, info: ModelInfo, root: Path) -> tuple[dict, np.ndarray]:
    names, colors = value_names(opts, info)
    group = Path(plan.group)
    omezarr.remove_partial_files(group)  # a worker killed mid-write (its unit was redone) left a temp chunk
    shapes, counts = omezarr.build_pyramid(group, plan.tile, len(names))
    omezarr.write_metadata(group, plan.name or plan.stem, len(shapes), names, colors, {
        "model": info.ref, "input": plan.file, "hdu": plan.name or None, "class_names": names,
        "tile": plan.tile, "halo": plan.halo, "version": gigaseg_version(), "model_scale": plan.scale,
        "labels_scale": plan.scale / plan.out_scale}, base_scale=plan.scale / plan.out_scale)
    return _image_summary(plan, names, counts, shapes, root), omezarr.preview_level(group, MAX_SIDE)


def _fits_products(layout: Layout, plans: list[ImagePlan], opts: SegmentOptions, info: ModelInfo,
                   names: list[str]) -> dict[str, Any]:
    cards = provenance(info.ref, info.class_names, opts.only_class)
    stem, file = plans[0].stem, plans[0].file
    images = [(p.index, p.name, np.asarray(zarr.open_array(str(Path(p.group) / omezarr.LEVEL0), mode="r")[:]))
              for p in plans]
    write_labels_fits(layout.product(stem, ".labels.fits"), file, images, cards)
    outputs: dict[str, Any] = {"labels_fits": f"{stem}.labels.fits"}
    value = 1 if opts.only_class == CLUSTER_CLASS else (
        names.index(CLUSTER_CLASS) if not opts.only_class and CLUSTER_CLASS in names else None)
    if value is None:
        log.info("%s: no class named %r, so no cluster catalogue", file, CLUSTER_CLASS)
        return outputs
    rows = []
    for plan, (_, name, labels) in zip(plans, images, strict=True):
        source = open_source(file, plan.index)
        try:
            adu = source.read(slice(0, plan.shape[0]), slice(0, plan.shape[1]))
        finally:
            source.close()
        rows += cluster_rows(name, labels, adu, value)
    write_catalog(layout.product(stem, ".clusters.fits"), layout.product(stem, ".clusters.csv"), rows, cards)
    outputs.update(clusters_fits=f"{stem}.clusters.fits", clusters_csv=f"{stem}.clusters.csv", n_clusters=len(rows))
    return outputs


def finalize_file(states: list[str], opts_json: dict, info_json: dict, out: str, span_s: float) -> dict[str, Any]:
    """Finish every image of one input file; returns its summary (also written as JSON)."""
    t0 = time.perf_counter()
    opts, info, layout = SegmentOptions(**opts_json), ModelInfo(**info_json), Layout(Path(out))
    # the input's HDU order, not the order its images finished in (the FITS labels, summary and
    # preview panels follow it: a 4-HDU demo frame had come out as AMP2, AMP1, AMP3, AMP4)
    plans = sorted((ImagePlan.load(s) for s in states), key=lambda p: p.index)
    names, colors = value_names(opts, info)
    images, panels = [], []
    for plan in plans:
        summary, level = _finish_image(plan, opts, info, layout.root)
        images.append(summary)
        panels.append((plan.name, level))
    counts = np.sum([[im["pixel_counts"][n] for n in names] for im in images], axis=0)
    nodata = sum(im["nodata_pixels"] for im in images)
    total = int(counts.sum())
    fractions = [float(c) / total if total else 0.0 for c in counts]
    stem = plans[0].stem
    save_preview(layout.product(stem, ".png"), compose_preview(panels, names, colors, fractions))
    outputs: dict[str, Any] = {"zarr": f"{stem}.zarr", "png": f"{stem}.png"}  # relative to the output directory
    if plans[0].index >= 0:
        outputs.update(_fits_products(layout, plans, opts, info, names))
    summary = _summary(plans, opts, info, names, counts, fractions, images, outputs)
    summary.update(nodata_pixels=nodata, nodata_value=omezarr.NODATA,
                   warnings=[w for im in images for w in im["warnings"]])
    if nodata:
        log.warning("%s: %d NaN/inf pixels written as no-data (label %d), not as a class; area fractions "
                    "are of the other pixels", plans[0].file, nodata, omezarr.NODATA)
    summary["timings"] = {"segment_span_s": round(span_s, 3), "finalize_s": round(time.perf_counter() - t0, 3),
                          **{f"{k}_s": round(sum(im["work_s"][k] for im in images), 3)
                             for k in ("read", "predict", "write")}}
    path = layout.product(stem, ".json")
    path.with_suffix(".json.tmp").write_text(json.dumps(summary, indent=2))
    path.with_suffix(".json.tmp").replace(path)
    return summary


def _summary(plans: list[ImagePlan], opts: SegmentOptions, info: ModelInfo, names: list[str],
             counts: np.ndarray, fractions: list[float], images: list[dict], outputs: dict) -> dict[str, Any]:
    return {
        "input": plans[0].file, "stem": plans[0].stem, "model": info.ref, "model_digest": info.digest,
        "gigaseg_version": gigaseg_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "class_names": names, "model_class_names": info.class_names, "only_class": opts.only_class,
        "shape": list(plans[0].shape) if len(plans) == 1 else [list(p.shape) for p in plans],
        "pixel_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
        "area_fractions": dict(zip(names, fractions, strict=True)),
        "settings": {"tile": opts.tile, "halo": opts.halo, "batch_size": opts.batch_size, "tta": opts.tta,
                     "blend_tile": opts.blend_tile, "probabilities": opts.probabilities,
                     "uncertainty": opts.uncertainty},
        "images": images, "outputs": outputs,
    }
