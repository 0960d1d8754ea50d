"""Every search starts from the plan (issue 9 item 2): ``segcore.plan`` before the first trial.

:func:`plan_search` plans a TrainConfig for the training data (:func:`segcore.plan.plan_training`),
puts it under the YAML's ``base`` (an explicit key in ``base`` wins, key by key inside config
sections; free dicts such as ``loss.terms`` are replaced whole) and makes the planned
configuration trial 0: the searched dimensions' values in the planned config, snapped to the
space, enqueued before any ``seed_configs`` (Optuna ``points_to_evaluate``). The space then varies
around it. The model is the space's and ``base``'s: the plan is made for (and trial 0 takes) their first
listed architecture and encoder, or the architecture the plan prefers for the data where the space lists
it with the plan's kwargs (ResUNet with a full-resolution skip for thin lines); only where neither names
an architecture is the plan's model the base's.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from search.dimensions import Dimension, is_per_arch
from search.space import SearchSpace
from search.spec import SearchSpec

log = logging.getLogger(__name__)

_SKIP = object()  # a planned value the space cannot hold: left to the sampler


def snap(dim: Dimension, choices: tuple[Any, ...], value: Any) -> Any:
    """``value`` made a legal value of ``dim``: itself, the nearest numeric choice, or clamped into
    the range (rounded for ``int``); :data:`_SKIP` when nothing fits."""
    if value is None:
        return _SKIP
    if dim.kind == "choice":
        if value in choices:
            return value
        numeric = [c for c in choices if _number(c)]
        if _number(value) and numeric:
            return min(numeric, key=lambda c: _distance(float(c), float(value)))
        return _SKIP
    if not _number(value):
        return _SKIP
    lo, hi = dim.values
    clamped = min(max(float(value), lo), hi)
    return int(round(clamped)) if dim.kind == "int" else clamped


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _distance(a: float, b: float) -> float:
    """Log distance for positive numbers (lr 2e-3 is nearer 1e-3 than 1e-2), else absolute."""
    return abs(math.log(a) - math.log(b)) if a > 0 and b > 0 else abs(a - b)


def planned_value(space: SearchSpace, dim: Dimension, terms: dict[str, float] | None = None,
                  model: dict[str, Any] | None = None) -> Any:
    """The value ``dim`` has in the plan: a loss term from the plan's ``terms`` when given, else
    from the planned base (a term the mix lacks has weight 0); the architecture and encoder the plan
    planned for (``model``, see :func:`_planning_base`) when given; anything else from the base."""
    field = dim.path.removeprefix("model.")
    if model and dim.path in ("model.arch", "model.encoder") and field in model:
        return model[field]
    if model is not None and dim.path == "model.arch_kwargs" and dim.kind == "choice":
        return _planned_kwargs_choice(dim, model)
    if dim.path.startswith("loss.terms."):
        mix = terms if terms is not None else space.base_value("loss.terms")
        if isinstance(mix, dict):
            return mix.get(dim.path.split(".", 2)[2], 0.0)
    return space.current(dim.key, {})


def _planned_kwargs_choice(dim: Dimension, model: dict[str, Any]) -> Any:
    """The per-architecture kwargs choice that gives the planned architecture the plan's kwargs."""
    from segcore.config import ModelConfig

    arch, kwargs = model.get("arch", ModelConfig().arch), model.get("arch_kwargs", {})
    return next((c for c in dim.values if is_per_arch(c) and c.get(arch) == kwargs), None)


def trial0_point(space: SearchSpace, terms: dict[str, float] | None = None,
                 model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The planned configuration as a seed: searched, applicable dimensions only, values snapped.

    ``terms`` is the plan's loss mix when it was kept out of ``base`` (the space searches it);
    ``model`` the model the plan was made for (its architecture and encoder)."""
    point: dict[str, Any] = {}
    for dim in space.dims:
        if dim.fixed:
            continue
        act = space.active(dim, point)
        searched_arch = space.dim("architecture") is not None and not space.dim("architecture").fixed
        if act is None or (dim.key == "encoder" and searched_arch and "architecture" not in point):
            continue  # encoders depend on the architecture: no planned encoder without a planned one
        value = snap(dim, act.choices, planned_value(space, dim, terms, model))
        if value is not _SKIP:
            point[dim.key] = value
    return point


def _listed(spec: SearchSpec, key: str, path: str) -> list[Any]:
    """The values the space lists for ``key`` (or ``model.<path>``): its choices, or its one fixed value."""
    raw = spec.space.get(key, spec.space.get(f"model.{path}"))
    if raw is None:
        return []
    return list(raw["choice"]) if isinstance(raw, dict) and "choice" in raw else [raw]


def _planning_base(spec: SearchSpec, fp: Any) -> dict[str, Any]:
    """The model the plan times and trial 0 trains: base's, with the first listed architecture,
    encoder and arch_kwargs (those for that architecture); the architecture the plan prefers for this
    data instead (:func:`segcore.plan.decisions.decide_model`: ResUNet with a full-resolution skip for thin lines)
    where the space lists it with the plan's kwargs."""
    from segcore.plan.decisions import decide_model

    model = dict(spec.base.get("model", {}))
    for key, path in (("architecture", "arch"), ("encoder", "encoder"), ("arch_kwargs", "arch_kwargs")):
        if listed := _listed(spec, key, path):
            model[path] = listed[0]
    kwargs, preferred = model.get("arch_kwargs"), decide_model(fp, {})[0]
    if (preferred.get("arch") in _listed(spec, "architecture", "arch") and is_per_arch(kwargs)
            and kwargs.get(preferred["arch"]) == preferred.get("arch_kwargs")):
        model["arch"] = preferred["arch"]
    if is_per_arch(kwargs):
        model["arch_kwargs"] = kwargs.get(model.get("arch", "Unet"), {})
    return {"model": model}


def plan_search(spec: SearchSpec, space: SearchSpace) -> tuple[SearchSpec, SearchSpace, Any]:
    """The spec with the plan under ``base`` and trial 0 first in ``seed_configs``; its space; the plan.

    Without a written ``space:`` the space is the one around the plan (:mod:`search.around`). A
    ``steps: plan`` budget (or cluster) becomes the plan's steps (:func:`search.budget.resolve_plan_steps`).
    With ``plan.enabled: false`` the spec is unchanged but for that (and the plan is None).
    """
    from search.lanes import resolve_plan_steps

    spec, space, plan = _plan_and_seed(spec, space) if spec.plan.enabled else (spec, space, None)
    return resolve_plan_steps(spec, plan), space, plan


def _plan_and_seed(spec: SearchSpec, space: SearchSpace) -> tuple[SearchSpec, SearchSpace, Any]:
    """Plan, put the plan under ``base`` (explicit keys win), the default space if none is written,
    and trial 0 first in ``seed_configs``."""
    from segcore.config import flatten
    from segcore.plan import merge_under, plan_training
    from segcore.plan.fingerprints import fingerprint

    minutes = getattr(spec.budget, "minutes", None)  # a minutes budget: the plan fills a trial's minutes
    threads = max(1, int(spec.resources.cpus_per_trial))  # timed as a trial trains (Ray sets its threads)
    fp = fingerprint(spec.data.train)
    planning = _planning_base(spec, fp)
    plan = plan_training(spec.data.train, minutes or spec.plan.budget_min, base=planning, fp=fp, threads=threads)
    if not spec.space:
        spec = _with_default_space(spec, plan)
        space = SearchSpace.from_spec(spec, spec.name)
    # the model is the space's and base's; the plan's only where neither names an architecture
    planned = {k: v for k, v in plan.overrides.items() if k != "model" or "arch" not in planning["model"]}
    terms = None
    if any(d.path.startswith("loss.terms.") for d in space.dims) and isinstance(planned.get("loss"), dict):
        # the space searches the loss mix: the plan's terms would be added to every sampled mix,
        # so they only set trial 0's values of the searched terms
        terms = planned["loss"].get("terms")
        planned["loss"] = {k: v for k, v in planned["loss"].items() if k != "terms"}
        log.info("plan: loss.terms left to the space (it searches %s)",
                 ", ".join(d.key for d in space.dims if d.path.startswith("loss.terms.")))
    explicit = sorted(set(flatten(spec.base)) & set(flatten(planned)))
    spec = spec.model_copy(update={"base": merge_under(spec.base, planned)})
    space = SearchSpace.from_spec(spec, spec.name)
    for line in plan.lines():
        log.info("plan: %s", line)
    log.info("plan is the search's base%s", f" (explicit base keys win in: {', '.join(explicit)})" if explicit else "")
    if spec.engine == "grid":
        log.info("grid search: the plan is the base, but a grid has no trial 0")
        return spec, space, plan
    point = trial0_point(space, terms if isinstance(terms, dict) else None, plan.overrides["model"])
    log.info("trial 0 = the plan: %s", point or "(no searched dimension takes a planned value)")
    spec = spec.model_copy(update={"seed_configs": [point, *spec.seed_configs]})
    return spec, SearchSpace.from_spec(spec, spec.name), plan


def _with_default_space(spec: SearchSpec, plan: Any) -> SearchSpec:
    """``spec`` with the space around ``plan`` (none was written), logged one dimension a line."""
    from search.around import around_plan
    from segcore.plan.decisions import MIN_PATCH

    around = around_plan(plan.config, plan.fingerprint.min_side, MIN_PATCH, spec.base)
    for key, value in around.items():
        log.info("space around the plan: %s = %s", key, value)
    return spec.model_copy(update={"space": around})


def trial0_of(spec: SearchSpec) -> dict[str, Any] | None:
    """Trial 0's params in a planned spec (what :func:`plan_search` put first in ``seed_configs``;
    ``{}`` when no searched dimension takes a planned value), or None without a plan or on a grid."""
    return spec.seed_configs[0] if spec.plan.enabled and spec.engine != "grid" and spec.seed_configs else None


def log_plan(target: Any, plan: Any) -> None:
    """The plan YAML (with its reasons) as ``plan.yaml`` on the search's parent MLflow run."""
    if plan is None:
        return
    from segcore.plan import plan_yaml

    target.client().log_text(target.parent_run_id, plan_yaml(plan), "plan.yaml")
