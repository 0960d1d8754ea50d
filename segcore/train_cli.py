"""``gigaseg train`` and ``gigaseg evaluate``: thin argparse layers over train() and evaluate()."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from segcore.config import TrainConfig, flatten, load_yaml_config, parse_config, read_yaml_mapping, set_dotted
from segcore.errors import ConfigError
from segcore.tracking import log_flat_params, mlflow_ui_command, setup_mlflow

log = logging.getLogger(__name__)

# CLI flag -> dotted config key (flags are shortcuts; --set reaches every key).
FLAG_KEYS = {
    "arch": "model.arch",
    "encoder": "model.encoder",
    "encoder_weights": "model.encoder_weights",
    "freeze": "freeze.strategy",
    "epochs": "epochs",
    "lr": "optim.lr",
    "optimizer": "optim.name",
    "batch_size": "data.batch_size",
    "patch_size": "data.patch_size",
    "patches_per_epoch": "data.patches_per_epoch",
    "augment": "augment.strength",
    "device": "device",
    "seed": "seed",
}


def config_from_args(args: argparse.Namespace, planned: TrainConfig | None = None) -> TrainConfig:
    """YAML file (else the ``planned`` config, if any), then flags, then ``--set key=value``
    overrides; validated once. Only keys written there count as set (``model_fields_set``), so
    e.g. dataset.yaml's ``normalize`` still applies when the YAML does not mention one."""
    data = args_dict(args, planned.model_dump(exclude_unset=True) if planned is not None else {})
    return parse_config(data, TrainConfig, source="gigaseg train")


def args_dict(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (else the YAML file), then the flags and ``--set`` values written into it; unvalidated."""
    if args.config:
        load_yaml_config(args.config)  # validate the file alone first: errors name it, not "gigaseg train"
        data = read_yaml_mapping(args.config)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            set_dotted(data, key, value)
    if args.loss:
        set_dotted(data, "loss.terms", parse_loss_terms(args.loss))
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.weight_decay=0.01")
        set_dotted(data, key, yaml.safe_load(raw))
    return data


def parse_loss_terms(text: str) -> dict[str, float]:
    """``"dice=1,focal=0.5"`` -> ``{"dice": 1.0, "focal": 0.5}``."""
    terms = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        try:
            terms[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise ConfigError(f"--loss {text!r}: weight {weight!r} is not a number; use e.g. dice=1,focal=0.5") from None
    return terms


class MlflowEpochLogger:
    """Epoch callback: per-epoch metrics with ``step`` into the active MLflow run."""

    def __call__(self, report) -> None:
        import mlflow

        if report.rank == 0:
            mlflow.log_metrics({k: float(v) for k, v in report.metrics.items()}, step=report.epoch)


def epochs_flag_wins(cfg: TrainConfig, planned: TrainConfig) -> TrainConfig:
    """A planned run ends with its budget's minutes, unless ``--epochs`` (or ``--set epochs=``) was
    given and ``max_minutes`` was not: then the user's epochs, not the minutes, end it."""
    if planned.max_minutes is None or cfg.epochs == planned.epochs or cfg.max_minutes != planned.max_minutes:
        return cfg
    log.info("epochs %d given: the run trains %d epochs (the plan's max_minutes %g is dropped)", cfg.epochs,
             cfg.epochs, planned.max_minutes)
    return cfg.model_copy(update={"max_minutes": None})


def run_train(args: argparse.Namespace) -> int:
    from segcore.train import train

    plan = None
    if not args.config:  # no recipe given: plan one from the data (segcore.plan), as `gigaseg plan` does
        from segcore.plan import plan_training

        model = args_dict(args, {}).get("model", {})  # the user's model choices: the plan plans for them
        plan = plan_training(args.data, args.budget_min, base={"model": model} if model else None,
                             device=args.device or "auto", until_minutes=True)
        log.info("no --config: training with the plan for %g min (gigaseg plan %s):\n  %s", args.budget_min,
                 args.data, "\n  ".join(plan.lines()))
    cfg = config_from_args(args, plan.config if plan is not None else None)
    if plan is not None:
        cfg = epochs_flag_wins(cfg, plan.config)
    if args.no_mlflow:
        result = train(cfg, args.data, args.out, val_dir=args.val_data)
        _save_plan(plan, result.model_dir)
    else:
        import mlflow

        uri = setup_mlflow(args.experiment)
        log.info("MLflow: %s  (open with: %s)", uri, mlflow_ui_command(uri))
        with mlflow.start_run(run_name=args.run_name):
            log_flat_params(flatten(cfg.model_dump(mode="json")) | {"data": str(args.data)})
            t0 = time.perf_counter()
            result = train(cfg, args.data, args.out, callbacks=[MlflowEpochLogger()], val_dir=args.val_data)
            mlflow.log_metric("train_wall_s", time.perf_counter() - t0)
            _save_plan(plan, result.model_dir)
            mlflow.log_artifacts(str(result.model_dir), artifact_path="model_dir")
    log.info("model directory: %s", result.model_dir)
    print(json.dumps({"model_dir": str(result.model_dir), "val_miou": result.metrics.get("val_miou")}))
    return 0


def _save_plan(plan: Any, model_dir: Path) -> None:
    """The plan a model was trained with, as ``plan.yaml`` beside its config.json."""
    if plan is not None:
        from segcore.plan import PLAN_FILE, write_plan

        log.info("plan written to %s", write_plan(plan, Path(model_dir) / PLAN_FILE))


def run_evaluate(args: argparse.Namespace) -> int:
    from segcore.evaluate import evaluate

    out = args.out or Path(args.model if Path(args.model).is_dir() else ".") / "eval"
    result = evaluate(args.model, args.data, out, n_overlays=args.overlays, device=args.device or "auto")
    print(result.report)
    print(f"metrics.json and overlays written to {result.out_dir}")
    return 0


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model on a dataset folder (logs to MLflow)")
    p.add_argument("--data", required=True, help="dataset folder with images/, masks/, dataset.yaml")
    p.add_argument("--val-data", help="separate validation dataset folder (default: split --data)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--config", help="train.yaml (segcore.config.TrainConfig); default: plan one (gigaseg plan)")
    p.add_argument("--budget-min", type=float, default=5.0,
                   help="without --config: the time budget the plan fits its steps to (default 5)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. optim.lr=3e-4")
    p.add_argument("--loss", help="loss mix, e.g. dice=1,focal=0.5")
    for flag, key in FLAG_KEYS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=_flag_type(key), help=f"sets {key}")
    p.add_argument("--experiment", default="gigaseg-train", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=run_train)


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a model on a labelled dataset folder")
    p.add_argument("--model", required=True, help="model directory or models:/<name>@champion")
    p.add_argument("--data", required=True, help="labelled dataset folder")
    p.add_argument("--out", help="where metrics.json and overlays go (default MODEL/eval)")
    p.add_argument("--overlays", type=int, default=4, help="number of overlay PNGs")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: auto)")
    p.set_defaults(func=run_evaluate)


def _flag_type(key: str):
    """Flag value type from the config field's default (int, float or str)."""
    node: Any = TrainConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return type(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else str
