"""CPU actor pool: chosen per node from the window size, deterministically (issue 14 item 4)."""

from __future__ import annotations

import pytest

from pipelines.options import BIG_WINDOW
from pipelines.runner import MAX_CPU_ACTORS, cpu_pool


@pytest.mark.parametrize(("cpus", "nodes", "window", "expected"), [
    (2, 1, 512 + 2 * 128, (2, 1)),                # small windows: one single-threaded actor per CPU
    (16, 1, 512 + 2 * 128, (8, 2)),               # big machine, small windows: two threads each
    (2, 1, 2304 + 2 * 192, (1, 2)),               # big tile: one actor with every CPU as a thread
    (32, 2, BIG_WINDOW, (2, 16)),                 # per node: one actor per node
    (4 * MAX_CPU_ACTORS, 2 * MAX_CPU_ACTORS, 4096, (MAX_CPU_ACTORS, 2)),
])
def test_cpu_pool_from_node_and_window(cpus: float, nodes: int, window: int, expected: tuple[int, int]) -> None:
    assert cpu_pool(cpus, nodes, window) == expected


def test_cpu_pool_is_deterministic() -> None:
    assert len({cpu_pool(2.0, 1, 2688) for _ in range(5)}) == 1
    assert cpu_pool(2.0, 0, 2688) == (1, 2)  # no node reported yet: counted as one


def test_executor_auto_local_unless_a_cluster_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: Ray for --address or RAY_ADDRESS; a local run refuses Ray-only flags (never ignores them)."""
    from pipelines.runner import RunConfig, choose_executor
    from segcore.errors import ConfigError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_executor(RunConfig(address="10.0.0.1:6379"))[0] == "ray"
    assert choose_executor(RunConfig(executor="ray"))[0] == "ray"
    assert choose_executor(RunConfig(executor="local"))[0] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert choose_executor(RunConfig())[0] == "ray"
    with pytest.raises(ConfigError, match="--worker-cpus"):
        choose_executor(RunConfig(executor="local", worker_cpus=0.5))


def test_executor_auto_is_local_without_ray() -> None:
    """In a fresh process (no Ray imported, no RAY_ADDRESS, this CPU machine): local."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("import sys; from pipelines.runner import RunConfig, choose_executor; "
            "print(choose_executor(RunConfig())[0], 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["local", "False"]


@pytest.mark.parametrize(("window", "workers", "expected"), [
    (512 + 2 * 128, None, None),     # small windows: the node's CPU pool, one lane per actor
    (2304 + 2 * 192, None, (1, 0)),  # big windows: one lane with every CPU
    (2304 + 2 * 192, 3, (3, 0)),     # --workers sets the lanes
])
def test_local_pool_follows_the_node_rule(window: int, workers: int | None, expected: tuple | None) -> None:
    from pipelines.local import local_cpus
    from pipelines.options import SegmentOptions
    from pipelines.runner import RunConfig, local_pool

    cpus = local_cpus()
    tile = window - 2 * 128
    opts = SegmentOptions(model="m", tile=tile, halo=128, device="cpu")
    pool = local_pool(RunConfig(workers=workers), opts)
    lanes, threads = cpu_pool(cpus, 1, window) if expected is None else (expected[0], None)
    assert pool["executor"] == "local" and pool["size"] == lanes
    assert pool["threads"] == (threads or max(1, cpus // lanes))


def test_local_pool_follows_the_first_images_real_window(tmp_path) -> None:
    """A tile of 1024 makes the run's windows big (one lane with every CPU), but frames of 96² are
    one small window each: the in-process pool follows the first planned image (one lane per CPU
    on 2 cores: 1.5x faster on an archive of small FITS frames); a run whose first file fails to
    plan keeps the run's rule."""
    from pipelines_helpers import make_model, write_corrupt_tiff, write_tiled_tiff8

    from pipelines.local import local_cpus
    from pipelines.runner import RunConfig, segment_archive

    model = make_model(tmp_path / "model")
    (tmp_path / "in").mkdir()
    (tmp_path / "bad").mkdir()
    for i in range(2):
        write_tiled_tiff8(tmp_path / "in" / f"small{i}.tif", (96, 96), seed=i)
    run = RunConfig(executor="local", progress_bars=False)
    report = segment_archive(str(model), [str(tmp_path / "in" / "*.tif")], tmp_path / "out", run, tile=1024, halo=64)
    cpus = local_cpus()
    assert (report.pool["size"], report.pool["threads"]) == cpu_pool(cpus, 1, 96) and len(report.done) == 2
    write_corrupt_tiff(tmp_path / "bad" / "a_broken.tif")
    report = segment_archive(str(model), [str(tmp_path / "bad" / "*.tif")], tmp_path / "out2", run, tile=1024, halo=64)
    assert (report.pool["size"], report.pool["threads"]) == cpu_pool(cpus, 1, 1024 + 128) and len(report.failed) == 1
