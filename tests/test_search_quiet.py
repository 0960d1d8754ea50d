"""Quiet, truthful search logs: stopped trials end without a stack dump, and each parameter is
shown once in Tune's output (real Ray, real torch, real searches in subprocesses)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from tiny_search import tiny_search as tiny

from search.engines import DefineByRun, PruningAwareOptunaSearch
from search.runner import progress_reporter
from search.space import SearchSpace
from search.spec import parse_search_spec
from segcore.simulate import generate_shapes

pytestmark = pytest.mark.ray

ACTORS = textwrap.dedent("""
    import sys, threading, time
    import ray, torch
    from search.quiet_exit import guard_current_thread

    @ray.remote(num_cpus=0.25)
    class Trainer:
        def start(self, guarded):
            def work():
                if guarded:
                    guard_current_thread()
                x = torch.randn(256, 256)
                while True:  # like a trial thread in train(): almost always inside a torch op
                    x = (x @ x).tanh()
            threading.Thread(target=work, daemon=True).start()
            import os
            return os.getpid()

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1])
    actors = {guarded: [Trainer.remote() for _ in range(2)] for guarded in (True, False)}
    pids = {g: ray.get([a.start.remote(g) for a in group]) for g, group in actors.items()}
    time.sleep(2)
    for group in actors.values():
        for a in group:
            a.__ray_terminate__.remote()  # what Tune sends a stopped trial's actor
    time.sleep(8)
    ray.shutdown()
    print("GUARDED", *pids[True])
    print("UNGUARDED", *pids[False])
""")


def _aborted_pids(ray_dir: Path) -> set[int]:
    aborted = set()
    for log in ray_dir.glob("session_*/logs/worker-*.err"):
        if "Fatal Python error: Aborted" in log.read_text(errors="replace"):
            aborted.add(int(log.stem.rsplit("-", 1)[1]))
    return aborted


@pytest.mark.slow
def test_actor_exit_while_its_thread_is_in_torch_is_quiet_when_guarded(tmp_path: Path) -> None:
    """The root cause, reproduced: an actor asked to exit while a daemon thread runs a torch op
    aborts (pthread_exit unwinds through C++) unless the thread is guarded."""
    ray_dir = Path(tempfile.mkdtemp(prefix="gsq-", dir="/tmp"))  # short: Ray's socket paths
    try:
        script = tmp_path / "actors.py"
        script.write_text(ACTORS)
        proc = subprocess.run([sys.executable, str(script), str(ray_dir)], capture_output=True, text=True,
                              timeout=150, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        pids = {line.split()[0]: {int(p) for p in line.split()[1:]} for line in proc.stdout.splitlines()
                if line.startswith(("GUARDED", "UNGUARDED"))}
        aborted = _aborted_pids(ray_dir)
        assert not aborted & pids["GUARDED"], proc.stdout + proc.stderr[-3000:]
        assert aborted & pids["UNGUARDED"], "the unguarded control did not abort: the test lost its power"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_trial_config_holds_each_parameter_once(tmp_path: Path) -> None:
    spec = parse_search_spec(tiny("once", tmp_path, tmp_path / "runs"))
    space = SearchSpace.from_spec(spec)
    searcher = PruningAwareOptunaSearch(space=DefineByRun(space), metric="val_miou", mode="max",
                                        sampler=optuna.samplers.RandomSampler(seed=0))
    config = searcher.suggest("t1")
    assert list(config) == ["params"]  # not also Optuna's lr, encoder__Unet, ...
    assert {"architecture", "encoder", "lr", "focal_weight"} <= set(config["params"])


def test_legacy_progress_table_names_each_searched_dimension_once(tmp_path: Path, monkeypatch) -> None:
    spec = parse_search_spec(tiny("legacy", tmp_path, tmp_path / "runs"))
    space = SearchSpace.from_spec(spec)
    assert progress_reporter(spec, space) is None  # the default output picks its own columns
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")
    columns = progress_reporter(spec, space)._parameter_columns
    assert columns == {"params/architecture": "architecture", "params/encoder": "encoder",
                       "params/focal_weight": "focal_weight", "params/lr": "lr"}  # fixed ones not shown


def _table_rows(log: str, title: str) -> list[list[str]]:
    """Rows (first cells) of every box table whose title line contains ``title``."""
    tables, current = [], None
    for line in log.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")] if line.startswith("│") else None
        if cells and title in cells[0]:
            current = []
            tables.append(current)
        elif cells and current is not None:
            current.append(re.split(r"\s{2,}", cells[0])[0])
        elif line.startswith("╰"):
            current = None
    return tables


@pytest.mark.slow
def test_tiny_asha_search_log_is_quiet_and_shows_each_parameter_once(tmp_path: Path) -> None:
    data = generate_shapes(tmp_path / "shapes", n=4, size=96, seed=1)
    spec = tiny("quiet", data, tmp_path / "runs", num_samples=3)
    spec["mlflow"] = {"experiment": "quiet"}
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "GIGASEG_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "search", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Fatal Python error" not in log and "Aborted" not in log
    configs = _table_rows(log, "config")
    assert configs, log[-3000:]
    for rows in configs:  # each parameter once: no 'lr' next to 'params/lr'
        names = [r.removeprefix("params/") for r in rows]
        assert len(names) == len(set(names)), rows
        assert "params/lr" in rows
    for header in re.findall(r"│ Trial name .*│", log):
        columns = [c.removeprefix("params/") for c in re.split(r"\s{2,}", header.strip("│ "))]
        assert len(columns) == len(set(columns)), header
