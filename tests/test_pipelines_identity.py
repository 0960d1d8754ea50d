"""Output identity: a reused output folder never gives one input another input's labels, and
inputs whose names clash (same folder and stem, other suffix) each get their own outputs or a
refusal before any work. Real files, real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from pipelines_helpers import HALO, TILE, make_model, structured, write_tiled_tiff8

from pipelines.runner import RunConfig, segment_archive
from segcore.errors import ConfigError

RUN = RunConfig(progress_bars=False)


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.slow
def test_reused_folder_refuses_another_files_outputs(tmp_path: Path, ray_local: None) -> None:
    model, out = make_model(tmp_path / "model"), tmp_path / "O"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_tiled_tiff8(tmp_path / "a" / "scan.tif", (150, 200), seed=1)
    write_tiled_tiff8(tmp_path / "b" / "scan.tif", (100, 120), seed=5)
    first = segment_archive(str(model), [str(tmp_path / "a" / "scan.tif")], out, RUN, tile=TILE, halo=HALO)
    assert len(first.done) == 1

    second = segment_archive(str(model), [str(tmp_path / "b" / "scan.tif")], out, RUN, tile=TILE, halo=HALO)
    b = str((tmp_path / "b" / "scan.tif").resolve())
    assert not second.done and list(second.failed) == [b]
    message = second.failed[b]
    assert f"holds the labels of {(tmp_path / 'a' / 'scan.tif').resolve()}, not {b}" in message
    assert "--overwrite" in message
    assert zarr.open_array(str(out / "scan.zarr" / "0"), mode="r").shape == (150, 200)  # a's labels kept
    last = _manifest(out)[-1]
    assert last["input"] == b and last["status"] == "failed"

    third = segment_archive(str(model), [b], out, RunConfig(progress_bars=False, overwrite=True), tile=TILE,
                            halo=HALO)
    assert third.done == [b]
    assert zarr.open_array(str(out / "scan.zarr" / "0"), mode="r").shape == (100, 120)  # b's own labels
    last = _manifest(out)[-1]
    assert last["input"] == b and last["status"] == "done" and last["identity"]["path"] == b


@pytest.mark.ray
def test_same_stem_other_suffix_both_segmented(tmp_path: Path, ray_local: None) -> None:
    model, out = make_model(tmp_path / "model"), tmp_path / "O"
    (tmp_path / "a").mkdir()
    write_tiled_tiff8(tmp_path / "a" / "scan.tif", (150, 200), seed=1)
    Image.fromarray(structured((90, 110), 7, 255)).save(tmp_path / "a" / "scan.png")
    report = segment_archive(str(model), [str(tmp_path / "a")], out, RUN, tile=TILE, halo=HALO)
    assert len(report.done) == 2 and not report.failed
    assert zarr.open_array(str(out / "scan.tif.zarr" / "0"), mode="r").shape == (150, 200)
    assert zarr.open_array(str(out / "scan.png.zarr" / "0"), mode="r").shape == (90, 110)
    entries = {Path(e["input"]).name: e for e in _manifest(out)}
    assert {k: e["stem"] for k, e in entries.items()} == {"scan.tif": "scan.tif", "scan.png": "scan.png"}
    assert all("/" not in e["stem"] and "tmp" not in e["stem"] for e in entries.values())


def test_unresolvable_clash_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    write_tiled_tiff8(tmp_path / "a" / "Scan.tif", (64, 64))
    write_tiled_tiff8(tmp_path / "a" / "scan.tif", (64, 64))
    out = tmp_path / "O"
    with pytest.raises(ConfigError) as err:
        segment_archive(str(tmp_path / "no-model"), [str(tmp_path / "a")], out, RUN, tile=TILE, halo=HALO)
    assert "Scan.tif" in str(err.value) and "scan.tif" in str(err.value) and "Rename" in str(err.value)
    assert not (out / "manifest.jsonl").exists()


def test_changed_file_is_not_resumed(tmp_path: Path) -> None:
    """The identity check itself: another file, or the same path with other bytes, is refused."""
    from pipelines.layout import input_identity
    from pipelines.plan import owner_problem

    f = tmp_path / "scan.tif"
    f.write_bytes(np.arange(1000, dtype=np.uint8).tobytes())
    old = input_identity(f)
    assert owner_problem(old["path"], old, input_identity(f), Path("O/scan.zarr")) == ""
    f.write_bytes(np.arange(1001, dtype=np.uint8).tobytes())
    assert "earlier version" in owner_problem(old["path"], old, input_identity(f), Path("O/scan.zarr"))
    assert "not /x/b/scan.tif" in owner_problem(old["path"], old, {**old, "path": "/x/b/scan.tif"}, Path("O"))
