"""Headers checked against the file: a TIFF whose size tags were patched to 200000 px and a
92-byte PNG declaring 12000 x 12000 px each become one failed manifest row, found at planning
in well under a second, while a good file of the same run is segmented; the run exits 1."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import pytest
import tifffile
import zarr
from pipelines_helpers import HALO, TILE, make_model, write_tiled_tiff8

from pipelines.segment import main
from segcore.data.errors import DataError
from segcore.readers import open_sources


def write_lying_tiff(path: Path) -> None:
    """A small tiled TIFF whose ImageWidth/ImageLength tags were edited to 200000."""
    write_tiled_tiff8(path, (150, 200))
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        for code in (256, 257):
            tag = tif.pages[0].tags[code]
            struct.pack_into({3: "<H", 4: "<I", 16: "<Q"}[int(tag.dtype)], data, tag.valueoffset, 200000)
    path.write_bytes(bytes(data))


def write_short_png(path: Path, edge: int = 12000) -> None:
    """A PNG whose header declares ``edge`` x ``edge`` px but whose data stops after a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", edge, edge, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
                     + chunk(b"IEND", b""))


def _plan_seconds(path: Path) -> float:
    """Time until the reader (open + normalisation sample, as planning does) refuses the file."""
    t0 = time.perf_counter()
    with pytest.raises(DataError):
        for source in open_sources(path):
            source.sample()
    return time.perf_counter() - t0


def test_lying_headers_fail_fast_at_planning(tmp_path: Path) -> None:
    write_lying_tiff(tmp_path / "lying.tif")
    write_short_png(tmp_path / "short.png")
    assert len((tmp_path / "short.png").read_bytes()) < 100
    assert _plan_seconds(tmp_path / "lying.tif") < 1.0
    assert _plan_seconds(tmp_path / "short.png") < 1.0
    tif = tmp_path / "cut.tif"
    write_tiled_tiff8(tif, (150, 200))
    tif.write_bytes(tif.read_bytes()[:1000])  # tiles listed beyond the end of the file
    with pytest.raises(DataError, match="beyond the end of the file"):
        open_sources(tif)


def test_zarr_chunks_outside_declared_shape(tmp_path: Path) -> None:
    arr = zarr.create_array(str(tmp_path / "img.zarr"), shape=(100, 130), chunks=(32, 32), dtype="u1")
    arr[:] = 7
    meta = json.loads((tmp_path / "img.zarr" / "zarr.json").read_text())
    meta["shape"] = [60, 130]  # the header now hides two rows of stored chunks
    (tmp_path / "img.zarr" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="outside the chunk grid"):
        open_sources(tmp_path / "img.zarr")


@pytest.mark.ray
def test_lying_files_fail_and_good_file_finishes(tmp_path: Path, ray_local: None) -> None:
    import ray

    model, out = make_model(tmp_path / "model"), tmp_path / "O"
    write_tiled_tiff8(tmp_path / "good.tif", (150, 200))
    write_lying_tiff(tmp_path / "lying.tif")
    write_short_png(tmp_path / "short.png")
    address = ray.get_runtime_context().gcs_address
    status = main(["--model", str(model), "--input", str(tmp_path / "*"), "--output", str(out), "--tile", str(TILE),
                   "--halo", str(HALO), "--address", address, "--no-progress"])
    assert status == 1
    rows = {Path(e["input"]).name: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert {k: e["status"] for k, e in rows.items()} == {"good.tif": "done", "lying.tif": "failed",
                                                        "short.png": "failed"}
    assert "declares a 200000 x 200000 image" in rows["lying.tif"]["error"]
    assert "truncated" in rows["short.png"]["error"] and "re-export" in rows["short.png"]["error"]
