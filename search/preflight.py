"""Check the dataset on the driver before any trial starts, so bad data stops a search at once.

Without this, every trial of a search on a dataset with (say) a mask value outside the classes
would start an actor, import torch, load the data and fail the same way, and the search would
end with nothing registered. Here the driver reads the data through segcore the way a trial
does, once for each (normalisation, loader) the space can produce: small datasets with
``load_samples`` (dataset.yaml, image/mask pairing, mask values, NaNs, channels, normalisation
with its FITS header keys), whole scans with the lazy loader's ``scan_dataset`` (the same checks
from file headers, mask indexes and a strided pixel sample, so the driver never holds the
pixels). A :class:`segcore.data.DataError` stops the search before Ray Tune starts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.space import SearchSpace
from segcore.config import NormalizeConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataCheck:
    """What the pre-flight check saw in one dataset folder."""

    folder: str
    samples: int
    channels: int
    classes: tuple[str, ...]
    normalize_modes: tuple[str, ...]


DATA_PATHS = ("normalize", "data.scale", "data.loader")  # what changes how a trial reads its data


def data_configs(space: SearchSpace) -> list[TrainConfig]:
    """One TrainConfig per way the space reads the data (base, then each value of every
    normalisation / scale / loader dimension; both ends of a range), duplicates dropped."""
    dims = [d for d in space.dims if any(d.path == p or d.path.startswith(p + ".") for p in DATA_PATHS)]
    configs = [space.to_train_config({}, source="base")]
    for dim in dims:
        configs += [space.to_train_config({dim.key: v}, source=f"space.{dim.key}") for v in dim.values]
    unique: dict[str, TrainConfig] = {}
    for cfg in configs:
        key = (cfg.normalize.model_dump_json(), "normalize" in cfg.model_fields_set, cfg.data.scale, cfg.data.loader)
        unique.setdefault(repr(key), cfg)
    return list(unique.values())


def effective_normalize(cfg: TrainConfig, dataset_normalize: NormalizeConfig) -> NormalizeConfig:
    """The normalisation a trial applies: a ``normalize`` the train config sets wins, else dataset.yaml's
    (the precedence of ``segcore.train``)."""
    return cfg.normalize if "normalize" in cfg.model_fields_set else dataset_normalize


def _is_lazy(cfg: TrainConfig, spec: Any, folder: str | Path) -> bool:
    """Whether a trial with ``cfg`` reads ``folder`` lazily (the rule of segcore's training)."""
    from segcore.data.lazy import use_lazy

    return use_lazy(cfg.data.loader, cfg.data.scale, spec, folder)


def _read(folder: str | Path, spec: Any, lazy: bool) -> tuple[int, int]:
    """(samples, channels) of ``folder`` read as a trial would; raises DataError."""
    from segcore.data import load_samples

    if lazy:
        from segcore.data.lazy import scan_dataset

        images = scan_dataset(folder, spec)  # headers, mask indexes and a pixel sample only
        return len(images), int(images[0].channels) if images else 0
    samples = load_samples(folder, spec)  # dropped on return: the trials load their own copy
    return len(samples), int(samples[0].image.shape[0]) if samples else 0


def check_folder(folder: str | Path, configs: list[TrainConfig], train_spec: Any = None) -> DataCheck:
    """Read ``folder`` as a trial would, once per distinct (normalisation, loader); raises DataError.

    ``train_spec`` (the training folder's spec) is given for a validation folder: its
    normalisation then comes from the training data, as in training.
    """
    from segcore.data import load_spec

    spec = load_spec(folder)
    ways: dict[str, tuple[NormalizeConfig, bool]] = {}
    for cfg in configs:
        norm = effective_normalize(cfg, (train_spec or spec).normalize)
        lazy = _is_lazy(cfg, spec, folder)
        ways.setdefault(f"{norm.model_dump_json()}|{lazy}", (norm, lazy))
    samples = channels = 0
    for norm, lazy in ways.values():
        samples, channels = _read(folder, spec.model_copy(update={"normalize": norm}), lazy)
    modes = tuple(dict.fromkeys(f"{n.mode}{' (lazy)' if lazy else ''}" for n, lazy in ways.values()))
    return DataCheck(str(folder), samples, channels, tuple(spec.class_names), modes)


def check_search_data(space: SearchSpace, train_dir: str | Path, val_dir: str | Path | None = None) -> list[DataCheck]:
    """Check the training (and validation) folders of a search; raises DataError naming the file."""
    from segcore.data import load_spec

    t0 = time.perf_counter()
    log.info("checking the dataset on the driver before any trial starts: %s%s", train_dir,
             f" (validation: {val_dir})" if val_dir else "")
    configs = data_configs(space)
    checks = [check_folder(train_dir, configs)]
    if val_dir is not None:
        checks.append(check_folder(val_dir, configs, train_spec=load_spec(train_dir)))
    for c in checks:
        log.info("data ok: %s: %d samples, %d channel(s), classes %s, normalize %s (%.1fs)", c.folder, c.samples,
                 c.channels, ", ".join(c.classes), "/".join(c.normalize_modes), time.perf_counter() - t0)
    return checks
