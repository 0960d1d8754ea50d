"""``gigaseg search`` (and ``python -m search``): run, dry-run or resume a search from YAML."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

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
                        help="validate the YAML and the data, plan (as a real run does: a few timed steps), "
                             "print the plan, trial 0, the budget, the dimensions (and grid size); start nothing")


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
    _print_plan(spec, space)
    return 0


def _print_plan(spec: Any, space: Any) -> None:
    """The plan a real run would start from (search/planned.py), trial 0, and the budget's clock."""
    from search.budget import apply_budget, asha_clock
    from search.planned import plan_search, trial0_of

    planned, planned_space, plan = plan_search(spec, space)
    if plan is None:
        print("  plan: disabled (plan.enabled: false); the search starts from base alone")
    else:
        print(f"  plan for {spec.data.train} ({plan.budget_min:g} min per trial), merged under base:")
        for line in plan.lines():
            print(f"    {line}")
    trial0 = trial0_of(planned)
    if trial0 is not None:
        print(f"  trial 0 = the plan: {trial0 or '(no searched dimension takes a planned value)'}")
    budget = planned.budget
    cfg = apply_budget(planned_space.to_train_config(trial0 or {}, source="trial 0"), budget,
                       spec.resources.workers_per_trial)
    unit = f"{budget.unit} {getattr(budget, budget.unit):g}" if budget else "epochs"
    print(f"  budget per trial: {unit} -> epochs {cfg.epochs} x {cfg.data.patches_per_epoch} patches / batch "
          f"{cfg.data.batch_size}" + (f", max_minutes {cfg.max_minutes:g}" if cfg.max_minutes else ""))
    if planned.cluster is not None:
        from search.lanes import trial_share

        c = planned.cluster
        print(f"  cluster: {c.workers} workers x {c.steps_per_worker} steps = {c.workers * c.steps_per_worker} "
              f"worker-steps; trials use up to {trial_share(planned)} of each worker's, the refit the rest")
    if planned.engine == "pbt":
        p = planned.pbt
        print(f"  PBT: {planned.population} members, perturbing every {p.perturbation_interval:.0%} of a trial's "
              f"steps after {p.burn_in:.0%}")
    elif spec.asha.enabled:
        clock = asha_clock(planned, planned_space.to_train_config({}, source="base"), planned_space.max_epochs())
        print(f"  ASHA on {clock.time_attr}: grace_period {clock.grace_period:.4g}, max_t {clock.max_t:.4g} "
              f"({clock.why})")


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
