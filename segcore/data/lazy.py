"""Bounded-memory training data for whole scans: patches read on demand from lazy sources.

Used when a dataset's masks are coarser than its images (``mask_scale`` / ``pixel_size_um`` in
dataset.yaml), when the model works at another resolution (``data.scale`` = image px per model
px) or when the images are too big to hold (see :func:`use_lazy`).

* Images stay in their files (:mod:`segcore.readers`). A patch of ``p`` model px reads the
  region of ``p * scale`` image px under it and area-averages it to ``p`` (an exact block mean
  for integer scales), then normalises it with statistics from the source's strided sample.
* Masks are coarse class-id grids held whole as uint8 (a QEMSCAN map of 4,700 px is 22 MB);
  a patch's labels are the mask pixels under its model-pixel centres (nearest).
* Class balance uses per-block class counts of each mask, cached in
  ``<data>/.gigaseg-index/<key>.npz`` with the ids, keyed by the mask file's size, mtime and
  first MiB and by the dataset spec, so a mask is decoded and counted once.
* Validation holds out spatial blocks of the model grid; training patches keep at least a
  patch of distance from them (:func:`choose_val_blocks`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcore.config import NormalizeConfig
from segcore.data.errors import DataError
from segcore.data.io import RawImage, file_stem, is_fits, open_image_sources
from segcore.data.normalize import NormStats, apply_norm, compute_norm_stats
from segcore.data.shared import (
    EpochPatches,
    Sample,
    dataset_files,
    find_mask,
    ignore_boundaries,
    index_files,
    mask_indices,
    mask_stem,
    read_mask_for,
)
from segcore.data.spec import IGNORE, DatasetSpec
from segcore.readers.scaled import read_scaled

log = logging.getLogger(__name__)

BIG_PIXELS = 64 << 20  # datasets with more image pixels than this train lazily
INDEX_DIR = ".gigaseg-index"
INDEX_BLOCK = 16  # mask px per side of a class-count block
INDEX_VERSION = 1
MAX_TRIES = 64  # rejection sampling of training corners outside the validation zones


# ----------------------------------------------------------------------------- resampling


def gather(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, dtype: Any = None) -> np.ndarray:
    """``mask[rows][:, cols]`` (sorted indices) as ``dtype``: the axis with the smaller span is
    expanded first, on the small sub-block under the patch, and the cast happens there too, so
    the full-size result is written once, by whole-row copies."""
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    sub = mask[r0:r1, c0:c1]
    if (r1 - r0) * cols.size <= rows.size * (c1 - c0):
        return sub.take(cols - c0, axis=1).astype(dtype or mask.dtype, copy=False).take(rows - r0, axis=0)
    return sub.take(rows - r0, axis=0).astype(dtype or mask.dtype, copy=False).take(cols - c0, axis=1)


def normalise(region: np.ndarray, stats: NormStats) -> np.ndarray:
    """:func:`apply_norm` in fewer passes for pixel types float32 holds exactly (same values)."""
    if np.result_type(region.dtype, np.float32) != np.float32:
        return apply_norm(region, stats)
    out = np.subtract(region, np.float32(stats.offset), dtype=np.float32)
    out *= np.float32(stats.scale)
    return out


# ----------------------------------------------------------------------------- images


@dataclass
class LazyImage:
    """One image of a dataset: where its pixels are, its statistics and its coarse labels."""

    name: str
    path: Path
    index: int  # source index (FITS HDU; -1 otherwise)
    shape: tuple[int, int]  # image px
    channels: int
    stats: NormStats
    mask: np.ndarray  # uint8 class ids at mask resolution (255 = ignore)
    mask_scale: float  # image px per mask px
    counts: np.ndarray  # (blocks_y, blocks_x, K) labelled px per class per INDEX_BLOCK block

    def model_shape(self, scale: float) -> tuple[int, int]:
        """The image's size on the model grid of ``scale`` image px per model px."""
        return max(1, int(self.shape[0] // scale)), max(1, int(self.shape[1] // scale))


def _index_key(mask_path: Path, spec: DatasetSpec, hdu: Any) -> str:
    st = mask_path.stat()
    digest = hashlib.sha256()
    with open(mask_path, "rb") as f:
        digest.update(f.read(1 << 20))
    digest.update(f"{st.st_size}:{st.st_mtime_ns}:{hdu}:{INDEX_BLOCK}:{INDEX_VERSION}".encode())
    digest.update(spec.model_dump_json(include={"class_names", "mask_mode", "class_colors", "ignore_colors",
                                                 "id_map"}).encode())
    return digest.hexdigest()[:32]


def block_counts(ids: np.ndarray, num_classes: int, block: int = INDEX_BLOCK) -> np.ndarray:
    """(ceil(h / block), ceil(w / block), K) labelled pixels per class in each block."""
    h, w = ids.shape
    by, bx = -(-h // block), -(-w // block)
    rows = (np.arange(h) // block)[:, None] * bx
    cols = (np.arange(w) // block)[None, :]
    valid = ids != IGNORE
    keys = ((rows + cols) * num_classes + ids.astype(np.int64))[valid]
    return np.bincount(keys, minlength=by * bx * num_classes).reshape(by, bx, num_classes)


def load_mask_index(data_dir: Path, mask_path: Path, spec: DatasetSpec,
                    read: Callable[[], np.ndarray], hdu: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 ids, block counts) of a mask, from the cache beside the dataset when it is current."""
    cache = data_dir / INDEX_DIR / f"{_index_key(mask_path, spec, hdu)}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as npz:
                return npz["ids"], npz["counts"]
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s: unreadable index cache (%s); rebuilding it", cache, err)
    ids = read()
    ids = ids.astype(np.uint8 if spec.num_classes < IGNORE else np.uint16)
    counts = block_counts(ids, max(spec.num_classes, 1))
    try:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, ids=ids, counts=counts)
        os.replace(tmp, cache)
    except OSError as err:  # a read-only dataset still trains, it just recounts next time
        log.warning("%s: cannot cache the class index (%s)", cache, err)
    return ids, counts


def scan_dataset(data_dir: str | Path, spec: DatasetSpec, normalize: NormalizeConfig | None = None) -> list[LazyImage]:
    """Every image of ``<data_dir>/images`` as a :class:`LazyImage` (pixels stay in the files)."""
    data_dir = Path(data_dir)
    cfg = normalize or spec.normalize
    images, masks = dataset_files(data_dir)
    out: list[LazyImage] = []
    for image in images:
        stem = mask_stem(image, spec, masks)
        sources = open_image_sources(image)
        try:
            for src in sources:
                name = stem_name = file_stem(image)
                if is_fits(image) and len(sources) > 1:
                    name = f"{stem_name}_{src.extname or src.index}"
                raw = RawImage(name, np.empty(0), src.header, max(src.index, 0), getattr(src, "extname", None))
                mask_path, from_fits = find_mask(image, raw, len(sources), stem, masks)
                ids, counts = load_mask_index(data_dir, mask_path, spec,
                                              lambda r=raw, m=mask_path, f=from_fits: read_mask_for(r, m, f, spec),
                                              hdu=(raw.extname, raw.index) if from_fits else None)
                scale = spec.mask_scale_for(src.shape, ids.shape, f"{image} (mask {mask_path.name})")
                stats = compute_norm_stats(src.sample(), cfg, src.header, source=src.label)
                out.append(LazyImage(name, image, src.index, src.shape, src.channels, stats, ids, scale, counts))
        finally:
            for src in sources:
                src.close()
    _check_lazy(out, data_dir)
    return out


def _check_lazy(images: list[LazyImage], data_dir: Path) -> None:
    channels = {im.channels for im in images}
    if len(channels) > 1:
        raise DataError(data_dir / "images", f"images have different channel counts {sorted(channels)}",
                        "convert all images of a dataset to the same channels")
    names = [im.name for im in images]
    if len(set(names)) != len(names):
        raise DataError(data_dir / "images", f"several files give samples named {sorted(set(names))}",
                        "give each image a unique file name")


def total_pixels(data_dir: str | Path) -> int:
    """Image pixels of a dataset from the file headers (nothing decoded)."""
    total = 0
    for paths in index_files(Path(data_dir) / "images").values():
        for path in paths:
            sources = open_image_sources(path)
            total += sum(s.shape[0] * s.shape[1] for s in sources)
            for s in sources:
                s.close()
    return total


def use_lazy(loader: str, scale: float, spec: DatasetSpec, data_dir: str | Path) -> bool:
    """Whether training should read patches lazily: asked for, a mask or model scale other than
    1, or more than :data:`BIG_PIXELS` image pixels."""
    if loader != "auto":
        return loader == "lazy"
    return scale != 1 or spec.declared_mask_scale is not None or total_pixels(data_dir) > BIG_PIXELS


# ----------------------------------------------------------------------------- reading patches


class PatchReader:
    """Reads normalised image patches and their labels on the model grid of ``scale``.

    Sources are opened on first use in each process (DataLoader workers, DDP ranks) and never
    pickled, so a reader can be shipped to worker processes.
    """

    def __init__(self, images: Sequence[LazyImage], scale: float, boundary_ignore: int = 0) -> None:
        self.images = list(images)
        self.scale = float(scale)
        self.boundary_ignore = int(boundary_ignore)
        self._open: dict[int, Any] = {}
        self._pid = os.getpid()
        self.pixels_read = 0  # image px decoded in this process (to check reads stay minimal)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def _source(self, k: int) -> Any:
        if os.getpid() != self._pid:  # forked: the parent's handles are not ours
            self._open, self._pid = {}, os.getpid()
        if k not in self._open:
            im = self.images[k]
            sources = open_image_sources(im.path)
            self._open[k] = next(s for s in sources if s.index == im.index)
            for s in sources:
                if s is not self._open[k]:
                    s.close()
        return self._open[k]

    def image(self, k: int, top: int, left: int, h: int, w: int) -> np.ndarray:
        """Normalised (C, h, w) float32 pixels of model px ``[top:top+h, left:left+w]``: the
        region read as is at scale 1, else area means from the best pyramid level (or level 0)."""
        source = self._source(k)
        before = source.pixels_read
        rows, cols = slice(top, top + h), slice(left, left + w)
        region = source.read(rows, cols) if self.scale == 1 else read_scaled(source, rows, cols, self.scale)
        self.pixels_read += source.pixels_read - before
        region = region if region.ndim == 3 else region[..., None]
        return np.ascontiguousarray(normalise(region, self.images[k].stats).transpose(2, 0, 1))

    def mask(self, k: int, top: int, left: int, h: int, w: int) -> np.ndarray:
        """int64 (h, w) labels of model px ``[top:top+h, left:left+w]`` (nearest from the mask;
        boundary pixels ignored when asked, judged with a margin so patch edges are right)."""
        im, b = self.images[k], self.boundary_ignore
        rows = mask_indices(top - b, h + 2 * b, self.scale, im.mask_scale, im.mask.shape[0])
        cols = mask_indices(left - b, w + 2 * b, self.scale, im.mask_scale, im.mask.shape[1])
        if b:
            return ignore_boundaries(gather(im.mask, rows, cols), b)[b:b + h, b:b + w].astype(np.int64)
        return gather(im.mask, rows, cols, np.int64)

    def patch(self, k: int, top: int, left: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, p, p) image and (p, p) mask; parts beyond a small image are padded (mask: ignore)."""
        from segcore.tiling import reflect_pad

        mh, mw = self.images[k].model_shape(self.scale)
        h, w = min(p, mh - top), min(p, mw - left)
        image, mask = self.image(k, top, left, h, w), self.mask(k, top, left, h, w)
        if (h, w) != (p, p):
            image = np.ascontiguousarray(reflect_pad(image, ((0, p - h), (0, p - w))))
            mask = np.pad(mask, ((0, p - h), (0, p - w)), constant_values=IGNORE)
        return image, mask

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open = {}


# ----------------------------------------------------------------------------- validation blocks


@dataclass(frozen=True)
class Block:
    """A square region of one image on the model grid."""

    k: int
    top: int
    left: int
    size: int

    def overlaps(self, top: int, left: int, p: int, buffer: int) -> bool:
        """Whether a ``p`` patch at (top, left) comes within ``buffer`` model px of this block."""
        return (top < self.top + self.size + buffer and top + p > self.top - buffer
                and left < self.left + self.size + buffer and left + p > self.left - buffer)


def choose_val_blocks(images: Sequence[LazyImage], scale: float, patch: int, val_fraction: float,
                      val_pixels: int, seed: int) -> list[Block]:
    """Held-out blocks of side ``max(2 * patch, 64)`` model px, in a seeded random order, until
    ``val_pixels`` or ``val_fraction`` of the model-grid area is reached; a block is kept only if
    its image still has room for training patches a patch away from every held-out block."""
    if val_fraction <= 0:
        return []
    side = max(2 * patch, 64)
    total = sum(math.prod(im.model_shape(scale)) for im in images)
    budget = min(val_pixels, val_fraction * total)
    candidates = []
    for k, im in enumerate(images):
        mh, mw = im.model_shape(scale)
        size = min(side, mh, mw)
        candidates += [Block(k, t, left, size) for t in range(0, mh - size + 1, size)
                       for left in range(0, mw - size + 1, size)]
    order = np.random.default_rng([seed, 8]).permutation(len(candidates))
    chosen: list[Block] = []
    area = 0
    for i in order:
        if area >= budget:
            break
        block = candidates[int(i)]
        if _has_training_room(images[block.k].model_shape(scale), [*chosen, block], block.k, patch):
            chosen.append(block)
            area += block.size ** 2
    return chosen


def _has_training_room(shape: tuple[int, int], blocks: list[Block], k: int, patch: int) -> bool:
    """Whether some patch corner of image ``k`` (on a grid of quarter-patch steps) is clear of
    every held-out block by a patch."""
    mh, mw = shape
    step = max(1, patch // 4)
    tops = np.arange(0, max(mh - patch, 0) + 1, step)[:, None]
    lefts = np.arange(0, max(mw - patch, 0) + 1, step)[None, :]
    free = np.ones((tops.size, lefts.size), bool)
    for b in (b for b in blocks if b.k == k):
        free &= ~((tops < b.top + b.size + patch) & (tops + patch > b.top - patch)
                  & (lefts < b.left + b.size + patch) & (lefts + patch > b.left - patch))
    return bool(free.any())


# ----------------------------------------------------------------------------- dataset


@dataclass
class _Sampler:
    """Where training patches may come from: per-class block weights outside validation zones,
    as cumulative distributions so a draw is one binary search (not a pass over the blocks)."""

    present: np.ndarray  # classes with weight somewhere
    image_cdf: dict[int, np.ndarray] = field(default_factory=dict)  # class -> cdf over images
    block_cdf: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (image, class) -> cdf

    @staticmethod
    def draw(cdf: np.ndarray, rng: np.random.Generator) -> int:
        """An index drawn with the probabilities whose normalised cumulative sum is ``cdf``."""
        return min(int(np.searchsorted(cdf, rng.random(), side="right")), cdf.size - 1)


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights, dtype=np.float64)
    return cdf / cdf[-1]


class LazyPatchDataset(EpochPatches):
    """``patches_per_epoch`` random ``patch_size`` patches read on demand (see module doc).

    Same contract as :class:`segcore.data.dataset.PatchDataset`: item ``i`` of epoch ``e``
    depends only on ``(seed, e, i)``; returns ``(float32 (C, p, p), int64 (p, p))`` tensors.
    Training patches keep ``patch_size`` model px away from every block in ``val_blocks``.
    """

    def __init__(self, images: Sequence[LazyImage], patch_size: int, patches_per_epoch: int, scale: float = 1.0,
                 class_balanced: bool = True, augment: Callable[..., dict[str, Any]] | None = None, seed: int = 0,
                 num_classes: int | None = None, val_blocks: Sequence[Block] = (), boundary_ignore: int = 0) -> None:
        if not images:
            raise ValueError("LazyPatchDataset needs at least one image")
        self.reader = PatchReader(images, scale, boundary_ignore)
        self.images = self.reader.images
        self.scale = float(scale)
        self.patch_size, self.patches_per_epoch = int(patch_size), int(patches_per_epoch)
        self.class_balanced, self.augment, self.seed = class_balanced, augment, seed
        self.num_classes = max(num_classes or images[0].counts.shape[-1], 1)
        self.val_blocks = [list(b for b in val_blocks if b.k == k) for k in range(len(self.images))]
        self._init_epoch()
        self._sampler = self._build_sampler()
        areas = np.array([math.prod(im.model_shape(scale)) for im in self.images], np.float64)
        self._area_cdf = np.cumsum(areas) / areas.sum()

    def _build_sampler(self) -> _Sampler:
        """Class counts per index block, zeroed where a block touches a validation zone."""
        weights = []
        for k, im in enumerate(self.images):
            counts = im.counts.astype(np.float64).copy()
            edge = INDEX_BLOCK * im.mask_scale / self.scale  # model px per index block
            for b in self.val_blocks[k]:
                y0 = max(0, int((b.top - self.patch_size) // edge))
                x0 = max(0, int((b.left - self.patch_size) // edge))
                y1 = int(math.ceil((b.top + b.size + self.patch_size) / edge))
                x1 = int(math.ceil((b.left + b.size + self.patch_size) / edge))
                counts[y0:y1, x0:x1] = 0
            weights.append(counts)
        per_image = np.stack([w.sum(axis=(0, 1)) for w in weights])  # (images, K)
        sampler = _Sampler(np.flatnonzero(per_image.sum(axis=0) > 0))
        for cls in sampler.present.tolist():
            sampler.image_cdf[cls] = _cdf(per_image[:, cls])
            for k, w in enumerate(weights):
                if per_image[k, cls] > 0:
                    sampler.block_cdf[k, cls] = _cdf(w[..., cls].ravel())
        return sampler

    def _clear(self, k: int, top: int, left: int) -> bool:
        return not any(b.overlaps(top, left, self.patch_size, self.patch_size) for b in self.val_blocks[k])

    def _balanced(self, rng: np.random.Generator) -> tuple[int, int, int] | None:
        s = self._sampler
        cls = int(rng.choice(s.present))
        k = s.draw(s.image_cdf[cls], rng)
        by, bx = divmod(s.draw(s.block_cdf[k, cls], rng), self.images[k].counts.shape[1])
        im, p = self.images[k], self.patch_size
        edge = INDEX_BLOCK * im.mask_scale / self.scale
        cy, cx = (by + rng.random()) * edge, (bx + rng.random()) * edge
        mh, mw = im.model_shape(self.scale)
        jitter = rng.integers(-(p // 4), p // 4 + 1, size=2)
        top = int(min(max(cy - p / 2 + int(jitter[0]), 0), max(mh - p, 0)))
        left = int(min(max(cx - p / 2 + int(jitter[1]), 0), max(mw - p, 0)))
        return (k, top, left) if self._clear(k, top, left) else None

    def _uniform(self, rng: np.random.Generator) -> tuple[int, int, int]:
        k = min(int(np.searchsorted(self._area_cdf, rng.random(), side="right")), len(self.images) - 1)
        mh, mw = self.images[k].model_shape(self.scale)
        p = self.patch_size
        return k, int(rng.integers(0, max(mh - p, 0) + 1)), int(rng.integers(0, max(mw - p, 0) + 1))

    def corner(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(image, top, left) of a training patch clear of the validation zones."""
        for _ in range(MAX_TRIES):
            if self.class_balanced and self._sampler.present.size:
                found = self._balanced(rng)
            else:
                found = self._uniform(rng)
                found = found if self._clear(*found) else None
            if found is not None:
                return found
        for _ in range(100 * MAX_TRIES):
            found = self._uniform(rng)
            if self._clear(*found):
                return found
        raise RuntimeError("no training patch clear of the validation blocks; lower data.val_fraction")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.patches_per_epoch:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k, top, left = self.corner(rng)
        image, mask = self.reader.patch(k, top, left, self.patch_size)
        if self.augment is not None:
            from segcore.data.dataset import PatchDataset

            image, mask = PatchDataset._augment(self, image, mask, int(rng.integers(2**31)))
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), torch.from_numpy(
            np.ascontiguousarray(mask, dtype=np.int64))

    def class_pixel_counts(self) -> np.ndarray:
        """Labelled pixels per class over the (coarse) masks."""
        return sum(im.counts.sum(axis=(0, 1)) for im in self.images)[: self.num_classes].astype(np.int64)


# ----------------------------------------------------------------------------- training data


@dataclass
class TrainData:
    """What training needs from a lazily read dataset."""

    patches: LazyPatchDataset
    val_samples: list[Sample]  # at model resolution
    channels: int
    input_range: tuple[float, float]
    masks: list[np.ndarray]  # training masks (coarse ones for lazy data), for class weights


def block_samples(reader: PatchReader, blocks: Sequence[Block]) -> list[Sample]:
    """Validation samples (normalised image + labels at model resolution) of ``blocks``."""
    out = []
    for b in blocks:
        im = reader.images[b.k]
        out.append(Sample(f"{im.name}@{b.top},{b.left}", reader.image(b.k, b.top, b.left, b.size, b.size),
                          reader.mask(b.k, b.top, b.left, b.size, b.size), im.path))
    return out


def whole_blocks(images: Sequence[LazyImage], scale: float, budget: int) -> list[Block]:
    """Square blocks tiling whole images (a separate validation set), up to ``budget`` px."""
    blocks, area = [], 0
    for k, im in enumerate(images):
        mh, mw = im.model_shape(scale)
        side = min(mh, mw, 512)
        for top in range(0, mh - side + 1, side):
            for left in range(0, mw - side + 1, side):
                if area >= budget:
                    return blocks
                blocks.append(Block(k, top, left, side))
                area += side * side
    return blocks


def build_lazy_data(data: Any, spec: DatasetSpec, data_dir: str | Path, *, seed: int, num_classes: int,
                    augment: Callable[..., dict[str, Any]] | None, val_dir: str | Path | None = None,
                    val_spec: DatasetSpec | None = None) -> TrainData:
    """Lazy training patches and validation blocks for a ``DataConfig`` ``data``."""
    from segcore.data.normalize import input_range

    images = scan_dataset(data_dir, spec)
    if val_dir is not None:
        val_images = scan_dataset(val_dir, val_spec or spec)
        blocks: list[Block] = []
        val = block_samples(PatchReader(val_images, data.scale, spec.boundary_ignore),
                            whole_blocks(val_images, data.scale, data.val_pixels))
    else:
        blocks = choose_val_blocks(images, data.scale, data.patch_size, data.val_fraction, data.val_pixels, seed)
        val = block_samples(PatchReader(images, data.scale, spec.boundary_ignore), blocks)
    if not val:
        log.warning("no room for held-out validation blocks: validating on training regions")
        val = block_samples(PatchReader(images, data.scale, spec.boundary_ignore),
                            whole_blocks(images, data.scale, data.val_pixels))
    patches = LazyPatchDataset(images, data.patch_size, data.patches_per_epoch, data.scale, data.class_balanced,
                               augment, seed, num_classes, blocks, spec.boundary_ignore)
    log.info("%s: lazy patches from %d images at scale %g (%d validation blocks, %d px)", data_dir, len(images),
             data.scale, len(val), sum(s.mask.size for s in val))
    return TrainData(patches, val, images[0].channels, input_range([s.image for s in val]),
                    [im.mask for im in images])
