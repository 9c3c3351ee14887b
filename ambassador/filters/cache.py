"""Response cache for flows that opt in (``flows.<id>.cache`` in the config).

Key: SHA-256 of (flow id, pinned version, input, tweaks, input and output type, the
caller's tenant, and the session id when ``session_in_key``). Stored: successful,
non-streamed run answers only — never errors, never streams. ``Cache-Control: no-cache``
skips the lookup (the fresh answer is still stored); ``no-store`` skips storing. When the
engine fails (unreachable, open breaker, 500/502/503/504 — a 502 is a failed LLM, exactly
when an older answer helps), an entry up to ``stale_if_error_s`` past its TTL is served
instead (``X-Cache: STALE``). ``X-Cache`` is HIT, MISS, BYPASS or STALE on every run answer.

Storage is Redis when ``REDIS_URL`` is set, else an in-process LRU. A cache failure never
fails a request: the cache is skipped and ``flowgate_ambassador_cache_errors_total`` counts it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from ambassador.chain import Handler, Request, Response
from ambassador.config import Settings


class CacheStore(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...
    def set(self, key: str, entry: dict[str, Any], keep_s: float) -> None: ...


class MemoryCacheStore:
    """LRU with per-entry expiry (the entry is kept for TTL + stale window)."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[0] <= self._clock():
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[1]

    def set(self, key: str, entry: dict[str, Any], keep_s: float) -> None:
        with self._lock:
            self._data[key] = (self._clock() + keep_s, entry)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)


class RedisDown(Exception):
    """Redis failed a moment ago; not trying again yet."""


class RedisCacheStore:
    """Entries in Redis. After a failure Redis is left alone for ``pause_s`` so that a hung
    Redis costs one timeout per pause, not one per request."""

    def __init__(self, client: Any, prefix: str = "flowgate:cache:", pause_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.prefix = prefix
        self.pause_s = pause_s
        self._clock = clock
        self._down_until = 0.0

    def _call(self, fn: Callable[[], Any]) -> Any:
        if self._clock() < self._down_until:
            raise RedisDown("redis paused after a failure")
        try:
            return fn()
        except Exception:
            self._down_until = self._clock() + self.pause_s
            raise

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self._call(lambda: self.client.get(self.prefix + key))
        return json.loads(raw) if raw else None

    def set(self, key: str, entry: dict[str, Any], keep_s: float) -> None:
        self._call(lambda: self.client.set(self.prefix + key, json.dumps(entry),
                                           px=max(1, int(keep_s * 1000))))


def cache_key(request: Request, session_in_key: bool) -> str:
    body = request.body or {}
    identity = request.ctx.get("identity")
    parts = [request.flow_id, body.get("version"), body.get("input_value"), body.get("tweaks"),
             body.get("input_type"), body.get("output_type"), getattr(identity, "tenant", None),
             body.get("session_id") if session_in_key else None]
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Cache:
    name = "cache"

    def __init__(self, settings: Settings, store: CacheStore, *,
                 on_result: Callable[[str], None] | None = None,
                 on_error: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self._on_result = on_result or (lambda result: None)
        self._on_error = on_error or (lambda op: None)
        self._clock = clock

    def __call__(self, request: Request, next: Handler) -> Response:
        if request.route != "/run-flow":
            return next(request)
        policy = self.settings.flows.get(request.flow_id or "")
        cfg = policy.cache if policy else None
        directives = {d.strip().lower() for d in (request.header("cache-control") or "").split(",")}
        if cfg is None or request.stream:
            return self._mark(next(request), "BYPASS")
        key = cache_key(request, cfg.session_in_key)
        entry = None
        if "no-cache" not in directives:
            entry = self._get(key)
            if entry is not None and self._clock() - entry["stored_at"] <= cfg.ttl_s:
                return self._mark(_from_entry(entry), "HIT")
        response = next(request)
        if response.status == 200 and not response.streamed:
            if "no-store" not in directives and len(response.body) <= self.settings.cache.max_body_bytes:
                self._set(key, {"stored_at": self._clock(), "body": response.body.decode(),
                                "content_type": response.headers.get("Content-Type",
                                                                    "application/json")},
                          cfg.ttl_s + cfg.stale_if_error_s)
            return self._mark(response, "BYPASS" if "no-cache" in directives else "MISS")
        if _upstream_failed(response) and cfg.stale_if_error_s > 0:
            entry = entry if entry is not None else self._get(key)
            if entry is not None and self._clock() - entry["stored_at"] <= cfg.ttl_s + cfg.stale_if_error_s:
                stale = _from_entry(entry)
                stale.headers["Warning"] = '110 - "Response is Stale"'
                return self._mark(stale, "STALE")
        return self._mark(response, "MISS")

    def _mark(self, response: Response, result: str) -> Response:
        response.headers["X-Cache"] = result
        response.meta["cache"] = result.lower()
        self._on_result(result.lower())
        return response

    def _get(self, key: str) -> dict[str, Any] | None:
        try:
            return self.store.get(key)
        except Exception:
            self._on_error("get")
            return None

    def _set(self, key: str, entry: dict[str, Any], keep_s: float) -> None:
        try:
            self.store.set(key, entry, keep_s)
        except Exception:
            self._on_error("set")


def _upstream_failed(response: Response) -> bool:
    return ("upstream_error" in response.meta or response.meta.get("breaker_open")
            or response.status in (500, 502, 503, 504))


def _from_entry(entry: dict[str, Any]) -> Response:
    return Response(200, {"Content-Type": entry.get("content_type", "application/json")},
                    entry["body"].encode(), meta={"cached": True})
