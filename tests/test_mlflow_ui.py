"""The MLflow UI shows a search: a REAL tiny search (``search.run_search``: Ray Tune + Optuna on
the shared local Ray, 2 trials of 1 epoch, depth-3 encoders) logs to a real ``mlflow server``
(SQLite backend, proxied artifacts, 127.0.0.1 on a free port), and a real headless Chromium
driven by Selenium checks that the trial runs are nested under the search's parent run and
that the compare page shows each trial's sampled params as MLflow stored them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow_ui_helpers import open_compare_page, shown_metric, wait
from tiny_search import TINY_SPACE, tiny_search

SEARCH = "ui-search"
PARAMS = ("architecture", "encoder", "lr")  # sampled dimensions, logged under their YAML names


@dataclass
class TinySearch:
    experiment_id: str
    parent_id: str
    trial_ids: dict[str, str]  # run name -> run id
    params: dict[str, dict[str, str]]  # run name -> {param: value} as MLflow stored them
    val_miou: dict[str, float]  # run name -> last val_miou


def _run_tiny_search(tracking_uri: str, data: Path, storage: Path) -> TinySearch:
    """A real search (as search/examples/shapes-tiny.yaml, smaller): 2 trials, 1 epoch; then
    what it logged, read back with the MLflow client."""
    from mlflow import MlflowClient

    from search import parse_search_spec, run_search

    space = {k: v for k, v in TINY_SPACE.items() if k != "focal_weight"} | {"epochs": 1}
    spec = parse_search_spec(tiny_search(SEARCH, data, storage, space=space, seed=5, num_samples=2,
                                         mlflow={"tracking_uri": tracking_uri}))
    outcome = run_search(spec)
    assert outcome.counts == {"completed": 2, "stopped early": 0, "failed": 0}, outcome.counts

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(SEARCH)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(runs) == 2 and client.get_run(outcome.parent_run_id).info.run_name == SEARCH
    return TinySearch(
        exp.experiment_id,
        outcome.parent_run_id,
        {r.info.run_name: r.info.run_id for r in runs},
        {r.info.run_name: {k: r.data.params[k] for k in PARAMS} for r in runs},
        {r.info.run_name: r.data.metrics["val_miou"] for r in runs},
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``gigaseg simulate shapes``: 4 images of 96 px."""
    from segcore.simulate import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes") / "train", n=4, size=96, seed=1)


def _links(driver, text: str, row_id: str) -> list:
    """Links reading ``text`` in the runs table row of run ``row_id`` (not the breadcrumb or the
    sidebar, which show the experiment's name: here also the parent run's)."""
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.XPATH, f"//div[@role='row' and @row-id='{row_id}']//a[normalize-space()='{text}']")


def _expand_parent(driver, search: TinySearch) -> None:
    """Click the expand button in the parent run's name cell (the React/ag-grid runs table)."""
    from selenium.webdriver.common.by import By

    row = f"//div[@role='row' and @row-id='{search.parent_id}']"
    button = driver.find_element(
        By.XPATH, f"{row}//div[@role='gridcell' and contains(@col-id, 'Run Name')]//button"
    )
    driver.execute_script("arguments[0].click();", button)


@pytest.mark.slow
@pytest.mark.ray
def test_trial_runs_listed_with_params_in_mlflow_ui(ray_local, shapes, mlflow_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    search = _run_tiny_search(mlflow_server.url, shapes, tmp_path / "tune")
    for params in search.params.values():  # the sampled values, from the search's space
        assert params["architecture"] in ("Unet", "Linknet") and params["encoder"] == "resnet18"
        assert 1e-3 <= float(params["lr"]) <= 1e-2

    # Experiment page: the React app renders the runs table with the parent run, collapsed.
    browser.get(f"{mlflow_server.url}/#/experiments/{search.experiment_id}/runs")
    wait(browser, lambda d: _links(d, SEARCH, search.parent_id))
    hidden = [name for name, run_id in search.trial_ids.items() if not _links(browser, name, run_id)]
    assert hidden == list(search.trial_ids), "nested runs should start collapsed under their parent"
    _expand_parent(browser, search)
    wait(browser, lambda d: all(_links(d, name, run_id) for name, run_id in search.trial_ids.items()))
    browser.save_screenshot(str(tmp_path / "experiment-runs.png"))

    # Compare page: one column per trial, with every sampled param and the metric.
    rows, body = open_compare_page(browser, mlflow_server.url, search.experiment_id, list(search.trial_ids.values()),
                                   PARAMS)  # fmt: skip
    for key in PARAMS:
        assert sorted(rows[key]) == sorted(p[key] for p in search.params.values()), (key, rows[key])
    assert all(name in body for name in search.trial_ids) and "val_miou" in body
    for value in search.val_miou.values():
        assert shown_metric(value) in body.splitlines(), (value, shown_metric(value))
    params = browser.find_element(By.XPATH, "//*[normalize-space()='Parameters']")
    browser.execute_script("arguments[0].scrollIntoView();", params)
    browser.save_screenshot(str(tmp_path / "compare-runs.png"))
    (tmp_path / "compare-runs.txt").write_text(body)
    assert (tmp_path / "experiment-runs.png").stat().st_size > 10_000
