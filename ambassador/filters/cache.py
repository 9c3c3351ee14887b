"""Response cache for flows that opt in (``flows.<id>.cache`` in the config).

Key: SHA-256 of (flow id, the version that answers, input, tweaks, input and output type,
the caller's tenant, and the session id when ``session_in_key``). The version comes from
:mod:`ambassador.routing_view` before the request is sent — the body's pin, the live
version, or a sticky canary's choice — so an answer cached from one version is never served
to a request routing now sends to another (after a publish, a rollback, a canary step or
abort). A non-sticky canary is a draw per request in the engine: such requests are not
looked up (``X-Cache: BYPASS``); every answer is stored under the version the engine says
served it (``X-Flow-Version``). Stored: successful, non-streamed run answers only — never
errors, never streams. ``Cache-Control: no-cache`` skips the lookup (the fresh answer is
still stored); ``no-store`` skips storing. When the engine fails (unreachable, open
breaker, 500/502/503/504 — a 502 is a failed LLM, exactly when an older answer helps), an
entry up to ``stale_if_error_s`` past its TTL is served instead (``X-Cache: STALE``).
``X-Cache`` is HIT, MISS, BYPASS or STALE on every run answer; a cached answer carries the
``X-Flow-Version`` it was stored with.

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
from ambassador.routing_view import RoutingView

__all__ = ["Cache", "CacheStore", "MemoryCacheStore", "RedisCacheStore", "cache_key"]


def cache_key(request: Request, session_in_key: bool, version: int | None) -> str:
    body = request.body or {}
    identity = request.ctx.get("identity")
    # the tenant the engine keeps the caller's runs and history under: its tenant, else its
    # identity (flow_engine/auth.py) — one caller must never get another's cached answer
    tenant = (identity.tenant or identity.name) if identity is not None else None
    parts = [request.flow_id, version, body.get("input_value"), body.get("tweaks"),
             body.get("input_type"), body.get("output_type"), tenant,
             body.get("session_id") if session_in_key else None]
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Cache:
    name = "cache"

    def __init__(self, settings: Settings, store: CacheStore, routing: RoutingView, *,
                 on_result: Callable[[str], None] | None = None,
                 on_error: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.routing = routing
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
        version = self.routing.version_for(request.flow_id or "", request.body or {})
        key = cache_key(request, cfg.session_in_key, version) if version is not None else None
        entry = None
        if key is not None and "no-cache" not in directives:
            entry = self._get(key)
            if entry is not None and self._clock() - entry["stored_at"] <= cfg.ttl_s:
                return self._mark(_from_entry(entry), "HIT")
        response = next(request)
        if response.status == 200 and not response.streamed:
            served = _served_version(response)
            if (served is not None and "no-store" not in directives
                    and len(response.body) <= self.settings.cache.max_body_bytes):
                self._set(cache_key(request, cfg.session_in_key, served),
                          {"stored_at": self._clock(), "body": response.body.decode(),
                           "version": served,
                           "content_type": response.headers.get("Content-Type",
                                                                "application/json")},
                          cfg.ttl_s + cfg.stale_if_error_s)
            looked = key is not None and "no-cache" not in directives
            return self._mark(response, "MISS" if looked else "BYPASS")
        if key is not None and _upstream_failed(response) and cfg.stale_if_error_s > 0:
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


def _served_version(response: Response) -> int | None:
    """The version the engine says answered (None: it did not say — not stored)."""
    raw = response.headers.get("X-Flow-Version", "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 10 else None


def _from_entry(entry: dict[str, Any]) -> Response:
    headers = {"Content-Type": entry.get("content_type", "application/json")}
    if entry.get("version") is not None:
        headers["X-Flow-Version"] = str(entry["version"])
    return Response(200, headers, entry["body"].encode(), meta={"cached": True})
