"""Response cache for flows that opt in (``flows.<id>.cache`` in the config).

Key: SHA-256 of (flow id, pinned version, input, tweaks, input and output type, the
caller's tenant, and the session id when ``session_in_key``). Stored: successful,
non-streamed run answers only — never errors, never streams. ``Cache-Control: no-cache``
skips the lookup (the fresh answer is still stored); ``no-store`` skips storing. When the
engine fails (unreachable, open breaker, 500/502/503/504 — a 502 is a failed LLM, exactly
when an older answer helps), an entry up to ``stale_if_error_s`` past its TTL is served
instead (``X-Cache: STALE``). ``X-Cache`` is HIT, MISS, BYPASS or STALE on every run answer.

Storage (:mod:`ambassador.filters.cache_stores`) is Redis when ``REDIS_URL`` is set — with
an in-process fallback while Redis fails — else an in-process LRU bounded by entries and
bytes. A cache failure never fails a request: the cache is skipped and
``flowgate_ambassador_cache_errors_total`` counts it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from ambassador.chain import Handler, Request, Response
from ambassador.config import Settings
from ambassador.filters.cache_stores import CacheStore, MemoryCacheStore, RedisCacheStore

__all__ = ["Cache", "CacheStore", "MemoryCacheStore", "RedisCacheStore", "cache_key"]


def cache_key(request: Request, session_in_key: bool) -> str:
    body = request.body or {}
    identity = request.ctx.get("identity")
    # the tenant the engine keeps the caller's runs and history under: its tenant, else its
    # identity (flow_engine/auth.py) — one caller must never get another's cached answer
    tenant = (identity.tenant or identity.name) if identity is not None else None
    parts = [request.flow_id, body.get("version"), body.get("input_value"), body.get("tweaks"),
             body.get("input_type"), body.get("output_type"), tenant,
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
