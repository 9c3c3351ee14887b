"""Leave Redis alone for a while after it failed — used by the ambassador's shared stores
(rate-limit buckets, the response cache: ``ambassador/filters/ratelimit.py``,
``cache_stores.py``) and the engine's tenant limits (``flow_engine/tenants.py``), each with a
local fallback.

A Redis that is down answers fast (connection refused), but a hung one costs a socket
timeout on every call: without a pause, every request would wait that long once per store.
After a failure, :class:`RedisPause` refuses calls for ``pause_s`` (:class:`RedisPaused`, at
once), so a Redis outage costs one timeout per pause, and the first call after the pause
finds out whether Redis is back. One pause may be shared by every store on the same Redis,
so a failure seen by one spares the others its timeout. The clock is injected so tests never
sleep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class RedisPaused(ConnectionError):
    """Redis failed a moment ago; not trying again yet."""


class RedisPause:
    def __init__(self, pause_s: float = 5.0, clock: Callable[[], float] = time.monotonic, *,
                 on_failure: Callable[[], None] | None = None) -> None:
        self.pause_s = pause_s
        self._clock = clock
        self._on_failure = on_failure or (lambda: None)
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.failures = 0  # calls that reached Redis and failed (not the ones refused here)

    @property
    def paused(self) -> bool:
        return self._clock() < self._down_until

    def failed(self) -> None:
        """Redis just failed: count it and leave it alone for ``pause_s`` from now."""
        with self._lock:
            self.failures += 1
            self._down_until = self._clock() + self.pause_s
        self._on_failure()

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, unless Redis failed less than ``pause_s`` ago (then RedisPaused). An
        exception from ``fn`` starts a new pause and is raised again."""
        if self.paused:
            raise RedisPaused("redis paused after a failure")
        try:
            return fn()
        except Exception:
            self.failed()
            raise
