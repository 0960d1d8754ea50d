"""``gigaseg search`` (and ``python -m search``): run, dry-run or resume a search from YAML."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Search architectures, encoders, losses and training settings with Ray Tune + Optuna, "
    "tracked in MLflow. Starts a local Ray unless RAY_ADDRESS is set (as in `ray job submit`)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", type=Path, metavar="YAML", help="search config (see docs/search.md)")
    what.add_argument("--resume", type=Path, metavar="PATH",
                      help="continue a stopped search from its folder (<storage_path>/<name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the YAML and the data, print the dimensions (and grid size), start nothing")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point ``gigaseg.commands: search``."""
    parser = subparsers.add_parser("search", help="hyperparameter/architecture search", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def _dry_run(config: Path) -> int:
    from search.preflight import check_search_data
    from search.space import SearchSpace
    from search.spec import load_search_spec

    spec = load_search_spec(config)
    space = SearchSpace.from_spec(spec, str(config))
    checks = check_search_data(space, spec.data.train, spec.data.val)  # the same data check as a real run
    print(f"{config}: valid. engine={spec.engine} metric={spec.metric} ({spec.mode})")
    for c in checks:
        print(f"  data {c.folder}: {c.samples} samples, {c.channels} channel(s), classes {', '.join(c.classes)}")
    for dim in space.dims:
        print(f"  {dim.key:<16} -> {dim.path:<24} {dim.kind:<10} {list(dim.values)}")
    for arch, encoders in space.encoders_for.items():
        print(f"  valid encoders for {arch}: {', '.join(encoders)}")
    if spec.engine == "grid":
        print(f"  grid: {len(space.grid(spec.seed))} configurations")
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """Run the command. User errors (bad YAML, bad data) raise a UserError (exit 2 in the CLI);
    a search that registers no champion (no trial completed, or stopped on a repeated error)
    returns 1 after logging why."""
    from search.runner import resume_search, run_search
    from search.spec import load_search_spec

    if args.resume:
        outcome = resume_search(args.resume)
    elif args.dry_run:
        return _dry_run(args.config)
    else:
        spec = load_search_spec(args.config)
        outcome = run_search(spec, spec_yaml=args.config.read_text())
    print(json.dumps({
        "search": outcome.name, "path": outcome.path, "parent_run_id": outcome.parent_run_id,
        "counts": outcome.counts, "best_trial": outcome.best_trial_id, "best_value": outcome.best_value,
        "best_params": outcome.best_params, "champion": outcome.champion_uri, "failure": outcome.failure,
    }, indent=2, default=str))
    if outcome.failure:  # non-zero, so `ray job submit` and schedulers report the search as FAILED
        log.error("search %s failed: %s", outcome.name, outcome.failure)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m search``: the same arguments, logging and errors as ``gigaseg search``."""
    from segcore.cli import module_main

    return module_main("python -m search", DESCRIPTION, add_arguments, run_cli, argv)
