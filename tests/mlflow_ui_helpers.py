"""Reading the MLflow UI in a real browser (the ``browser`` fixture, conftest.py): shared by the UI
test and the end-to-end test on PostgreSQL."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterable


def wait(driver, condition: Callable, timeout: float = 120):
    """Selenium's WebDriverWait: poll ``condition(driver)`` until it is truthy; returns it."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition)


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def param_rows(text: str, params: Iterable[str], n: int) -> dict[str, list[str]] | None:
    """``{"architecture": [v1, ..., vn], ...}`` from the compare page's text, once every row of
    ``params`` shows ``n`` values (one per run)."""
    wanted, rows = set(params), {}
    for line in text.splitlines():
        key, _, values = line.partition(" ")
        if key in wanted and len(values.split()) == n:
            rows[key] = values.split()
    return rows if len(rows) == len(wanted) else None


def shown_metric(value: float) -> str:
    """A metric as the compare page's table shows it: 3 decimals, trailing zeros dropped."""
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


def open_compare_page(driver, url: str, experiment_id: str, run_ids: list[str],
                      params: Iterable[str]) -> tuple[dict[str, list[str]], str]:  # fmt: skip
    """Open the compare view of ``run_ids``; wait until every param row shows every run.
    Returns (param rows, the page's text)."""
    runs = urllib.parse.quote(json.dumps(run_ids))
    exps = urllib.parse.quote(json.dumps([experiment_id]))
    driver.get(f"{url}/#/compare-runs?runs={runs}&experiments={exps}")
    params = list(params)
    rows = wait(driver, lambda d: param_rows(body_text(d), params, len(run_ids)))
    return rows, body_text(driver)


def reveal(driver, text: str) -> str:
    """Scroll the element reading ``text`` (a row of the compare page's metrics table, which
    clips its rows to a few lines) into view; returns the page's text once it shows ``text``."""
    from selenium.webdriver.common.by import By

    cells = wait(driver, lambda d: d.find_elements(By.XPATH, f"//*[normalize-space()='{text}']"))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", cells[0])
    wait(driver, lambda d: text in body_text(d).splitlines(), timeout=30)
    return body_text(driver)
