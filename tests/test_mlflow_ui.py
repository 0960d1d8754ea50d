"""The MLflow UI shows a search: a REAL tiny search (``search.run_search``: Ray Tune + Optuna on
the shared local Ray, 2 trials of 1 epoch, depth-3 encoders) logs to a real ``mlflow server``
(SQLite backend, proxied artifacts, 127.0.0.1 on a free port), and a real headless Chromium
driven by Selenium checks that the trial runs are nested under the search's parent run and
that the compare page shows each trial's sampled params as MLflow stored them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_search import TINY_SPACE, tiny_search

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SEARCH = "ui-search"
PARAMS = ("architecture", "encoder", "lr")  # sampled dimensions, logged under their YAML names

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
    reason="needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)",
)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout:.0f} s")


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1:<free port>, SQLite + artifacts in tmp_path; yields its URL."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runners: ~10 processes less on 2 cores
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1000",
    ):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition)


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


def _param_rows(text: str, n: int) -> dict[str, list[str]] | None:
    """``{"architecture": [v1, v2], ...}`` from the compare page's text, once all rows are there."""
    rows = {}
    for line in text.splitlines():
        key, _, values = line.partition(" ")
        if key in PARAMS and len(values.split()) == n:
            rows[key] = values.split()
    return rows if len(rows) == len(PARAMS) else None


@pytest.mark.slow
@pytest.mark.ray
def test_trial_runs_listed_with_params_in_mlflow_ui(ray_local, shapes, mlflow_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    search = _run_tiny_search(mlflow_server, shapes, tmp_path / "tune")
    for params in search.params.values():  # the sampled values, from the search's space
        assert params["architecture"] in ("Unet", "Linknet") and params["encoder"] == "resnet18"
        assert 1e-3 <= float(params["lr"]) <= 1e-2

    # Experiment page: the React app renders the runs table with the parent run, collapsed.
    browser.get(f"{mlflow_server}/#/experiments/{search.experiment_id}/runs")
    _wait(browser, lambda d: _links(d, SEARCH, search.parent_id))
    hidden = [name for name, run_id in search.trial_ids.items() if not _links(browser, name, run_id)]
    assert hidden == list(search.trial_ids), "nested runs should start collapsed under their parent"
    _expand_parent(browser, search)
    _wait(browser, lambda d: all(_links(d, name, run_id) for name, run_id in search.trial_ids.items()))
    browser.save_screenshot(str(tmp_path / "experiment-runs.png"))

    # Compare page: one column per trial, with every sampled param and the metric.
    runs = urllib.parse.quote(json.dumps(list(search.trial_ids.values())))
    exps = urllib.parse.quote(json.dumps([search.experiment_id]))
    browser.get(f"{mlflow_server}/#/compare-runs?runs={runs}&experiments={exps}")
    rows = _wait(browser, lambda d: _param_rows(d.find_element(By.TAG_NAME, "body").text, len(search.trial_ids)))
    for key in PARAMS:
        assert sorted(rows[key]) == sorted(p[key] for p in search.params.values()), (key, rows[key])
    body = browser.find_element(By.TAG_NAME, "body").text
    assert all(name in body for name in search.trial_ids) and "val_miou" in body
    for value in search.val_miou.values():  # the metrics table shows 3 decimals, trailing zeros dropped
        shown = f"{value:.3f}".rstrip("0").rstrip(".") or "0"
        assert shown in body.splitlines(), (value, shown)
    params = browser.find_element(By.XPATH, "//*[normalize-space()='Parameters']")
    browser.execute_script("arguments[0].scrollIntoView();", params)
    browser.save_screenshot(str(tmp_path / "compare-runs.png"))
    (tmp_path / "compare-runs.txt").write_text(body)
    assert (tmp_path / "experiment-runs.png").stat().st_size > 10_000
