"""A per-process cache of decoded chunks (TIFF tiles/strips), bounded by bytes.

Training draws many overlapping patches from the same tiles, and a compressed tile costs far
more to decode than to copy; the cache keeps the most recently used decoded chunks up to
``GIGASEG_CHUNK_CACHE_MB`` (default 128 MB) per process, so RSS stays flat however big the
dataset is. Entries are read-only arrays: callers copy out of them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

DEFAULT_MB = 128


def budget_bytes() -> int:
    """The cache's byte budget from ``GIGASEG_CHUNK_CACHE_MB`` (0 disables it)."""
    try:
        return max(0, int(float(os.environ.get("GIGASEG_CHUNK_CACHE_MB", DEFAULT_MB)) * (1 << 20)))
    except ValueError:
        return DEFAULT_MB << 20


class ChunkCache:
    """Least-recently-used decoded chunks, at most ``max_bytes`` in all (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The chunk under ``key``, from the cache or ``load()`` (then cached if it fits)."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        value = load()
        value.flags.writeable = False
        if value.nbytes > self.max_bytes:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self.nbytes += value.nbytes
            while self.nbytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


_CACHE: ChunkCache | None = None
_PID = -1


def chunk_cache() -> ChunkCache:
    """This process's cache (a forked child starts its own, empty one)."""
    global _CACHE, _PID
    if _CACHE is None or _PID != os.getpid():
        _CACHE, _PID = ChunkCache(budget_bytes()), os.getpid()
    return _CACHE
