"""Score what ``gigaseg segment`` wrote against a labelled dataset folder (benches and tests).

Labels are read back from ``OUT/<stem>.zarr/0`` (``OUT/<stem>.zarr/<HDU>/0`` for a multi-HDU FITS
file), i.e. exactly what a user gets, and compared with the folder's masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def score_outputs(out_dir: str | Path, data_dir: str | Path) -> dict:
    """``{"miou": ..., "iou": {class: ...}}`` of the labels under ``out_dir`` against ``data_dir``'s masks."""
    import zarr

    from segcore.data import load_samples, load_spec
    from segcore.metrics import ConfusionMatrix

    out_dir = Path(out_dir)
    spec = load_spec(data_dir)
    cm = ConfusionMatrix(len(spec.class_names))
    for s in load_samples(data_dir, spec):
        stem = Path(s.source).stem
        part = s.name[len(stem) + 1:] if s.name != stem else ""
        pred = np.asarray(zarr.open(str(out_dir / f"{stem}.zarr" / part / "0") if part
                                    else str(out_dir / f"{stem}.zarr/0"), mode="r")[...])
        cm.update(pred, s.mask)
    res = cm.compute()
    return {"miou": float(res["miou"]), "iou": dict(zip(spec.class_names, map(float, res["iou"]), strict=True))}
