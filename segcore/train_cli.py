"""``gigaseg train`` and ``gigaseg evaluate``: thin argparse layers over train() and evaluate()."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from segcore.config import TrainConfig, flatten, load_yaml_config, parse_config, read_yaml_mapping, set_dotted
from segcore.errors import ConfigError
from segcore.tracking import MlflowEpochLogger, log_flat_params, mlflow_ui_command, setup_mlflow

log = logging.getLogger(__name__)

LAUNCHER_GROUP = "gigaseg.train_launchers"  # --workers N: the installed multi-worker launcher (search's: Ray Train)
DEFAULT_BUDGET_MIN = 5.0

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


def epochs_flag_wins(cfg: TrainConfig, planned: TrainConfig) -> TrainConfig:
    """A planned run ends with its budget's minutes, unless ``--epochs`` (or ``--set epochs=``) was
    given and ``max_minutes`` was not: then the user's epochs, not the minutes, end it."""
    if planned.max_minutes is None or cfg.epochs == planned.epochs or cfg.max_minutes != planned.max_minutes:
        return cfg
    log.info("epochs %d given: the run trains %d epochs (the plan's max_minutes %g is dropped)", cfg.epochs,
             cfg.epochs, planned.max_minutes)
    return cfg.model_copy(update={"max_minutes": None})


def steps_flag(cfg: TrainConfig, args: argparse.Namespace, workers: int) -> TrainConfig:
    """``--steps S``: epochs x patches_per_epoch that make S optimizer steps on each worker
    (:func:`segcore.steps.with_steps`, the rounding a search's steps budget uses). Like every flag it
    wins over the config file's (or plan's) epochs, patches and ``max_minutes``, and says so; only a
    ``--set max_minutes=M`` on the same command line stays, as a cap."""
    from segcore.steps import steps_per_epoch, with_steps

    if args.steps is None:
        return cfg
    cfg = with_steps(cfg, args.steps, workers)
    if cfg.max_minutes is not None and "max_minutes" not in command_line(args):
        log.info("--steps %d: the steps end the run (max_minutes %g of the %s is dropped)", args.steps,
                 cfg.max_minutes, "config file" if args.config else "plan")
        cfg = cfg.model_copy(update={"max_minutes": None})
    per_epoch = steps_per_epoch(cfg.data.patches_per_epoch, cfg.data.batch_size, workers)
    log.info("--steps %d: %d epochs x %d patches (batch %d x %d worker(s)) = %d optimizer steps per worker",
             args.steps, cfg.epochs, cfg.data.patches_per_epoch, cfg.data.batch_size, workers, cfg.epochs * per_epoch)
    return cfg


Planner = Callable[..., Any]  # segcore.plan.plan_training's signature (a launcher may run it elsewhere)


def resolve_config(args: argparse.Namespace, planner: Planner | None = None, workers: int = 1) -> tuple[TrainConfig, Any]:
    """The run's TrainConfig and its plan (None with ``--config``): the plan for ``--budget-min`` on
    ``workers`` workers (made by ``planner``, default :func:`segcore.plan.plan_training`), then the
    config file, flags and ``--set`` (:func:`config_from_args`), then ``--epochs`` / ``--steps``."""
    plan = None
    if not args.config:  # no recipe given: plan one from the data (segcore.plan), as `gigaseg plan` does
        from segcore.plan import plan_training

        model = args_dict(args, {}).get("model", {})  # the user's model choices: the plan plans for them
        plan = (planner or plan_training)(args.data, budget_minutes(args), base={"model": model} if model else None,
                                          device=args.device or "auto", until_minutes=True, workers=workers)
        log.info("no --config: training with the plan for %g min (gigaseg plan %s):\n  %s", budget_minutes(args),
                 args.data, "\n  ".join(plan.lines()))
    cfg = config_from_args(args, plan.config if plan is not None else None)
    if plan is not None:
        cfg = epochs_flag_wins(cfg, plan.config)
    return steps_flag(cfg, args, workers), plan


def budget_minutes(args: argparse.Namespace) -> float:
    return DEFAULT_BUDGET_MIN if args.budget_min is None else args.budget_min


def check_train_flags(args: argparse.Namespace) -> None:
    """Refuse flags that cannot be honoured together (one line naming the flag and the fix)."""
    ray_only = {"address": "--address", "cpus_per_worker": "--cpus-per-worker", "gpus_per_worker": "--gpus-per-worker",
                "storage": "--storage", "max_failures": "--max-failures", "resume": "--resume"}
    if args.workers is None:
        for dest, flag in ray_only.items():
            if getattr(args, dest) not in (None, False):
                raise ConfigError(f"{flag} applies to a multi-worker run; add --workers N (1 for one Ray Train "
                                  "worker) or drop it")
    elif args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: needs at least 1 worker")
    if args.config and args.budget_min is not None:
        raise ConfigError(f"--budget-min {args.budget_min:g} sizes a plan, and --config {args.config} replaces the "
                          "plan; drop one of them")
    if args.steps is None:
        return
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: needs at least 1 optimizer step")
    written = command_line(args)
    clash = [key for key in ("epochs", "data.patches_per_epoch") if key in flatten(written)]
    if clash:
        raise ConfigError(f"--steps {args.steps} sets epochs and data.patches_per_epoch itself; drop "
                          f"{' and '.join(clash)} from the command line, or drop --steps")


def command_line(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys written by flags and ``--set`` (not by the config file)."""
    return args_dict(argparse.Namespace(**{**vars(args), "config": None}), {})


def train_launcher() -> Callable[[argparse.Namespace], int]:
    """The multi-worker launcher for ``--workers`` (entry point group :data:`LAUNCHER_GROUP`; gigaseg's
    own is ``search.train_workers:run``, on Ray Train), so segcore itself never imports Ray or search."""
    found = {ep.name: ep for ep in entry_points(group=LAUNCHER_GROUP)}
    if not found:
        raise ConfigError(f"--workers: no multi-worker launcher is installed (entry point group {LAUNCHER_GROUP}); "
                          "reinstall gigaseg with `pip install -e .`, or drop --workers")
    return found.get("ray", next(iter(found.values()))).load()


@contextmanager
def mlflow_run(experiment: str, run_name: str | None, params: dict[str, Any] | None, run_id: str | None = None,
               uri: str | None = None) -> Iterator[tuple[str, str]]:
    """The training run in MLflow (``run_id``: reopen it), announced; yields (tracking URI, run id)."""
    import mlflow

    uri = setup_mlflow(experiment, uri)
    log.info("MLflow: %s  (open with: %s)", uri, mlflow_ui_command(uri))
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        if params is not None:
            log_flat_params(params)
        yield uri, run.info.run_id


def close_run(model_dir: Path, wall_s: float) -> None:
    """The active run's last entries: training wall time and the model directory as artifacts."""
    import mlflow

    mlflow.log_metric("train_wall_s", wall_s)
    mlflow.log_artifacts(str(model_dir), artifact_path="model_dir")


def announce_model(model_dir: Path, metrics: dict[str, float]) -> int:
    log.info("model directory: %s", model_dir)
    print(json.dumps({"model_dir": str(model_dir), "val_miou": metrics.get("val_miou")}))
    return 0


def run_train(args: argparse.Namespace) -> int:
    """``gigaseg train``: in this process, or on ``--workers N`` through the installed launcher."""
    check_train_flags(args)
    if args.workers is not None:
        return train_launcher()(args)
    from segcore.train import train

    cfg, plan = resolve_config(args)
    if args.no_mlflow:
        result = train(cfg, args.data, args.out, val_dir=args.val_data)
        save_plan(plan, result.model_dir)
        return announce_model(result.model_dir, result.metrics)
    params = flatten(cfg.model_dump(mode="json")) | {"data": str(args.data)}
    with mlflow_run(args.experiment, args.run_name, params) as (uri, run_id):
        t0 = time.perf_counter()
        result = train(cfg, args.data, args.out, callbacks=[MlflowEpochLogger(uri, run_id)], val_dir=args.val_data)
        save_plan(plan, result.model_dir)
        close_run(result.model_dir, time.perf_counter() - t0)
    return announce_model(result.model_dir, result.metrics)


def save_plan(plan: Any, model_dir: Path) -> None:
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
    p.add_argument("--budget-min", type=float,
                   help=f"without --config: the time budget the plan fits its steps to (default {DEFAULT_BUDGET_MIN:g})")
    p.add_argument("--steps", type=int, help="optimizer steps per worker: sets epochs x patches_per_epoch (the "
                   "rounding of a search's steps budget); with a plan, the steps, not the minutes, end the run")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. optim.lr=3e-4")
    p.add_argument("--loss", help="loss mix, e.g. dice=1,focal=0.5")
    for flag, key in FLAG_KEYS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=_flag_type(key), help=f"sets {key}")
    p.add_argument("--experiment", default="gigaseg-train", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    add_worker_arguments(p)
    p.set_defaults(func=run_train)


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """``--workers N`` and the flags of a multi-worker run (docs: README, *Train on a cluster*)."""
    g = p.add_argument_group("data-parallel training on Ray Train (--workers N)")
    g.add_argument("--workers", type=int, help="train on N data-parallel workers (Ray Train DDP; gloo on CPU, NCCL "
                   "on GPU); the plan scales patches and lr for N")
    g.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a private local Ray)")
    g.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default 1)")
    g.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 0: CPU training, gloo)")
    g.add_argument("--storage", help="where the run's checkpoints go, shared by all nodes on a cluster (a path or "
                   "URI; default GIGASEG_HOME/train-runs)")
    g.add_argument("--max-failures", type=int, help="times a lost worker is replaced and the run resumed from its "
                   "last epoch (default 3)")
    g.add_argument("--resume", action="store_true", help="continue the stopped --workers run that writes --out")


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
