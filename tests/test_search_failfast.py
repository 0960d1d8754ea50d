"""A search fails fast: bad data stops it before any trial, a repeated trial error stops it early,
and a search that registers no champion exits non-zero (real Ray, real MLflow on SQLite, real files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image
from tiny_search import tiny_search as tiny

from search.cli import main as search_main
from search.preflight import check_search_data
from search.space import SearchSpace
from search.spec import parse_search_spec
from segcore.data import DataError
from segcore.simulate import generate_shapes

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "train", n=4, size=96, seed=1)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _break_a_mask(data: Path, value: int = 7) -> Path:
    mask_path = sorted((data / "masks").iterdir())[1]
    mask = np.array(Image.open(mask_path))
    mask[5, 7] = value
    Image.fromarray(mask).save(mask_path)
    return mask_path


def test_bad_mask_value_stops_the_search_before_any_trial(shapes: Path, tmp_path: Path, caplog) -> None:
    bad = tmp_path / "bad"
    generate_shapes(bad, n=3, size=64, seed=3)
    mask_path = _break_a_mask(bad)  # shapes has 3 classes (0..2); 7 is none of them (255 would be 'ignore')
    home, storage = tmp_path / "home", tmp_path / "runs"
    config = write_yaml(tmp_path / "search.yaml", tiny("bad-mask", bad, storage))
    env = {**os.environ, "GIGASEG_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "search", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{mask_path}: mask values [7] are not class ids 0..2" in proc.stderr
    assert "before any trial starts" in proc.stderr
    assert "Ray: starting" not in proc.stderr  # stopped before Ray (and MLflow) started
    assert not (storage / "bad-mask").exists()  # no experiment folder, so no trial folder
    assert not (tmp_path / "mlflow.db").exists()  # no parent run, no nested run
    assert search_main(["--config", str(config), "--dry-run"]) == 2  # the dry run checks the data too
    assert "mask values [7] are not class ids" in caplog.text


def test_normalisation_the_space_can_sample_is_checked_on_the_driver(tmp_path: Path) -> None:
    """The config's normalize wins over dataset.yaml's: a fits_header choice on PNG data fails here."""
    data = generate_shapes(tmp_path / "png", n=2, size=64, seed=0)
    spec = parse_search_spec(tiny("norm", data, tmp_path / "runs"))
    space = SearchSpace.from_spec(spec)
    assert [c.normalize_modes for c in check_search_data(space, data)] == [("dtype_range",)]
    spec = tiny("norm", data, tmp_path / "runs")
    spec["space"] = {**spec["space"], "normalize.mode": {"choice": ["dtype_range", "fits_header"]}}
    space = SearchSpace.from_spec(parse_search_spec(spec))
    with pytest.raises(DataError, match="fits_header needs a FITS header"):
        check_search_data(space, data)


def test_lazy_loader_data_is_checked_without_loading_the_pixels(tmp_path: Path) -> None:
    data = generate_shapes(tmp_path / "lazy", n=2, size=64, seed=0)
    mask_path = _break_a_mask(data)
    spec = tiny("lazy", data, tmp_path / "runs")
    spec["base"] = {**spec["base"], "data": {**spec["base"]["data"], "loader": "lazy"}}
    space = SearchSpace.from_spec(parse_search_spec(spec))
    with pytest.raises(DataError, match=f"{mask_path}: mask values \\[7\\]"):
        check_search_data(space, data)


@pytest.mark.slow
def test_same_error_in_the_first_trials_stops_the_search_and_exits_1(ray_local, mlflow_sqlite, shapes: Path,
                                                                     tmp_path: Path, caplog) -> None:
    weights = tmp_path / "corrupt.pth"
    weights.write_bytes(b"")  # exists (the YAML check passes) but cannot be read: every trial fails
    spec = tiny("same-error", shapes, tmp_path / "runs", num_samples=6,
                failure={"max_failures": 0, "stop_after_same_errors": 2})
    spec["space"] = {**spec["space"], "encoder_weights": str(weights)}
    config = write_yaml(tmp_path / "search.yaml", spec)
    assert search_main(["--config", str(config)]) == 1
    assert "the first 2 trials all failed with the same error" in caplog.text
    assert "cannot read encoder weights" in caplog.text
    assert "search same-error failed:" in caplog.text
    trials = [p for p in (tmp_path / "runs" / "same-error").iterdir() if p.name.startswith("trial_")]
    assert 2 <= len(trials) < 6  # stopped early, not run to num_samples
    client = mlflow.MlflowClient(mlflow_sqlite)
    exp = client.get_experiment_by_name("same-error")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`gigaseg.kind` = 'search'")[0]
    assert parent.info.status == "FAILED"
    assert "cannot read encoder weights" in parent.data.tags["gigaseg.failure"]


@pytest.mark.slow
def test_no_champion_exits_1_and_says_why(ray_local, mlflow_sqlite, shapes: Path, tmp_path: Path, caplog) -> None:
    weights = tmp_path / "corrupt.pth"
    weights.write_bytes(b"")
    spec = tiny("no-champion", shapes, tmp_path / "runs", num_samples=2,
                failure={"max_failures": 0, "stop_after_same_errors": 0})
    spec["space"] = {**spec["space"], "encoder_weights": str(weights)}
    config = write_yaml(tmp_path / "search.yaml", spec)
    assert search_main(["--config", str(config)]) == 1
    assert "no trial completed (2 failed)" in caplog.text
    assert "cannot read encoder weights" in caplog.text
