"""Layer 5 of :mod:`segcore.modelio`, model references: the one place that knows what ``--model``
may be and how it becomes weights, and the only layer of the package that knows MLflow.

A reference is either a gigaseg model directory (``config.json`` + ``model.safetensors``) or an
MLflow model URI: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``runs:/<id>/<path>``.

* :func:`is_mlflow_uri` tells the two apart (a path that exists is always a directory reference);
* :func:`pin` fixes a reference for a whole run: a directory becomes absolute and an alias
  becomes its current version, so every worker loads the same weights even if the alias moves;
* :func:`digest` is a reference's identity for resume signatures;
* :func:`is_immutable` tells the URIs whose download may be cached (:func:`download_model_dir`);
* :func:`local_dir` gives the folder behind a reference (downloaded once into the model cache);
* :func:`read_card` and :func:`load_model_dir` choose between a model folder (:mod:`.folder`) and
  an ensemble folder (:mod:`.ensemble`);
* :func:`load_model` rebuilds it anywhere (training, ``evaluate``, ``segment`` actors, the pyfunc).

An MLflow URI is resolved against ``tracking_uri`` (default: gigaseg's, see
:func:`segcore.tracking.default_tracking_uri`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import yaml

from segcore.errors import ModelError
from segcore.modelio.card import CONFIG_FILE, WEIGHTS_FILE, ModelCard, read_single_card
from segcore.modelio.ensemble import (
    is_ensemble_dir,
    load_ensemble_dir,
    read_ensemble_card,
    read_ensemble_config,
)
from segcore.modelio.folder import LoadedModel, load_single_dir

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("models:/", "runs:/")
_ALIAS = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)")
_VERSION = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)/?")
_FIXED_ID = re.compile(r"runs:/.+|models:/m-[0-9a-f]+/?")  # a run's artifacts; an MLflow 3 logged model's id


def is_mlflow_uri(ref: str | Path) -> bool:
    """True for ``models:/`` and ``runs:/`` URIs that are not also an existing path."""
    text = str(ref)
    return text.startswith(MLFLOW_SCHEMES) and not Path(text).exists()


def registered_version(ref: str | Path) -> tuple[str, str] | None:
    """(name, version) of a registered version ``models:/name/3`` (what :func:`pin` makes of an
    alias), else None."""
    match = _VERSION.fullmatch(str(ref))
    return (match["name"], match["version"]) if match else None


def is_immutable(ref: str | Path) -> bool:
    """True for an MLflow URI whose artifacts cannot move: a registered version, a logged model
    (``models:/m-<id>``) or a run's artifacts. An alias or ``latest`` can point elsewhere tomorrow."""
    return registered_version(ref) is not None or _FIXED_ID.fullmatch(str(ref)) is not None


def alias_uri(name: str, alias: str) -> str:
    """``models:/<name>@<alias>``, the reference a search hands to ``segment``."""
    return f"models:/{name}@{alias}"


def tracking_uri_for(ref: str | Path, tracking_uri: str | None = None) -> str | None:
    """The MLflow server an MLflow reference resolves against (None for a directory)."""
    if not is_mlflow_uri(ref):
        return None
    from segcore.tracking import default_tracking_uri

    return tracking_uri or default_tracking_uri()


def pin(ref: str | Path, tracking_uri: str | None = None) -> str:
    """A directory becomes absolute; ``models:/name@alias`` becomes ``models:/name/<version>``."""
    text = str(ref)
    if not is_mlflow_uri(text):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ModelError(f"--model {text}: no such model directory. Pass a folder written by `gigaseg train` "
                             "or a search, or an MLflow URI such as models:/<name>@champion")
        return str(path.resolve())
    match = _ALIAS.fullmatch(text)
    if not match:
        return text
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri_for(text, tracking_uri)
    try:
        version = MlflowClient(tracking_uri=uri).get_model_version_by_alias(match["name"], match["alias"]).version
    except MlflowException as err:
        raise ModelError(f"--model {text}: not found in the MLflow store {uri} ({err.message.splitlines()[0]}). "
                         "Check the name and alias, or pass --tracking-uri") from None
    pinned = f"models:/{match['name']}/{version}"
    log.info("model %s is %s", text, pinned)
    return pinned


def digest(ref: str | Path) -> str:
    """Identity of a pinned reference: for a directory its config text + weights size and
    first/last MiB; for an MLflow URI the URI itself (registered versions are immutable)."""
    path = Path(ref)
    h = hashlib.sha256()
    if not path.is_dir():
        h.update(str(ref).encode())
        return h.hexdigest()[:16]
    h.update((path / CONFIG_FILE).read_bytes())
    if is_ensemble_dir(path):  # an ensemble: its config plus every member's identity
        for member, _ in read_ensemble_config(path)["members"]:
            h.update(digest(member).encode())
        return h.hexdigest()[:16]
    weights = path / WEIGHTS_FILE
    size = weights.stat().st_size
    h.update(str(size).encode())
    with weights.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def local_dir(ref: str | Path, tracking_uri: str | None = None) -> Path:
    """The model directory behind ``ref`` (downloaded first for an MLflow URI)."""
    if not is_mlflow_uri(ref):
        return Path(ref)
    return download_model_dir(str(ref), tracking_uri=tracking_uri_for(ref, tracking_uri))


def read_card(path: str | Path) -> ModelCard:
    """The card of a model directory, or an ensemble directory's merged card."""
    if is_ensemble_dir(path):
        return read_ensemble_card(path)
    return read_single_card(path)


def load_model_dir(path: str | Path, device: str = "auto", fold_bn: bool = True) -> LoadedModel:
    """Rebuild the model of a local directory, checked card against weights (no pickle); an ensemble
    directory loads as a :class:`segcore.modelio.ensemble.EnsembleModel`. ``fold_bn`` folds BatchNorm
    into the convolutions (inference only, x1.1-1.2 on a CPU; see segcore.models.fold): pass False to
    train or save the loaded model."""
    if is_ensemble_dir(path):
        return load_ensemble_dir(path, device, fold_bn)
    return load_single_dir(path, device, fold_bn)


def load_model(ref: str | Path, device: str = "auto", tracking_uri: str | None = None,
               fold_bn: bool = True) -> LoadedModel:
    """Load a model directory or an MLflow model URI, checked card against weights (``fold_bn``: see
    :func:`load_model_dir`)."""
    loaded = load_model_dir(local_dir(ref, tracking_uri), device, fold_bn)
    loaded.source = str(ref)
    return loaded


# ----------------------------------------------------------------------------- MLflow downloads

MODEL_DIR_ARTIFACT = "model_dir"  # the pyfunc artifact that holds the model directory (segcore.mlflow_model)


def _model_dir_in(local: Path) -> Path:
    """The gigaseg model directory inside a downloaded MLflow model (or ``local`` itself)."""
    if (local / "config.json").is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        artifact = (flavor.get("artifacts") or {}).get(MODEL_DIR_ARTIFACT, {})
        if artifact.get("path") and (local / artifact["path"] / "config.json").is_file():
            return local / artifact["path"]
    found = sorted(p.parent for p in local.rglob("config.json") if (p.parent / "model.safetensors").is_file())
    if not found:
        raise ModelError(f"{local}: no gigaseg model directory (config.json + model.safetensors) inside.")
    return found[0]


CACHE_DIR = "model-cache"  # under GIGASEG_HOME: one copy of each immutable model a process downloaded
_COMPLETE = ".complete"  # written last into a cache entry, before it is renamed into place


def download_model_dir(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Download ``models:/...`` or ``runs:/...`` and return the local gigaseg model directory.

    ``tracking_uri`` defaults to gigaseg's (MLFLOW_TRACKING_URI, else the SQLite store under
    GIGASEG_HOME, where searches register their champions). It is made the
    current URI while downloading, because MLflow 3 resolves logged models behind ``runs:/``
    and ``models:/`` URIs with the default client.

    Without ``dst``, a registered version (``models:/name/3``), a logged model (``models:/m-<id>``,
    what trials and refits log) or a run's artifacts (``runs:/...``) go to
    ``<GIGASEG_HOME>/model-cache`` once and are reused: every segmenter actor of a pipeline loads
    the model, and a fresh temp copy each (43-95 MB) filled a disk. Other URIs (an alias,
    ``latest``) can move, so they go to a temp directory removed when the process exits.
    """
    from segcore.tracking import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    if dst is not None:
        return _download(uri, Path(dst), tracking_uri)
    key = _cache_key(uri, tracking_uri)
    if key is None:
        tmp = Path(tempfile.mkdtemp(prefix="gigaseg-model-"))
        atexit.register(shutil.rmtree, tmp, True)
        return _download(uri, tmp, tracking_uri)
    return _cached(uri, key, tracking_uri)


def _download(uri: str, dst: Path, tracking_uri: str | None) -> Path:
    import mlflow.artifacts
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(tracking_uri) if tracking_uri else nullcontext():
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
    model_dir = _model_dir_in(Path(local))
    log.info("downloaded %s to %s", uri, model_dir)
    return model_dir


def _cache_key(uri: str, tracking_uri: str | None) -> str | None:
    """A key for a URI whose artifacts do not change, else None. A registered version's key holds
    its source and creation time, so a version 3 in a recreated store is not taken for the old one."""
    if not is_immutable(uri):
        return None
    parts = [tracking_uri or "", uri]
    if (name_version := registered_version(uri)) is not None:
        from mlflow import MlflowClient

        version = MlflowClient(tracking_uri=tracking_uri).get_model_version(*name_version)
        parts += [str(version.source), str(version.creation_timestamp)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _cached(uri: str, key: str, tracking_uri: str | None) -> Path:
    """The cache entry ``key`` for ``uri``: downloaded beside it, then renamed into place, so that
    processes downloading the same model at once never see half a copy."""
    from segcore.tracking import gigaseg_home

    root = gigaseg_home() / CACHE_DIR
    entry = root / key
    if not (entry / _COMPLETE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            _download(uri, part, tracking_uri)
            (part / _COMPLETE).write_text(uri + "\n")
            os.rename(part, entry)
        except OSError:
            if not (entry / _COMPLETE).is_file():  # not another process's copy in place: a real failure
                raise
        finally:
            shutil.rmtree(part, ignore_errors=True)
    return _model_dir_in(entry)
