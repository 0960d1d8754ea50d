"""The MLflow UI shows a search: a real ``mlflow server`` (SQLite backend, local artifact store,
127.0.0.1 on a free port) and a real headless Chromium driven by Selenium.

The runs are logged by :func:`_log_tiny_search` with the MLflow client, shaped like a search
(a parent run "search" and nested trial runs with params and ``val_miou``); it is meant to be
replaced by a real tiny search once ``search`` can run one in a test."""

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

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TRIALS = [
    {"arch": "Unet", "encoder": "resnet18", "lr": "0.001", "val_miou": 0.61},
    {"arch": "FPN", "encoder": "resnet34", "lr": "0.0003", "val_miou": 0.72},
    {"arch": "UnetPlusPlus", "encoder": "efficientnet-b0", "lr": "0.002", "val_miou": 0.55},
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
    reason="needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)",
)


@dataclass
class TinySearch:
    experiment_id: str
    parent_id: str
    trial_ids: dict[str, str]  # run name -> run id


def _log_tiny_search(tracking_uri: str) -> TinySearch:
    """A search-shaped experiment: parent run "search" with one nested run per TRIALS entry."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.create_experiment("tiny-search")
    parent = client.create_run(exp, run_name="search")
    trial_ids = {}
    for i, trial in enumerate(TRIALS):
        run = client.create_run(exp, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent.info.run_id})
        for key in ("arch", "encoder", "lr"):
            client.log_param(run.info.run_id, key, trial[key])
        client.log_metric(run.info.run_id, "val_miou", trial["val_miou"])
        client.set_terminated(run.info.run_id)
        trial_ids[f"trial-{i}"] = run.info.run_id
    client.set_terminated(parent.info.run_id)
    return TinySearch(exp, parent.info.run_id, trial_ids)


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


def _links(driver, text: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.XPATH, f"//a[normalize-space()='{text}']")


def _expand_parent(driver, search: TinySearch) -> None:
    """Click the expand button in the parent run's name cell (the React/ag-grid runs table)."""
    from selenium.webdriver.common.by import By

    row = f"//div[@role='row' and @row-id='{search.parent_id}']"
    button = driver.find_element(
        By.XPATH, f"{row}//div[@role='gridcell' and contains(@col-id, 'Run Name')]//button"
    )
    driver.execute_script("arguments[0].click();", button)


def _param_rows(text: str) -> dict[str, list[str]] | None:
    """``{"arch": [v1, v2, v3], ...}`` from the compare page's text, once all rows are there."""
    rows = {}
    for line in text.splitlines():
        key, _, values = line.partition(" ")
        if key in ("arch", "encoder", "lr") and len(values.split()) == len(TRIALS):
            rows[key] = values.split()
    return rows if len(rows) == 3 else None


@pytest.mark.slow
def test_trial_runs_listed_with_params_in_mlflow_ui(mlflow_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    search = _log_tiny_search(mlflow_server)

    # Experiment page: the React app renders the runs table with the parent run, collapsed.
    browser.get(f"{mlflow_server}/#/experiments/{search.experiment_id}/runs")
    _wait(browser, lambda d: _links(d, "search"))
    assert not _links(browser, "trial-0"), "nested runs should start collapsed under their parent"
    _expand_parent(browser, search)
    _wait(browser, lambda d: all(_links(d, name) for name in search.trial_ids))
    browser.save_screenshot(str(tmp_path / "experiment-runs.png"))

    # Compare page: one column per trial, with every param and the metric.
    runs = urllib.parse.quote(json.dumps(list(search.trial_ids.values())))
    exps = urllib.parse.quote(json.dumps([search.experiment_id]))
    browser.get(f"{mlflow_server}/#/compare-runs?runs={runs}&experiments={exps}")
    rows = _wait(browser, lambda d: _param_rows(d.find_element(By.TAG_NAME, "body").text))
    for key in ("arch", "encoder", "lr"):
        assert sorted(rows[key]) == sorted(t[key] for t in TRIALS), (key, rows[key])
    body = browser.find_element(By.TAG_NAME, "body").text
    assert all(name in body for name in search.trial_ids) and "val_miou" in body and "0.72" in body
    params = browser.find_element(By.XPATH, "//*[normalize-space()='Parameters']")
    browser.execute_script("arguments[0].scrollIntoView();", params)
    browser.save_screenshot(str(tmp_path / "compare-runs.png"))
    assert (tmp_path / "experiment-runs.png").stat().st_size > 10_000
