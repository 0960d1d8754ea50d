"""SEM backscatter-like images of sandstone, renderable window by window at any size.

Grains are Voronoi cells on a 40 px grid whose seeds, minerals and grey levels come from a
hash of the cell coordinates, so any window of an (unbounded) image renders on its own and
agrees with every other window; 88,000 px scans are written tile by tile as tiled BigTIFFs
with flat memory. Each cell is a sub-mineral (as in QEMSCAN maps) that belongs to one of four
classes: 0 pore (dark; whole pore cells, rounded-grain gaps, intergranular seams of varying
width), 1 quartz, 2 albite (a little brighter), 3 mixed clays/accessories (bright, textured).
The dataset masks are colour-coded RGB with one colour per sub-mineral, merged to the four
classes by ``colors`` in dataset.yaml.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from segcore.data.spec import DatasetSpec
from segcore.errors import ConfigError
from segcore.simulate.common import gauss, hash2d, prepare_dataset_dir, rng_for, unit, write_spec

log = logging.getLogger(__name__)

CLASSES = ["pore", "quartz", "albite", "clay"]
CELL = 40  # grain cell size, px
Q = 16  # seed positions are multiples of 1/Q px, so distances are exact and window-independent
NOISE_STD = 1300.0
# sub-mineral: (class id, RGB colour in the QEMSCAN-like mask, grey level, texture amplitude)
MINERALS: list[tuple[str, int, tuple[int, int, int], float, float]] = [
    ("pore", 0, (0, 0, 0), 5000, 600),
    ("epoxy", 0, (40, 40, 40), 7000, 600),
    ("quartz", 1, (255, 0, 0), 25000, 500),
    ("quartz_overgrowth", 1, (250, 5, 0), 26000, 500),
    ("albite", 2, (0, 200, 0), 31500, 700),
    ("oligoclase", 2, (60, 170, 60), 33000, 700),
    ("kaolinite", 3, (0, 0, 255), 38000, 7000),
    ("illite", 3, (90, 90, 255), 40000, 7000),
    ("chlorite", 3, (0, 200, 200), 43000, 6000),
    ("calcite", 3, (255, 255, 0), 46000, 4000),
    ("pyrite", 3, (255, 160, 0), 58000, 3000),
]
# cumulative probabilities of the sub-minerals a grain cell gets (pore 8 %, quartz 48 %, ...)
_SUB_P = np.cumsum([0.05, 0.03, 0.36, 0.12, 0.15, 0.05, 0.08, 0.05, 0.05, 0.04, 0.02])
_LEVEL = np.array([m[3] for m in MINERALS], np.float32)
_TEXTURE = np.array([m[4] for m in MINERALS], np.float32)
_CLASS = np.array([m[1] for m in MINERALS], np.uint8)
_COLOR = np.array([m[2] for m in MINERALS], np.uint8)


def _cells(seed: int, i0: int, i1: int, j0: int, j1: int) -> dict[str, np.ndarray]:
    """Per-cell attributes for cell rows i0..i1-1 and columns j0..j1-1 (all from hashes)."""
    ii = np.arange(i0, i1)[:, None]
    jj = np.arange(j0, j1)[None, :]
    h = [hash2d(seed, salt, ii, jj) for salt in range(4)]
    sub = np.searchsorted(_SUB_P, unit(h[2]), side="right").clip(0, len(MINERALS) - 1).astype(np.uint8)
    radius = (0.5 + 0.35 * unit(h[3])) * CELL
    radius[_CLASS[sub] == 3] = 2 * CELL  # clay aggregates fill their cell
    return {
        "qy": (Q * CELL * (0.12 + 0.76 * unit(h[0]))).astype(np.int32),  # seed offset in the cell, 1/Q px
        "qx": (Q * CELL * (0.12 + 0.76 * unit(h[1]))).astype(np.int32),
        "sub": sub,
        "radius": (radius * Q).astype(np.float32),
        "jitter": (gauss(h[3] ^ h[2]) * 900).astype(np.float32),
    }


def _voronoi(seed: int, i0: int, j0: int, ni: int, nj: int) -> tuple[np.ndarray, ...]:
    """Nearest/second-nearest squared distances (1/Q px units) and the flat index of the nearest
    cell in the attribute arrays (padded by one cell) for the cell-aligned block of ``ni`` x ``nj`` cells starting at cell (i0, j0).

    Arrays are (ni, CELL, nj, CELL): seeds broadcast over the pixels of their cell, no gathers.
    """
    cells = _cells(seed, i0 - 1, i0 + ni + 1, j0 - 1, j0 + nj + 1)
    a = (np.arange(CELL, dtype=np.float32) * Q)[None, :, None, None]
    b = (np.arange(CELL, dtype=np.float32) * Q)[None, None, None, :]
    d1 = np.full((ni, CELL, nj, CELL), np.inf, np.float32)
    d2 = d1.copy()
    best = np.zeros(d1.shape, np.int32)
    flat_id = np.arange((ni + 2) * (nj + 2), dtype=np.int32).reshape(ni + 2, nj + 2)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            window = (slice(1 + di, 1 + di + ni), slice(1 + dj, 1 + dj + nj))
            qy = cells["qy"][window].astype(np.float32)[:, None, :, None]
            qx = cells["qx"][window].astype(np.float32)[:, None, :, None]
            dy = a - (qy + np.float32(di * CELL * Q))
            dx = b - (qx + np.float32(dj * CELL * Q))
            d = dy * dy + dx * dx
            closer = d < d1
            np.minimum(d2, d, out=d2)
            np.copyto(d2, d1, where=closer)
            np.copyto(d1, d, where=closer)
            np.copyto(best, flat_id[window][:, None, :, None], where=closer)
    return d1, d2, best, cells


def _value_noise(seed: int, salt: int, r0: int, c0: int, h: int, w: int, step: int) -> np.ndarray:
    """Smooth noise in [0, 1): hashed lattice every ``step`` px, bilinear in between (separable)."""
    rows, cols = np.arange(r0, r0 + h), np.arange(c0, c0 + w)
    iy, ix = rows // step, cols // step
    fy = ((rows % step) / step).astype(np.float32)[:, None]
    fx = ((cols % step) / step).astype(np.float32)[None, :]
    lat = unit(hash2d(seed, salt, np.arange(iy[0], iy[-1] + 2)[:, None], np.arange(ix[0], ix[-1] + 2)[None, :]))
    jx = ix - ix[0]
    along = lat[:, jx] * (1 - fx) + lat[:, jx + 1] * fx  # (lattice rows, w)
    jy = iy - iy[0]
    return along[jy] * (1 - fy) + along[jy + 1] * fy


def render_sem_minerals(shape: tuple[int, int], seed: int = 0,
                        offset: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """The window ``offset`` + ``shape`` of the infinite image for ``seed``: (uint16 image,
    uint8 sub-mineral ids indexing :data:`MINERALS`)."""
    h, w = (int(v) for v in shape)
    r0, c0 = (int(v) for v in offset)
    i0, j0 = r0 // CELL, c0 // CELL
    ni, nj = (r0 + h - 1) // CELL - i0 + 1, (c0 + w - 1) // CELL - j0 + 1
    d1, d2, best, cells = _voronoi(seed, i0, j0, ni, nj)
    crop = (slice(r0 - i0 * CELL, r0 - i0 * CELL + h), slice(c0 - j0 * CELL, c0 - j0 * CELL + w))

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(ni * CELL, nj * CELL)[crop]

    best = flat(best)
    sub, radius, jitter = (cells[k].ravel().take(best) for k in ("sub", "radius", "jitter"))
    r1, r2 = np.sqrt(flat(d1)), np.sqrt(flat(d2))
    gap = (0.5 + 5.0 * _value_noise(seed, 10, r0, c0, h, w, 96) ** 2) * Q  # porosity varies slowly
    pore = ((r2 - r1) < gap) | (r1 > radius)
    sub = np.where(pore & (_CLASS[sub] != 0), np.uint8(0), sub)
    texture = _value_noise(seed, 11, r0, c0, h, w, 6) + 0.5 * _value_noise(seed, 12, r0, c0, h, w, 2) - 0.75
    rows, cols = np.arange(r0, r0 + h)[:, None], np.arange(c0, c0 + w)[None, :]
    noise = gauss(hash2d(seed, 13, rows, cols)) * np.float32(NOISE_STD)
    grain = np.where(pore, np.float32(0), jitter)
    image = _LEVEL[sub] + grain + _TEXTURE[sub] * texture + noise
    return np.clip(image, 0, 65535).astype(np.uint16), sub


def render_sem(shape: tuple[int, int], seed: int = 0,
               offset: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """A window of the SEM image: (uint16 (H, W) image, uint8 class labels 0..3).

    Deterministic in the absolute pixel coordinates: a window of a big render equals the
    render of that window.
    """
    image, sub = render_sem_minerals(shape, seed, offset)
    return image, _CLASS[sub]


def generate_sem(out: str | Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """Write ``n`` 16-bit TIFF SEM images, colour-coded RGB PNG masks (several colours per
    class) and a dataset.yaml merging the colours into the four classes."""
    import tifffile

    if n < 1 or size < 16:
        raise ConfigError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    images, masks = prepare_dataset_dir(out)
    for i in range(n):
        image_seed = int(rng_for(seed, i).integers(2**31))
        image, sub = render_sem_minerals((size, size), image_seed)
        tifffile.imwrite(images / f"sem_{i:04d}.tif", image, photometric="minisblack")
        Image.fromarray(_COLOR[sub]).save(masks / f"sem_{i:04d}.png")
    colors = {name: [list(m[2]) for m in MINERALS if m[1] == cid] for cid, name in enumerate(CLASSES)}
    spec = DatasetSpec(class_names=CLASSES, mask_mode="rgb", class_colors=colors,
                       normalize={"mode": "percentile", "low_percentile": 0.5, "high_percentile": 99.5},
                       description=f"gigaseg simulate sem: {n} images of {size} px, seed {seed}; "
                                   f"sub-minerals {[m[0] for m in MINERALS]}")
    write_spec(out, spec)
    log.info("wrote %d SEM images (%d px) to %s", n, size, out)
    return Path(out)


def _render_tiles(height: int, width: int, tile: int, seed: int,
                  workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Full ``tile`` x ``tile`` (image, labels) in row-major tile order, rendered ahead by a
    small thread pool (numpy releases the GIL) with a bounded number of tiles in flight."""
    coords = iter([(r, c) for r in range(0, height, tile) for c in range(0, width, tile)])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque(
            pool.submit(render_sem, (tile, tile), seed, rc) for rc in islice(coords, 2 * workers))
        while pending:
            result = pending.popleft().result()
            nxt = next(coords, None)
            if nxt is not None:
                pending.append(pool.submit(render_sem, (tile, tile), seed, nxt))
            yield result


class _MaskWriter(threading.Thread):
    """Writes the label tiles to a second tiled TIFF while the image is written, fed through a
    bounded queue so memory stays flat."""

    def __init__(self, path: Path, shape: tuple[int, int], tile: int, depth: int) -> None:
        super().__init__(daemon=True)
        self.path, self.shape, self.tile = path, shape, tile
        self.queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._ended = False

    def _items(self) -> Iterator[np.ndarray]:
        while (item := self.queue.get()) is not None:
            yield item
        self._ended = True

    def run(self) -> None:
        import tifffile

        try:
            tifffile.imwrite(self.path, self._items(), shape=self.shape, dtype=np.uint8, bigtiff=True,
                             tile=(self.tile, self.tile), photometric="minisblack", compression="zlib",
                             compressionargs={"level": 1})
        except BaseException as err:  # reported by put()/close() in the writing thread
            self.error = err
            while not self._ended and self.queue.get() is not None:  # drain: never block the producer
                pass

    def put(self, labels: np.ndarray) -> None:
        if self.error is not None:
            raise RuntimeError(f"{self.path}: writing the label TIFF failed: {self.error}") from self.error
        self.queue.put(labels)

    def close(self, check: bool = True) -> None:
        self.queue.put(None)
        self.join()
        if check and self.error is not None:
            raise RuntimeError(f"{self.path}: writing the label TIFF failed: {self.error}") from self.error


def write_sem_bigtiff(path: str | Path, height: int, width: int, tile: int = 512, seed: int = 0,
                      mask_path: str | Path | None = None, compression: str | None = None,
                      workers: int | None = None) -> Path:
    """Write a ``height`` x ``width`` uint16 SEM image as a tiled BigTIFF, tile by tile (memory
    flat in image size), and optionally its uint8 class labels as a tiled TIFF at ``mask_path``.

    The content equals ``render_sem((height, width), seed)``. ``tile`` must be a multiple of 16
    (TIFF rule). ``workers`` render threads (default: the CPU count, at most 8).
    """
    import tifffile

    if tile % 16 or tile < 16 or height < 1 or width < 1:
        raise ConfigError(f"need tile a positive multiple of 16 and a positive size, got tile={tile}, "
                         f"{height}x{width}")
    path = Path(path)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    mask_writer = _MaskWriter(Path(mask_path), (height, width), tile, 2 * workers + 2) if mask_path else None
    if mask_writer:
        mask_writer.start()

    def images() -> Iterator[np.ndarray]:
        for image, labels in _render_tiles(height, width, tile, seed, workers):
            if mask_writer:
                mask_writer.put(labels)
            yield image

    try:
        tifffile.imwrite(path, images(), shape=(height, width), dtype=np.uint16, bigtiff=True,
                         tile=(tile, tile), photometric="minisblack", compression=compression,
                         description=f"gigaseg simulate sem seed={seed}")
    except BaseException:
        if mask_writer:
            mask_writer.close(check=False)  # the image error is the one to report
        raise
    if mask_writer:
        mask_writer.close()
    log.info("wrote %dx%d SEM BigTIFF %s (tile %d)%s", height, width, path, tile,
             f" and labels {mask_path}" if mask_path else "")
    return path


def render_coarse_minerals(height: int, width: int, scale: float, seed: int = 0) -> np.ndarray:
    """Sub-mineral ids on a grid ``scale`` times coarser than a ``height`` x ``width`` scan: each
    coarse pixel is the mineral at its centre (a QEMSCAN measures one beam spot per pixel), not a
    blur of the fine labels. Rendered one fine row per coarse row, so memory stays small."""
    mh, mw = max(1, round(height / scale)), max(1, round(width / scale))
    rows = np.minimum(((np.arange(mh) + 0.5) * scale).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(mw) + 0.5) * scale).astype(np.int64), width - 1)
    out = np.empty((mh, mw), np.uint8)
    band = 4096  # columns rendered at a time
    for i, r in enumerate(rows):
        for c0 in range(0, width, band):
            sel = cols[(cols >= c0) & (cols < c0 + band)]
            if sel.size:
                _, sub = render_sem_minerals((1, int(sel[-1] - c0 + 1)), seed, (int(r), c0))
                out[i, np.searchsorted(cols, sel[0]):np.searchsorted(cols, sel[-1]) + 1] = sub[0, sel - c0]
    return out


def generate_sem_qemscan(out: str | Path, n: int, size: int, seed: int = 0, label_scale: float = 8.0,
                         tile: int = 512) -> Path:
    """Write ``n`` tiled BigTIFF scans of ``size`` px (tile by tile, flat memory) and QEMSCAN-like
    RGB colour masks ``label_scale`` times coarser (one colour per sub-mineral), with a
    dataset.yaml that merges the minerals into pore/quartz/albite/clay and sets ``mask_scale``."""
    if n < 1 or size < 16 or label_scale < 1:
        raise ConfigError(f"need n >= 1, size >= 16 and label_scale >= 1, got n={n}, size={size}, "
                          f"label_scale={label_scale}")
    images, masks = prepare_dataset_dir(out)
    tile = min(tile, max(16, size // 16 * 16))
    for i in range(n):
        image_seed = int(rng_for(seed, i).integers(2**31))
        write_sem_bigtiff(images / f"sem_{i:04d}.tif", size, size, tile=tile, seed=image_seed)
        sub = render_coarse_minerals(size, size, label_scale, image_seed)
        Image.fromarray(_COLOR[sub]).save(masks / f"sem_{i:04d}.png")
    colors = {name: [list(m[2]) for m in MINERALS if m[1] == cid] for cid, name in enumerate(CLASSES)}
    spec = DatasetSpec(class_names=CLASSES, mask_mode="rgb", class_colors=colors, mask_scale=float(label_scale),
                       normalize={"mode": "percentile", "low_percentile": 0.5, "high_percentile": 99.5},
                       description=f"gigaseg simulate sem --label-scale {label_scale:g}: {n} scans of {size} px, "
                                   f"QEMSCAN-like masks {label_scale:g}x coarser, seed {seed}; "
                                   f"sub-minerals {[m[0] for m in MINERALS]}")
    write_spec(out, spec)
    log.info("wrote %d SEM scans (%d px) with %gx coarser colour masks to %s", n, size, label_scale, out)
    return Path(out)
