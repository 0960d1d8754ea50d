"""Model references: the one place that knows what ``--model`` may be and how it becomes weights.

A reference is either a gigaseg model directory (``config.json`` + ``model.safetensors``) or an
MLflow model URI: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``runs:/<id>/<path>``.

* :func:`is_mlflow_uri` tells the two apart (a path that exists is always a directory reference);
* :func:`pin` fixes a reference for a whole run: a directory becomes absolute and an alias
  becomes its current version, so every worker loads the same weights even if the alias moves;
* :func:`digest` is a reference's identity for resume signatures;
* :func:`is_immutable` tells the URIs whose download may be cached (:func:`segcore.mlflow_model.download_model_dir`);
* :func:`load_model` rebuilds it anywhere (training, ``evaluate``, ``segment`` actors, the pyfunc).

An MLflow URI is resolved against ``tracking_uri`` (default: gigaseg's, see
:func:`segcore.tracking.default_tracking_uri`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from segcore.errors import ModelError
from segcore.modeldir import CONFIG_FILE, WEIGHTS_FILE, LoadedModel, load_model_dir

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
    from segcore.ensemble import is_ensemble_dir, read_ensemble_config

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
    from segcore.mlflow_model import download_model_dir

    return download_model_dir(str(ref), tracking_uri=tracking_uri_for(ref, tracking_uri))


def load_model(ref: str | Path, device: str = "auto", tracking_uri: str | None = None,
               fold_bn: bool = True) -> LoadedModel:
    """Load a model directory or an MLflow model URI, checked card against weights (``fold_bn``: see
    :func:`segcore.modeldir.load_model_dir`)."""
    loaded = load_model_dir(local_dir(ref, tracking_uri), device, fold_bn)
    loaded.source = str(ref)
    return loaded
