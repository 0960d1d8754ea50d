"""The search YAML: one pydantic model per section, unknown keys refused.

``load_search_spec(path)`` parses and validates everything (sections, every dimension of the
space, seed configurations, data folders) before Ray or MLflow start; every error names the
YAML key that is wrong. The dimension syntax itself lives in :mod:`search.space`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from search.budget import Budget, MinutesBudget, PlanSteps, StepsBudget, check_plan_steps
from search.space import SearchSpace
from segcore import tracking
from segcore.config import ConfigError, Strict, parse_config, read_yaml_mapping

Engine = Literal["tpe", "random", "grid", "pbt"]


class DataSection(Strict):
    """Dataset folders (``gigaseg simulate`` output or your own); relative paths are relative to the YAML."""

    train: Path
    val: Path | None = None
    test: Path | None = Field(None, description="held-out data the champion alias is gated on; default: validation")


class AshaSection(Strict):
    """Asynchronous successive halving on ``metric``; its clock follows the trial budget's unit
    (``training_iteration`` = epochs, ``steps`` or ``train_minutes``, see search/budget.py)."""

    enabled: bool = True
    grace_period: int | None = Field(None, ge=1, description="in epochs; converted to the budget's unit; "
                                     "None: the one-cycle warm-up (30 % of max_t), else 1 epoch")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1, description="in epochs; default: the largest epochs (or the budget)")
    keep_plan: bool = Field(True, description="never stop trial 0 (the plan) early: the baseline the search "
                            "must beat is trained to its end, not judged on its first noisy epochs")


class ResourcesSection(Strict):
    """Per trial: CPUs and (fractional) GPUs; ``workers_per_trial > 1`` runs DDP through Ray Train."""

    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    workers_per_trial: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_gpus(self) -> ResourcesSection:
        g = self.gpus_per_trial
        if g > 1 and g != int(g):
            raise ValueError("gpus_per_trial above 1 must be a whole number")
        if self.workers_per_trial > 1 and g not in (0, 1):
            raise ValueError("with workers_per_trial > 1, gpus_per_trial is per worker and must be 0 or 1")
        return self


class MlflowSection(Strict):
    """Where runs go. ``tracking_uri`` default: MLFLOW_TRACKING_URI, else SQLite under GIGASEG_HOME."""

    tracking_uri: str | None = None
    experiment: str | None = Field(None, description="default: the search name")
    registered_model_name: str | None = Field(None, description="register the best model; None: don't")
    alias: str = "champion"


class FailureSection(Strict):
    """Retries per trial, and when to give up on the whole search."""

    max_failures: int = Field(1, ge=0, description="retries of a failed trial, from its last checkpoint")
    stop_after_same_errors: int = Field(
        3, ge=0, description="stop the search if the first N finished trials all failed with the same error; 0: never")


class TestingSection(Strict):
    """Test-only hooks honoured by the trial function (see docs/search.md); leave unset in real searches."""

    barrier_dir: Path | None = None
    barrier_parties: int = Field(0, ge=0)
    barrier_timeout_s: float = Field(120.0, gt=0)
    fail_once_at_epoch: int | None = Field(None, ge=0)


class PlanSection(Strict):
    """Self-configuration before the search (segcore.plan, search/planned.py): the plan becomes
    ``base`` (explicit base keys win) and trial 0."""

    enabled: bool = True
    budget_min: float = Field(5.0, gt=0, description="training minutes the plan fits its step count to")


class ChampionSection(Strict):
    """What happens to the completed trials after the search (search/champion.py)."""

    ensemble_size: int = Field(5, ge=1, description="greedy ensemble selection picks (with replacement); 1: none")
    calibrate: bool = True
    tta: Literal["auto", "off"] = "auto"
    gate: bool = Field(True, description="move the alias only if the new model beats the current one")
    val_pixels: int = Field(2_000_000, ge=1024, description="validation px scored per candidate")


class RefitSection(Strict):
    """Retrain the best configuration for longer with this share of the budget."""

    budget_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="0: no refit")
    top_k: int = Field(1, ge=1, description="refit the best k trials side by side, one trial's resources each "
                       "(the slots the trials leave free); every kept refit is an ensemble candidate")
    warm_start: bool = Field(True, description="start from the best trial's weights (a fresh schedule over "
                             "the refit's epochs), so its training is not thrown away; false: from scratch")


class ClusterSection(Strict):
    """The cluster a search is sized for, counted in optimizer steps (search/lanes.py).

    ``workers`` N trials run at a time (Tune's concurrency), each worker training at most
    ``steps_per_worker`` C steps in all; trials, refits and any other training together use at most
    N x C worker-steps. On N GPUs that is the wall time; on a smaller machine the same search takes
    longer and reaches the same result."""

    workers: int = Field(ge=1, description="N: workers (GPUs or nodes), one trial each at a time")
    steps_per_worker: PlanSteps = Field(description="C: optimizer steps per worker, or plan (with minutes)")
    minutes: float | None = Field(None, gt=0, description="with steps_per_worker: plan, the minutes C fills")

    @model_validator(mode="after")
    def _check_plan(self) -> ClusterSection:
        check_plan_steps(self.steps_per_worker, self.minutes, "steps_per_worker", "minutes")
        return self


class PbtSection(Strict):
    """Population-based training (Ray Tune's PBT, synchronous): the population trains side by side; at
    every perturbation the worst ``quantile_fraction`` copy the best's weights and config, then
    perturb the range dimensions (x 0.8 / 1.2, or a resample). Intervals are shares of a trial's steps."""

    population: int | None = Field(None, ge=2, description="trials; default cluster.workers, else 4")
    perturbation_interval: float = Field(0.2, gt=0, le=1, description="share of a trial's steps between "
                                         "perturbations")
    burn_in: float = Field(0.3, ge=0, lt=1, description="share of a trial's steps before the first "
                           "perturbation (default: the one-cycle warm-up, when every trial still scores alike)")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)


class SearchSpec(Strict):
    """A whole search, as written in ``search.yaml``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataSection
    base: dict[str, Any] = Field(default_factory=dict, description="partial TrainConfig for every trial")
    space: dict[str, Any] = Field(default_factory=dict, description="dimensions, see search.space")
    engine: Engine = "tpe"
    seed: int = 0
    num_samples: int | None = Field(None, ge=1, description="trials for tpe/random (default 8; with a cluster, "
                                    "as many as its worker-steps hold); grid and pbt: not used")
    time_budget_s: float | None = Field(None, gt=0)
    max_trial_epochs: int | None = Field(None, ge=1, description="stop the search after this many epochs in all")
    max_concurrent_trials: int | None = Field(None, ge=1)
    tpe_startup_trials: int = Field(4, ge=1, description="random trials before TPE models the space")
    seed_configs: list[dict[str, Any]] = Field(default_factory=list)
    metric: str = "val_miou"
    mode: Literal["max", "min"] = "max"
    asha: AshaSection = Field(default_factory=AshaSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    storage_path: Path | None = Field(None, description="Tune results; default GIGASEG_HOME/searches")
    failure: FailureSection = Field(default_factory=FailureSection)
    plan: PlanSection = Field(default_factory=PlanSection)
    champion: ChampionSection = Field(default_factory=ChampionSection)
    refit: RefitSection = Field(default_factory=RefitSection)
    testing: TestingSection | None = None
    budget: Budget | None = Field(None, description="per trial: {steps: N}, {steps: plan, minutes: T} or "
                                  "{minutes: M}; None: epochs (or, with cluster, a worker's trial share)")
    cluster: ClusterSection | None = Field(None, description="size the search in worker-steps (N x C)")
    pbt: PbtSection = Field(default_factory=PbtSection)

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    @property
    def folder(self) -> Path:
        """Where Tune keeps this search (``<storage_path>/<name>``; storage default GIGASEG_HOME/searches)."""
        return Path(self.storage_path or tracking.gigaseg_home() / "searches") / self.name

    @property
    def population(self) -> int:
        """PBT's population: ``pbt.population``, else one trial per cluster worker, else 4."""
        return self.pbt.population or (self.cluster.workers if self.cluster else 4)

    @model_validator(mode="after")
    def _check_cluster(self) -> SearchSpec:
        if self.cluster is None:
            return self
        if self.resources.workers_per_trial > 1:
            raise ValueError("cluster: trials with workers_per_trial > 1 are not counted in worker-steps; set "
                             "resources.workers_per_trial: 1 (the refit trains on all cluster.workers)")
        if self.refit.top_k > 1:
            raise ValueError("cluster: the refit trains the best trial on all cluster.workers; set refit.top_k: 1")
        if self.engine == "grid":
            raise ValueError("cluster: a grid runs every combination whatever the worker-steps; use engine tpe, "
                             "random or pbt")
        if self.max_concurrent_trials not in (None, self.cluster.workers):
            raise ValueError(f"cluster.workers ({self.cluster.workers}) runs that many trials at a time; remove "
                             f"max_concurrent_trials ({self.max_concurrent_trials}) or make them equal")
        if isinstance(self.budget, MinutesBudget):
            raise ValueError("cluster counts optimizer steps: write budget: {steps: N} or {steps: plan, "
                             "minutes: T}, not minutes")
        return self

    @model_validator(mode="after")
    def _check_pbt(self) -> SearchSpec:
        if self.engine != "pbt":
            if self.pbt != PbtSection():  # defaults (as a resumed search's saved spec holds them) are fine
                raise ValueError(f"pbt: settings for engine pbt, but engine is {self.engine!r}")
            return self
        if self.asha.enabled and self.asha != AshaSection():
            raise ValueError("engine pbt schedules the trials itself: remove asha (or set asha.enabled: false)")
        if self.num_samples is not None:
            raise ValueError("engine pbt trains pbt.population trials (default: cluster.workers); remove "
                             "num_samples")
        if not isinstance(self.budget, StepsBudget) and self.cluster is None:
            raise ValueError("engine pbt perturbs at step counts: give budget: {steps: N} (or "
                             "{steps: plan, minutes: T}) or a cluster section")
        return self

    @model_validator(mode="after")
    def _check_budget(self) -> SearchSpec:
        if isinstance(self.budget, StepsBudget):
            for key in ("epochs", "data.patches_per_epoch", "patches_per_epoch"):
                if key in self.space:
                    raise ValueError(f"space.{key} conflicts with budget.steps, which sets epochs and "
                                     "patches per epoch; remove one of them")
        return self


def _resolve_paths(spec: SearchSpec, root: Path) -> SearchSpec:
    """Make data/storage paths absolute (relative to the YAML's folder), so trials anywhere agree."""

    def absolute(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (root / p)).resolve()

    data = spec.data.model_copy(update={"train": absolute(spec.data.train), "val": absolute(spec.data.val),
                                        "test": absolute(spec.data.test)})
    return spec.model_copy(update={"data": data, "storage_path": absolute(spec.storage_path)})


def _check_data(spec: SearchSpec, source: str) -> None:
    for key, path in (("data.train", spec.data.train), ("data.val", spec.data.val), ("data.test", spec.data.test)):
        if path is not None and not path.is_dir():
            raise ConfigError(f"{source}: {key}: {path} is not a folder; point it at a dataset folder "
                              "(e.g. made by `gigaseg simulate shapes --out DIR`).")


def parse_search_spec(data: dict[str, Any], source: str = "<dict>", root: Path | None = None) -> SearchSpec:
    """Validate a search config dict completely (sections, space, seeds, data); raise ConfigError."""
    spec = parse_config(data, SearchSpec, source=source)
    spec = _resolve_paths(spec, root or Path.cwd())
    _check_data(spec, source)
    SearchSpace.from_spec(spec, source)  # validates base, every dimension and the seed configs
    return spec


def load_search_spec(path: str | Path) -> SearchSpec:
    """Load and validate ``search.yaml``; nothing starts if this raises."""
    path = Path(path)
    data = read_yaml_mapping(path, "search config")
    return parse_search_spec(data, source=str(path), root=path.parent.resolve())
