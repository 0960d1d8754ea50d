"""Self-configuration before training or search (nnU-Net style): ``gigaseg plan DATA``.

:func:`plan_training` fingerprints a dataset (:mod:`.fingerprints`), turns it into a
:class:`TrainConfig` with one stated reason per decision (:mod:`.decisions`: patch, batch, loss,
class balance, normalisation, schedule) and fits the step count to a time budget on this
machine's measured speed (:mod:`.timing`). :func:`write_plan` writes the plan as a YAML that
``gigaseg train --config`` accepts, the reasons as comments.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segcore.config import TrainConfig, load_yaml_config, parse_config
from segcore.data.errors import DataError
from segcore.data.spec import load_spec
from segcore.plan.decisions import Decision, apply_fit, data_decisions, decide_model, decide_workers
from segcore.plan.fingerprints import MAX_PIXELS, Fingerprint, fingerprint
from segcore.plan.timing import Speed, bound_by_minutes, decide_steps, fit_to_steps, timed_speed

PLAN_FILE = "plan.yaml"
# Free dicts inside a TrainConfig are values (a base's loss.terms replaces the plan's mix whole).
_SECTIONS = {"model", "loss", "freeze", "augment", "data", "optim", "normalize", "loss.adversarial"}


@dataclass
class Plan:
    """A planned TrainConfig, the partial dict the plan decided, the fingerprint and the reasons."""

    config: TrainConfig
    overrides: dict[str, Any]
    fingerprint: Fingerprint
    decisions: list[Decision]
    speed: Speed | None = None
    budget_min: float = 5.0
    base: dict[str, Any] = field(default_factory=dict)  # the partial config planned on top of

    def lines(self) -> list[str]:
        """``what = value: reason``, one per decision."""
        return [f"{d.what} = {d.value}: {d.reason}" for d in self.decisions]


def _fit_steps(over: dict[str, Any], decisions: list[Decision], base: dict[str, Any], fp: Fingerprint,
               budget_min: float, multiple: int, timing: tuple[int, str, int, int | None]) -> Speed:
    """Time the planned steps, refit patch x batch where the budget holds too few steps
    (:func:`fit_to_steps`), and put the epochs x patches that fill ``budget_min`` into ``over``.
    ``timing`` = (classes, device, steps to time, torch threads)."""
    classes, dev, time_steps, threads = timing
    cfg = parse_config(_merge(base, over), TrainConfig, source="plan")
    speed = timed_speed(cfg, fp, classes, dev, time_steps, threads)
    fitted = fit_to_steps(fp, cfg, speed, budget_min, multiple)
    if fitted is not None:
        apply_fit(over, decisions, fitted, multiple)
        cfg = parse_config(_merge(base, over), TrainConfig, source="plan")
        speed = timed_speed(cfg, fp, classes, dev, time_steps, threads)
    steps, steps_why = decide_steps(fp, cfg, speed, budget_min)
    over["epochs"] = steps["epochs"]
    over["data"]["patches_per_epoch"] = steps["patches_per_epoch"]
    decisions.append(Decision("epochs x data.patches_per_epoch", f"{steps['epochs']} x {steps['patches_per_epoch']}",
                              steps_why))
    return speed


def plan_training(data_dir: str | Path, budget_min: float = 5.0, *, base: dict[str, Any] | None = None,
                  device: str = "auto", fp: Fingerprint | None = None, time_steps: int = 4,
                  threads: int | None = None, until_minutes: bool = False, workers: int = 1) -> Plan:
    """Fingerprint ``data_dir`` (unless given) and plan a TrainConfig for ``budget_min`` minutes.

    ``threads``: time the steps with this many torch CPU threads (a search trial's CPUs), not the
    process's; ignored on a GPU.

    ``until_minutes``: the run stops when the budget's minutes end (:func:`bound_by_minutes`), not
    after the epochs the timing planned (``gigaseg train --budget-min``, ``gigaseg plan``; a search
    sets its trials' minutes itself).

    ``workers``: the run trains on this many data-parallel workers, each timed as one
    (:func:`decide_workers`: same per-worker batch and steps, N x the patches, lr x sqrt(N)).

    ``base`` (a partial TrainConfig dict) supplies the model to plan for; the plan's own keys
    are in ``Plan.overrides`` (what a search merges under its explicit ``base``).
    """
    from segcore.device import pick_device
    from segcore.models.validity import input_multiple

    fp = fp or fingerprint(data_dir)
    spec = load_spec(data_dir)
    model, model_decision = decide_model(fp, dict((base or {}).get("model", {})))
    given, base = dict(base or {}), {**(base or {}), "model": model}
    base_cfg = parse_config(base, TrainConfig, source="plan base")
    dev = str(pick_device(device if device != "auto" else base_cfg.device))
    m = base_cfg.model
    multiple = input_multiple(m.arch, m.encoder, m.arch_kwargs)
    over, decisions = data_decisions(fp, spec, m, multiple, dev)
    decisions[:0] = [model_decision] if model_decision else []
    speed = _fit_steps(over, decisions, base, fp, budget_min, multiple,
                       (max(len(spec.class_names), 2), dev, time_steps, threads))
    if workers > 1:
        decisions.append(decide_workers(over, workers))
    if until_minutes:
        decisions.append(bound_by_minutes(over, budget_min))
    cfg = parse_config(_merge(base, over), TrainConfig, source="plan")
    return Plan(cfg, over, fp, decisions, speed, budget_min, given)


def merge_under(explicit: dict[str, Any], planned: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``planned`` with every key of ``explicit`` on top, key by key inside config sections."""
    out = dict(planned)
    for key, value in explicit.items():
        path = f"{prefix}{key}"
        if path in _SECTIONS and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_under(value, out[key], path + ".")
        else:
            out[key] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """The plan on top of the model base (planning itself decides the listed keys)."""
    return merge_under(over, base)


def plan_yaml(plan: Plan) -> str:
    """The plan as a TrainConfig YAML; the fingerprint and each decision's reason as comments."""
    head = [f"# gigaseg plan {plan.fingerprint.data_dir} (budget {plan.budget_min:g} min)"]
    head += [f"#   {line}" for line in plan.fingerprint.summary().splitlines()]
    head += [f"# {line}" for line in plan.lines()]
    body = yaml.safe_dump(_merge(plan.base, plan.overrides), sort_keys=False, default_flow_style=None, width=100)
    return "\n".join(head) + "\n" + body


def write_plan(plan: Plan, path: str | Path) -> Path:
    """Write :func:`plan_yaml` to ``path`` and check it loads back as the same TrainConfig."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan_yaml(plan))
    if load_yaml_config(path) != plan.config:
        raise DataError(path, "the written plan does not load back as the planned config", "report this bug")
    return path


def run_plan(args: argparse.Namespace) -> int:
    """``gigaseg plan DATA``: print the fingerprint and the plan, write the YAML."""
    base = load_yaml_config(args.base).model_dump(mode="json", exclude_unset=True) if args.base else None
    fp = fingerprint(args.data, max_pixels=args.max_pixels)
    plan = plan_training(args.data, args.budget_min, base=base, device=args.device, fp=fp, until_minutes=True)
    out = write_plan(plan, args.out or Path(args.data) / PLAN_FILE)
    print(fp.summary())
    print(f"plan for {args.budget_min:g} min:")
    for line in plan.lines():
        print(f"  {line}")
    print(f"written to {out} (train with: gigaseg train --data {args.data} --config {out} --out MODEL)")
    return 0


def register_plan(sub: argparse._SubParsersAction) -> None:
    """Entry point ``gigaseg.commands: plan``."""
    p = sub.add_parser("plan", help="fingerprint a dataset and plan a training config for a time budget")
    p.add_argument("data", help="dataset folder with images/, masks/, dataset.yaml")
    p.add_argument("--out", type=Path, help=f"plan YAML to write (default DATA/{PLAN_FILE})")
    p.add_argument("--budget-min", type=float, default=5.0, help="training time budget in minutes (default 5)")
    p.add_argument("--base", help="train.yaml whose model (and other keys) the plan starts from")
    p.add_argument("--device", default="auto", help="device to time steps on (default: auto)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="image px the fingerprint reads at most")
    p.set_defaults(func=run_plan)
