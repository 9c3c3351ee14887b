"""Where the cache filter keeps answers: in process memory, or in Redis with a local fallback.

:class:`MemoryCacheStore` is an LRU bounded twice — by entries (``cache.max_entries``) and
by estimated bytes (``cache.max_bytes``): a count alone lets a few thousand large answers
(each up to ``cache.max_body_bytes``) take gigabytes of a sidecar's memory. An entry's size
is what ``sys.getsizeof`` reports for its key, its dict and its strings, plus the LRU's
own bookkeeping; it reports what it holds through ``on_size`` (a gauge).

:class:`RedisCacheStore` shares entries between ambassadors. While Redis fails — and for a
pause after each failure (:class:`flowgate.common.redis_guard.RedisPause`, shared with the
rate limiter) — it reads and writes a bounded :class:`MemoryCacheStore` instead, so a
Redis outage costs the cache its sharing, not its hits; ``on_fallback`` counts each such
operation. What was cached locally during an outage is not copied to Redis afterwards.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from flowgate.common.redis_guard import RedisPause

_NODE_BYTES = 120  # the LRU's link, the (expiry, entry) tuple and the expiry float


class CacheStore(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...
    def set(self, key: str, entry: dict[str, Any], keep_s: float) -> None: ...


def entry_bytes(key: str, entry: dict[str, Any]) -> int:
    """Estimated memory of one entry (its key, dict and values) in an LRU."""
    return (sys.getsizeof(key) + sys.getsizeof(entry) + _NODE_BYTES
            + sum(sys.getsizeof(value) for value in entry.values()))


class MemoryCacheStore:
    """LRU with per-entry expiry (the entry is kept for TTL + stale window), bounded by
    ``max_entries`` and ``max_bytes``; an entry larger than ``max_bytes`` is not kept."""

    def __init__(self, max_entries: int, max_bytes: int = 64 * 1_048_576,
                 clock: Callable[[], float] = time.time, *,
                 on_size: Callable[[int, int], None] | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._on_size = on_size or (lambda size, entries: None)
        self._data: OrderedDict[str, tuple[float, dict[str, Any], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self._on_size(0, 0)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[0] <= self._clock():
                self._drop(key)
                self._report()
                return None
            self._data.move_to_end(key)
            return item[1]

    def set(self, key: str, entry: dict[str, Any], keep_s: float) -> None:
        size = entry_bytes(key, entry)
        with self._lock:
            if key in self._data:
                self._drop(key)
            if size <= self.max_bytes:
                self._data[key] = (self._clock() + keep_s, entry, size)
                self.bytes += size
                self._evict()
            self._report()

    def _evict(self) -> None:
        """Expired entries at the cold end first, then the least recently used until both
        bounds hold."""
        now = self._clock()
        data = self._data
        while data:
            oldest, (expires_at, _entry, _size) = next(iter(data.items()))
            if expires_at > now and len(data) <= self.max_entries and self.bytes <= self.max_bytes:
                return
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        self.bytes -= self._data.pop(key)[2]

    def _report(self) -> None:
        self._on_size(self.bytes, len(self._data))


class RedisCacheStore:
    """Entries in Redis (JSON, expiring with the entry); ``fallback`` while Redis fails.
    Without a fallback, a failure is raised (the cache filter then skips the cache)."""

    def __init__(self, client: Any, fallback: MemoryCacheStore | None = None, *,
                 prefix: str = "flowgate:cache:", pause: RedisPause | None = None,
                 on_fallback: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.fallback = fallback
        self.prefix = prefix
        self.pause = pause if pause is not None else RedisPause()
        self._on_fallback = on_fallback or (lambda op: None)

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = self.pause.call(lambda: self.client.get(self.prefix + key))
            return json.loads(raw) if raw else None
        except Exception:
            if self.fallback is None:
                raise
            self._on_fallback("get")
            return self.fallback.get(key)

    def set(self, key: str, entry: dict[str, Any], keep_s: float) -> None:
        try:
            self.pause.call(lambda: self.client.set(self.prefix + key, json.dumps(entry),
                                                    px=max(1, int(keep_s * 1000))))
        except Exception:
            if self.fallback is None:
                raise
            self._on_fallback("set")
            self.fallback.set(key, entry, keep_s)
