"""FITS products for FITS inputs: ``<stem>.labels.fits`` (one integer HDU per input image HDU,
same EXTNAME, input header + provenance) and the cluster catalogue (FITS table + CSV).

Clusters are labelled one HDU at a time (``scipy.ndimage.label``, 8-connected): the HDU's
labels and ADU are held in memory, which is fine for CCD amplifiers (~4k x 4k); chunked
labelling of much larger HDUs is not implemented.
"""

from __future__ import annotations

import csv
import re
import time
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from scipy import ndimage

BACKGROUND_MARGIN = 3  # pixels around a cluster's bbox used for its local background
_STRUCTURAL = re.compile(
    r"^(SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|BZERO|BSCALE|BLANK|CHECKSUM|DATASUM|"
    r"ZIMAGE|ZBITPIX|ZNAXIS\d*|ZTILE\d+|ZCMPTYPE|ZNAME\d+|ZVAL\d+|ZQUANTIZ|ZDITHER0|ZSIMPLE|ZEXTEND|"
    r"ZTENSION|ZPCOUNT|ZGCOUNT|ZHECKSUM|ZDATASUM|ZBLANK|ZSCALE|ZZERO|ZMASKCMP|"
    r"TFIELDS|TTYPE\d+|TFORM\d+|TUNIT\d+|EXTNAME)$")
CATALOG_COLUMNS = ["hdu", "id", "x", "y", "x_weighted", "y_weighted", "npix", "adu_sum", "background",
                   "y0", "y1", "x0", "x1"]


@cache
def gigaseg_version() -> str:
    """The installed gigaseg version (looked up once: each lookup scans the installed packages)."""
    try:
        return version("gigaseg")
    except PackageNotFoundError:
        return "unknown"


def provenance(model_ref: str, class_names: list[str], only_class: str | None) -> list[tuple[str, Any, str]]:
    cards: list[tuple[str, Any, str]] = [
        ("GSMODEL", model_ref, "gigaseg model reference"),
        ("GSDATE", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "UTC time of segmentation"),
        ("GSVERS", gigaseg_version(), "gigaseg version"),
    ]
    if only_class:
        cards.append(("GSONLY", only_class, "mask of this class only (1 = class)"))
    else:
        cards += [(f"GSCLS{i}", n, f"label value {i}") for i, n in enumerate(class_names)]
    return [(key, value, _fitting_comment(value, comment)) for key, value, comment in cards]


def _fitting_comment(value: Any, comment: str) -> str:
    """``comment``, or "" where a string value leaves it no room on its 80-char card (astropy would
    warn and cut it); values too long for one card continue on CONTINUE cards, which keep it."""
    if isinstance(value, str) and len(value) <= 68 and len(value) + len(comment) > 65:
        return ""
    return comment


def _copy_header(src: fits.Header, cards: list[tuple[str, Any, str]]) -> fits.Header:
    out = fits.Header()
    for card in src.cards:
        if not _STRUCTURAL.match(card.keyword or ""):
            out.append(card, end=True)
    for key, value, comment in cards:
        out[key] = (value, comment)
    out["BUNIT"] = ("class", "label values, see GSCLSn")
    return out


def write_labels_fits(path: Path, source_file: str, images: list[tuple[int, str, np.ndarray]],
                      cards: list[tuple[str, Any, str]]) -> None:
    """``images``: (input HDU index, EXTNAME, uint8 labels) for every segmented HDU."""
    with fits.open(source_file, memmap=True, do_not_scale_image_data=True) as src:
        hdus: list[Any] = [fits.PrimaryHDU(header=_copy_header(src[0].header, cards))]
        for index, name, labels in images:
            header = _copy_header(src[index].header, cards)
            hdus.append(fits.ImageHDU(data=labels, header=header, name=name))
        tmp = path.with_suffix(".fits.tmp")
        fits.HDUList(hdus).writeto(tmp, overwrite=True, output_verify="silentfix")
    tmp.replace(path)


def cluster_rows(hdu: str, labels: np.ndarray, adu: np.ndarray, value: int) -> list[dict[str, Any]]:
    """One row per 8-connected component of ``labels == value``: centroids (0-based x, y; plain
    and weighted by ADU above background), pixel count, summed ADU above the local background
    (median of the non-cluster pixels in a margin around the bbox) and the half-open bbox."""
    mask = labels == value
    comp, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    rows = []
    for i, sl in enumerate(ndimage.find_objects(comp), 1):
        if sl is None:
            continue
        grown = tuple(slice(max(s.start - BACKGROUND_MARGIN, 0), s.stop + BACKGROUND_MARGIN) for s in sl)
        region, here, others = adu[grown].astype(np.float64), comp[grown] == i, mask[grown]
        ring = region[~others]
        background = float(np.median(ring)) if ring.size else 0.0
        yy, xx = np.nonzero(here)
        signal = region[here] - background
        weight = np.clip(signal, 0, None)
        wsum = weight.sum()
        y, x = yy + grown[0].start, xx + grown[1].start
        rows.append({
            "hdu": hdu, "id": i, "x": float(x.mean()), "y": float(y.mean()),
            "x_weighted": float((x * weight).sum() / wsum) if wsum > 0 else float(x.mean()),
            "y_weighted": float((y * weight).sum() / wsum) if wsum > 0 else float(y.mean()),
            "npix": int(here.sum()), "adu_sum": float(signal.sum()), "background": background,
            "y0": sl[0].start, "y1": sl[0].stop, "x0": sl[1].start, "x1": sl[1].stop,
        })
    return rows


def write_catalog(fits_path: Path, csv_path: Path, rows: list[dict[str, Any]],
                  cards: list[tuple[str, Any, str]]) -> None:
    """The catalogue as a FITS binary table (EXTNAME CLUSTERS) and as CSV."""
    cols = []
    for name in CATALOG_COLUMNS:
        values = [r[name] for r in rows]
        if name == "hdu":
            width = max([len(v) for v in values] + [1])
            cols.append(fits.Column(name=name, format=f"{width}A", array=np.array(values, dtype=f"U{width}")))
        elif name in ("id", "npix", "y0", "y1", "x0", "x1"):
            cols.append(fits.Column(name=name, format="K", array=np.array(values, dtype=np.int64)))
        else:
            cols.append(fits.Column(name=name, format="D", array=np.array(values, dtype=np.float64)))
    table = fits.BinTableHDU.from_columns(cols, name="CLUSTERS")
    for key, value, comment in cards:
        table.header[key] = (value, comment)
    tmp = fits_path.with_suffix(".fits.tmp")
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(tmp, overwrite=True)
    tmp.replace(fits_path)
    tmp_csv = csv_path.with_suffix(".csv.tmp")
    with tmp_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CATALOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp_csv.replace(csv_path)
