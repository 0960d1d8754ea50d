"""Check the dataset on the driver before any trial starts, so bad data stops a search at once.

Without this, every trial of a search on a dataset with (say) a mask value outside the classes
would start an actor, import torch, load the data and fail the same way, and the search would
end with nothing registered. Here the driver loads the data through segcore exactly as a trial
does (``load_spec``, ``load_samples``: dataset.yaml, image/mask pairing, mask values, NaNs,
channels, and the normalisation with its FITS header keys), once for each normalisation the
space can sample, and a :class:`segcore.data.DataError` stops the search before Ray Tune starts.
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


def normalize_configs(space: SearchSpace) -> list[TrainConfig]:
    """One TrainConfig per normalisation the space can produce (base, then each value of every
    ``normalize.*`` dimension; both ends of a range), duplicates dropped."""
    dims = [d for d in space.dims if d.path == "normalize" or d.path.startswith("normalize.")]
    configs = [space.to_train_config({}, source="base")]
    for dim in dims:
        configs += [space.to_train_config({dim.key: v}, source=f"space.{dim.key}") for v in dim.values]
    unique: dict[str, TrainConfig] = {}
    for cfg in configs:
        key = cfg.normalize.model_dump_json() + str("normalize" in cfg.model_fields_set)
        unique.setdefault(key, cfg)
    return list(unique.values())


def effective_normalize(cfg: TrainConfig, dataset_normalize: NormalizeConfig) -> NormalizeConfig:
    """The normalisation a trial applies: a ``normalize`` the train config sets wins, else dataset.yaml's
    (the precedence of ``segcore.train``)."""
    return cfg.normalize if "normalize" in cfg.model_fields_set else dataset_normalize


def check_folder(folder: str | Path, configs: list[TrainConfig], train_spec: Any = None) -> DataCheck:
    """Load ``folder`` as a trial would, once per distinct normalisation; raises DataError.

    ``train_spec`` (the training folder's spec) is given for a validation folder: its
    normalisation then comes from the training data, as in training.
    """
    from segcore.data import load_samples, load_spec

    spec = load_spec(folder)
    norms: dict[str, NormalizeConfig] = {}
    for cfg in configs:
        norm = effective_normalize(cfg, (train_spec or spec).normalize)
        norms.setdefault(norm.model_dump_json(), norm)
    samples: list[Any] = []
    for norm in norms.values():
        samples = load_samples(folder, spec.model_copy(update={"normalize": norm}))
    channels = int(samples[0].image.shape[0]) if samples else 0
    check = DataCheck(str(folder), len(samples), channels, tuple(spec.class_names),
                      tuple(n.mode for n in norms.values()))
    del samples  # the trials load their own copy; keep the driver small
    return check


def check_search_data(space: SearchSpace, train_dir: str | Path, val_dir: str | Path | None = None) -> list[DataCheck]:
    """Check the training (and validation) folders of a search; raises DataError naming the file."""
    from segcore.data import load_spec

    t0 = time.perf_counter()
    log.info("checking the dataset on the driver before any trial starts: %s%s", train_dir,
             f" (validation: {val_dir})" if val_dir else "")
    configs = normalize_configs(space)
    checks = [check_folder(train_dir, configs)]
    if val_dir is not None:
        checks.append(check_folder(val_dir, configs, train_spec=load_spec(train_dir)))
    for c in checks:
        log.info("data ok: %s: %d samples, %d channel(s), classes %s, normalize %s (%.1fs)", c.folder, c.samples,
                 c.channels, ", ".join(c.classes), "/".join(c.normalize_modes), time.perf_counter() - t0)
    return checks
