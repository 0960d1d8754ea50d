"""From completed trials to a registered champion: ensemble, calibration, TTA, a gated alias.

After the search (driver side, :func:`search.summary.summarize`):

1. every completed trial's logged model is downloaded and predicted, tiled as ``segment`` tiles,
   on the validation split the trials used (``data.val``, else ``segcore.train.split_samples`` of
   ``data.train`` with the best model's ``val_fraction`` and seed), bounded to
   ``champion.val_pixels``;
2. greedy ensemble selection (:func:`segcore.modelio.ensemble.greedy_select`) over those probabilities;
   the ensemble becomes the candidate only if it beats the best single model;
3. one temperature is fitted on validation (``segcore.calibration``) and stored on the card;
4. flip TTA is scored on validation and set on the card (``extra["tta"]``) when it gains at least
   :data:`TTA_MIN_GAIN` mIoU (it costs 4x the forward time);
5. :func:`gate_and_register`: the candidate is logged on the parent run and registered; the alias
   moves only if it beats the model the alias points at on the same held-out data (``data.test``,
   else validation); otherwise it gets the alias ``challenger``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag

from search.mlflow_runs import MlflowTarget, trial_model_uri
from segcore.calibration import calibrate_model, log_of, set_card_extra, tiled_proba
from segcore.data import Sample, load_samples, load_spec
from segcore.halo import MEASURED_ON_KEY, loaded_halo
from segcore.metrics import ConfusionMatrix
from segcore.modelio.card import TTA_KEY
from segcore.modelio.ensemble import greedy_select, member_halo, miou_of, save_ensemble_dir
from segcore.modelio.folder import LoadedModel
from segcore.modelio.ref import load_model, local_dir, read_card
from segcore.tiling import FLIPS, round_up

log = logging.getLogger(__name__)
TTA_MIN_GAIN = 0.005  # validation mIoU flip TTA must gain to be on by default: it costs 4x the forward time
ENSEMBLE_MIN_GAIN = 0.005  # ... and an ensemble over its best member: it costs one forward per member

CHALLENGER = "challenger"


@dataclass(frozen=True)
class HeldOut:
    """Labelled images to score on: a dataset folder, optionally only some image names, bounded in px."""

    data_dir: Path
    names: tuple[str, ...] | None = None
    max_pixels: int = 2_000_000
    what: str = "validation"


@dataclass
class GateResult:
    """What :func:`gate_and_register` did: the version registered, its alias and both scores."""

    uri: str
    version: str
    alias: str
    promoted: bool
    new_score: float
    old_score: float | None = None


@dataclass
class Candidate:
    """One completed trial's model on this machine, with its validation probabilities."""

    trial_id: str
    model_dir: Path
    proba: np.ndarray | None = None  # (K, P) float16 over the bounded validation pixels
    seconds: float = 0.0  # forward time over those pixels
    score: float = float("nan")


@dataclass
class ChampionReport:
    """What was chosen and why; logged on the parent run."""

    model_dir: Path
    members: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    best_single: float = float("nan")
    score: float = float("nan")
    throughput_cost: float = 1.0
    calibration: dict[str, float] = field(default_factory=dict)
    tta_gain: float | None = None
    tta: bool = False  # flip TTA on the card: every forward becomes len(FLIPS)

    @property
    def forward_cost(self) -> float:
        """Forward passes per tile against one plain model: ensemble members x TTA flips."""
        return self.throughput_cost * (len(FLIPS) if self.tta else 1)


def validation_heldout(card_dir: Path, train_dir: Path, val_dir: Path | None, max_pixels: int) -> HeldOut:
    """The validation split trials used: ``val_dir``, else the images ``split_samples`` held out."""
    if val_dir is not None:
        return HeldOut(Path(val_dir), None, max_pixels)
    from segcore.train import split_samples

    card = read_card(card_dir)
    samples = load_samples(train_dir, load_spec(train_dir).model_copy(update={"normalize": card.train.normalize}))
    _, val = split_samples(samples, card.train.data.val_fraction, card.train.seed)
    return HeldOut(Path(train_dir), tuple(s.name for s in val), max_pixels)


def heldout_samples(heldout: HeldOut, loaded: LoadedModel) -> list[Sample]:
    """The held-out images normalised as ``loaded`` was trained, cropped to ``max_pixels`` in all."""
    spec = load_spec(heldout.data_dir).model_copy(update={"normalize": loaded.card.train.normalize})
    samples = [s for s in load_samples(heldout.data_dir, spec) if heldout.names is None or s.name in heldout.names]
    out, left = [], heldout.max_pixels
    for s in samples:
        if left <= 0:
            break
        h, w = s.mask.shape
        rows = min(h, max(1, left // w))
        out.append(Sample(name=s.name, image=s.image[:, :rows], mask=s.mask[:rows], source=s.source))
        left -= rows * w
    return out


def tiling_for(loaded: LoadedModel) -> tuple[int, int]:
    """(tile, halo) as ``segment`` chooses them by default: the card's halo and validation tile,
    rounded up to the size multiple."""
    m = loaded.size_multiple
    return round_up(loaded.card.train.data.val_tile, m), round_up(member_halo(loaded.card), m)


def score_model(ref: str | Path, heldout: HeldOut, tracking_uri: str | None = None,
                tta: bool | None = None) -> float:
    """Held-out mIoU of a model reference, tiled as ``segment`` predicts (the card's TTA choice
    unless ``tta`` is given; labels via ``segcore.evaluate.predict_labels`` without TTA)."""
    from segcore.evaluate import predict_labels

    loaded = load_model(ref, device="cpu", tracking_uri=tracking_uri)
    tta = bool(loaded.card.extra.get(TTA_KEY)) if tta is None else tta
    tile, halo = tiling_for(loaded)
    cm = ConfusionMatrix(loaded.num_classes)
    for s in heldout_samples(heldout, loaded):
        if tta:
            pred = loaded.labels_from_proba(tiled_proba(loaded, s.image, tile, halo, tta=True))
        else:
            pred = predict_labels(loaded, s.image, tile, halo, loaded.card.train.data.batch_size)
        cm.update(pred, s.mask)
    return float(cm.compute()["miou"])


def current_version(client: Any, name: str, alias: str) -> str | None:
    """The version ``name@alias`` points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def log_on_parent(target: MlflowTarget, model_dir: Path, name: str) -> str:
    """Log ``model_dir`` as a pyfunc model on the parent run and register it; returns the version."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from segcore.mlflow_model import log_model_dir

    with _use_tracking_uri(target.uri), mlflow.start_run(run_id=target.parent_run_id):
        info = log_model_dir(model_dir, name="champion_model", registered_model_name=name)
    return str(info.registered_model_version)


def gate_and_register(target: MlflowTarget, model_dir: Path, name: str, alias: str, heldout: HeldOut,
                      gate: bool = True) -> GateResult:
    """Register ``model_dir``; point ``alias`` at it only if ``name@alias`` does not exist yet, or
    the new model scores higher on ``heldout`` than the one it points at. Otherwise the new version
    gets the alias ``challenger``. Both scores are logged (and put on the parent run)."""
    client = target.client()
    old_version = current_version(client, name, alias)
    new_score = score_model(model_dir, heldout)
    old_score = score_model(f"models:/{name}/{old_version}", heldout, target.uri) if old_version else None
    version = log_on_parent(target, model_dir, name)
    promoted = old_score is None or not gate or new_score > old_score
    chosen = alias if promoted else CHALLENGER
    client.set_registered_model_alias(name, chosen, version)
    if old_score is None:
        log.info("registered %s version %s as @%s (%s mIoU %.4f; no previous @%s)", name, version, alias,
                 heldout.what, new_score, alias)
    else:
        log.info("%s version %s: %s mIoU %.4f vs @%s (version %s) %.4f -> %s", name, version, heldout.what,
                 new_score, alias, old_version, old_score,
                 f"@{alias} moves to it" if promoted else f"@{alias} stays; registered as @{CHALLENGER}")
    metrics = {"gate_new_score": new_score, **({"gate_champion_score": old_score} if old_score is not None else {})}
    client.log_batch(target.parent_run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()],
                     tags=[RunTag("gigaseg.gate", f"{'promoted' if promoted else 'challenger'} version {version}")])
    return GateResult(f"models:/{name}@{chosen}", version, chosen, promoted, new_score, old_score)


# ----------------------------------------------------------------------------- after the search


def trial_models(target: MlflowTarget, trial_ids: list[str]) -> list[Candidate]:
    """The completed trials' logged model directories, downloaded here (trials without one skipped)."""
    uris = {trial_id: trial_model_uri(target, trial_id) for trial_id in trial_ids}
    return [Candidate(trial_id, local_dir(uri, target.uri)) for trial_id, uri in uris.items() if uri]


def predict_candidates(cands: list[Candidate], heldout: HeldOut) -> np.ndarray:
    """Fill each candidate's validation log-probabilities (float16), forward time and mIoU; returns
    the (P,) labels (the same pixels for every candidate)."""
    labels = None
    for c in cands:
        loaded = load_model(c.model_dir, device="cpu")
        samples = heldout_samples(heldout, loaded)
        tile, halo = tiling_for(loaded)
        start = time.perf_counter()
        logps = [tiled_proba(loaded, s.image, tile, halo, log=True) for s in samples]
        c.seconds = time.perf_counter() - start
        c.proba = np.concatenate([p.reshape(p.shape[0], -1) for p in logps], axis=1).astype(np.float16)
        labels = np.concatenate([s.mask.reshape(-1) for s in samples]) if labels is None else labels
        c.score = miou_of(c.proba, labels, _threshold(loaded))
        log.info("trial %s: validation mIoU %.4f (tiled, %.1f s forward)", c.trial_id, c.score, c.seconds)
    return labels


def _threshold(loaded: LoadedModel) -> float | None:
    """The binary threshold on log p1 when scoring log-probabilities, else None (argmax)."""
    return math.log(loaded.card.train.binary_threshold) if loaded.binary else None


def choose_candidate(cands: list[Candidate], labels: np.ndarray, k: int, workdir: Path) -> ChampionReport:
    """Greedy ensemble selection; the ensemble wins only when it beats the best single model by
    :data:`ENSEMBLE_MIN_GAIN` (each member costs a forward pass)."""
    loaded = load_model(cands[0].model_dir, device="cpu")
    threshold = loaded.card.train.binary_threshold if loaded.binary else None
    sel = greedy_select([np.exp(c.proba.astype(np.float32)) for c in cands], labels, k=k, threshold=threshold)
    best = int(np.argmax(sel.single_scores))
    if len(sel.members) > 1 and sel.gain >= ENSEMBLE_MIN_GAIN:
        trials = [cands[i].trial_id for i in sel.members]
        path = save_ensemble_dir(workdir / "ensemble", [cands[i].model_dir for i in sel.members], sel.weights,
                                 metrics={"val_miou": sel.score}, extra={"trials": trials})
        cost = sum(cands[i].seconds for i in sel.members) / max(cands[best].seconds, 1e-9)
        log.info("ensemble of %s (weights %s): validation mIoU %.4f vs best single %.4f (gain %+.4f) at %.1fx the "
                 "forward time", trials, [round(w, 3) for w in sel.weights], sel.score, sel.best_single, sel.gain, cost)
        return ChampionReport(path, trials, sel.weights, sel.best_single, sel.score, cost)
    path = Path(shutil.copytree(cands[best].model_dir, workdir / "single"))
    log.info("ensemble selection: no gain of %s or more over the best single model (trial %s, validation mIoU "
             "%.4f; the ensemble's gain %+.4f); it stays the champion", ENSEMBLE_MIN_GAIN, cands[best].trial_id,
             sel.best_single, sel.gain)
    return ChampionReport(path, [cands[best].trial_id], [1.0], sel.best_single, sel.best_single, 1.0)


def _candidate_logp(report: ChampionReport, cands: list[Candidate]) -> np.ndarray:
    """Validation log-probabilities of the chosen model, from the cached members'."""
    by_id = {c.trial_id: c for c in cands}
    mean = sum(w * np.exp(by_id[t].proba.astype(np.float32)) for t, w in zip(report.members, report.weights,
                                                                            strict=True))
    return log_of(mean)


def calibrate_and_tta(report: ChampionReport, cands: list[Candidate], labels: np.ndarray, heldout: HeldOut,
                      spec_champion: Any) -> None:
    """Fit the temperature (card) on validation, then keep flip TTA on the card if it gains."""
    if spec_champion.calibrate:
        loaded = load_model(report.model_dir, device="cpu")
        result = calibrate_model(loaded, report.model_dir, [_candidate_logp(report, cands)], [labels])
        if result is not None:
            report.calibration = {"temperature": result.temperature, "ece_before": result.ece_before,
                                  "ece_after": result.ece_after}
    if spec_champion.tta == "auto":
        plain, flipped = score_model(report.model_dir, heldout, tta=False), score_model(report.model_dir, heldout,
                                                                                        tta=True)
        report.tta_gain = flipped - plain
        pays = report.tta_gain >= TTA_MIN_GAIN
        if pays:
            set_card_extra(report.model_dir, TTA_KEY, True)
            report.tta = True
        log.info("flip TTA: validation mIoU %.4f with, %.4f without (%+.4f) -> %s", flipped, plain, report.tta_gain,
                 "on by default (card), at 4x the forward time" if pays
                 else f"off (a gain below {TTA_MIN_GAIN} does not pay for 4x the forward time)")


def measure_champion_halo(model_dir: Path, heldout: HeldOut) -> None:
    """Trials skip the halo measurement (it cost ~20 % of a short trial); the chosen model is
    measured once here, on whole validation images, and the card gets its exact halo."""
    loaded = load_model(model_dir, device="cpu")
    if MEASURED_ON_KEY in loaded.card.extra:  # the base config asked every trial to measure it
        return
    spec = load_spec(heldout.data_dir).model_copy(update={"normalize": loaded.card.train.normalize})
    images = [s.image for s in load_samples(heldout.data_dir, spec)
              if heldout.names is None or s.name in heldout.names]
    for key, value in loaded_halo(loaded, images).items():
        set_card_extra(model_dir, key, value)


def log_report(target: MlflowTarget, report: ChampionReport) -> None:
    """Members, weights, gain and costs as params/metrics on the parent run, and ``champion.json``."""
    client, run_id, now = target.client(), target.parent_run_id, int(time.time() * 1000)
    metrics = {"ensemble_val_miou": report.score, "best_single_val_miou": report.best_single,
               "ensemble_gain": report.score - report.best_single, "ensemble_members": float(len(report.members)),
               "ensemble_throughput_cost": report.throughput_cost, "champion_forward_cost": report.forward_cost,
               **{f"calibration_{k}": v for k, v in report.calibration.items()},
               **({"tta_gain": report.tta_gain} if report.tta_gain is not None else {})}
    params = {"ensemble.members": ",".join(report.members), "ensemble.weights": ",".join(f"{w:.4f}" for w in
                                                                                         report.weights)}
    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    except Exception as exc:  # a resumed search logged other values before
        log.warning("ensemble params not logged on the parent run: %s", exc)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    payload = {**params, **metrics, "model_dir_config": json.loads((report.model_dir / "config.json").read_text())}
    client.log_text(run_id, json.dumps(payload, indent=2, default=str), "champion.json")


def finish_champion(spec: Any, target: MlflowTarget, trial_ids: list[str],
                    extra: list[Candidate] | None = None) -> str | None:
    """Ensemble, calibrate, TTA and gate-register the completed trials (best first) and ``extra``
    candidates (a kept refit, search/refit.py); the alias URI the new model got, or None when no
    trial logged a model."""
    cands = trial_models(target, trial_ids) + list(extra or [])
    if not cands:
        log.warning("no completed trial has a logged model; nothing registered")
        return None
    val = validation_heldout(cands[0].model_dir, spec.data.train, spec.data.val, spec.champion.val_pixels)
    labels = predict_candidates(cands, val)
    with tempfile.TemporaryDirectory(prefix="gigaseg-champion-") as tmp:
        report = choose_candidate(cands, labels, spec.champion.ensemble_size, Path(tmp))
        calibrate_and_tta(report, cands, labels, val, spec.champion)
        measure_champion_halo(report.model_dir, val)
        log_report(target, report)
        test = HeldOut(spec.data.test, None, spec.champion.val_pixels, "test") if spec.data.test else val
        result = gate_and_register(target, report.model_dir, spec.mlflow.registered_model_name, spec.mlflow.alias,
                                   test, gate=spec.champion.gate)
    return result.uri
