"""One tiny search config for the tests that run real searches (search, MLflow UI, e2e cluster).

Like search/examples/shapes-tiny.yaml, smaller: Unet/Linknet on a depth-3 resnet18 at 64 px.
"""

from __future__ import annotations

import copy
from pathlib import Path

TINY_ARCH_KWARGS = {"Unet": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}, "Linknet": {"encoder_depth": 3}}
TINY_BASE = {
    "model": {"arch_kwargs": TINY_ARCH_KWARGS},
    "data": {"patches_per_epoch": 16, "batch_size": 8, "val_tile": 64, "val_halo": 16},
    "optim": {"schedule": "constant"},
}
TINY_SPACE = {
    "architecture": {"choice": ["Unet", "Linknet"]},
    "encoder": {"choice": ["resnet18"]},
    "arch_kwargs": TINY_ARCH_KWARGS,
    "focal_weight": {"uniform": [0.0, 1.0]},
    "lr": {"loguniform": [1e-3, 1e-2]},
    "patch_size": 64,
    "augment": 0.2,
    "epochs": 2,
}


def tiny_search(name: str, data: Path, storage: Path, **over: object) -> dict:
    """A tiny search config (as a YAML dict); ``over`` replaces top-level keys.

    Returns a deep copy: tests edit the dict freely without changing the next test's config.
    """
    spec = {
        "name": name,
        "data": {"train": str(data)},
        "base": TINY_BASE,
        "space": TINY_SPACE,
        "engine": "tpe",
        "num_samples": 3,
        "tpe_startup_trials": 2,
        "max_concurrent_trials": 2,
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "resources": {"cpus_per_trial": 1},
        "storage_path": str(storage),
        "mlflow": {"experiment": name, "registered_model_name": f"{name}-model"},
        "plan": {"enabled": False},  # these tests check other things; tests/test_plan.py searches with the plan
    }
    spec.update(over)
    return copy.deepcopy(spec)
