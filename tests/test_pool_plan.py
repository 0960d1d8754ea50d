"""CPU actor pool: chosen per node from the window size, deterministically (issue 14 item 4)."""

from __future__ import annotations

import pytest

from pipelines.runner import BIG_WINDOW, MAX_CPU_ACTORS, cpu_pool


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
