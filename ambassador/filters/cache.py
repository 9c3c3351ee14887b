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
``X-Cache`` is HIT, MISS, BYPASS, STALE or COALESCED on every run answer; a cached answer
carries the ``X-Flow-Version`` it was stored with.

Coalescing (:mod:`ambassador.filters.coalesce`): a request that misses for a key another
request is already fetching does not call the engine; it waits for that leader's answer —
at most its deadline, else ``upstream.timeouts.total_s``, then a 504 ``timeout`` (or a
stale entry) — and answers with it as ``COALESCED`` (``STALE`` when the leader's answer
was a stale entry): the same status and body, errors included, and the leader's
``X-Run-ID`` (the run that produced the answer), with the follower's own trace ids. A
leader stores its answer before its followers wake, so a request arriving later finds it
cached. ``no-cache`` requests never join a flight (they may lead one); ``no-store`` has no
bearing on coalescing. Requests whose version is not known before the answer (a
non-sticky canary) are neither looked up nor coalesced; a request with the caller's own
``Idempotency-Key`` (its answer may be a replay or a 409 of its own) is looked up but never
coalesced; a fault drill's request (``X-Flowgate-Fault``) bypasses the cache altogether.

Storage (:mod:`ambassador.filters.cache_stores`) is Redis when ``REDIS_URL`` is set — with
an in-process fallback while Redis fails — else an in-process LRU bounded by entries and
bytes. A cache failure never fails a request: the cache is skipped and
``flowgate_ambassador_cache_errors_total`` counts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ambassador.chain import Handler, Request, Response, error_response, note
from ambassador.config import FlowCache, Settings
from ambassador.filters.cache_stores import CacheStore, MemoryCacheStore, RedisCacheStore
from ambassador.filters.coalesce import FAILED, Flight, Flights, Landing, follower_response
from ambassador.routing_view import RoutingView

__all__ = ["Cache", "CacheStore", "Flights", "MemoryCacheStore", "RedisCacheStore", "cache_key"]
log = logging.getLogger("ambassador.cache")


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
                 clock: Callable[[], float] = time.time,
                 flights: Flights | None = None) -> None:
        self.settings = settings
        self.store = store
        self.routing = routing
        self._on_result = on_result or (lambda result: None)
        self._on_error = on_error or (lambda op: None)
        self._clock = clock
        # the app passes one that outlives config reloads (a flight in the air stays joinable)
        self.flights = flights if flights is not None else Flights()

    def __call__(self, request: Request, next: Handler) -> Response:
        if request.route != "/run-flow":
            return next(request)
        policy = self.settings.flows.get(request.flow_id or "")
        cfg = policy.cache if policy else None
        directives = {d.strip().lower() for d in (request.header("cache-control") or "").split(",")}
        if cfg is None or request.stream or request.header("x-flowgate-fault") is not None:
            # a fault drill's request (ambassador/filters/fault.py) is the drill's own: never
            # answered from the cache, stored in it or shared with identical requests
            return self._mark(next(request), "BYPASS")
        version = self.routing.version_for(request.flow_id or "", request.body or {})
        if version is None:  # the engine draws, or the routing is unknown now: no lookup, no flight
            # should the engine fail: the answer of the version the last view (not older
            # than stale_if_error_s) chose, if still within stale_if_error_s
            last = self.routing.last_version_for(request.flow_id or "", request.body or {},
                                                 max_age_s=cfg.stale_if_error_s)
            return self._fetch(request, next, cfg, directives, None, None,
                               stale_key=None if last is None
                               else cache_key(request, cfg.session_in_key, last))
        key = cache_key(request, cfg.session_in_key, version)
        no_cache = "no-cache" in directives
        landed = self.flights.landed
        entry = None
        if not no_cache:
            entry = self._get(key)
            if self._fresh(entry, cfg):
                return self._mark(_from_entry(entry), "HIT")
        if request.header("idempotency-key") is not None:
            # the caller's own key makes the engine's answer its own (a replay of its earlier
            # run, a 409 for a key reused): it neither leads nor joins a flight
            return self._fetch(request, next, cfg, directives, key, entry)
        trace = request.ctx.get("trace")
        # no-cache asked for a fresh answer: it never joins a flight (it may lead one)
        flight, leads = self.flights.claim(key, join=not no_cache,
                                           leader_trace_id=trace.trace_id if trace else None)
        if flight is None:  # no-cache with an identical request in flight: a call of its own
            return self._fetch(request, next, cfg, directives, key, entry)
        if not leads:
            return self._follow(request, next, cfg, directives, key, entry, flight)
        landing = FAILED  # what followers get if this raises
        try:
            response = None
            if not no_cache and self.flights.landed != landed:
                # a flight landed between the lookup and the claim, maybe this key's: its
                # answer is stored by now (a leader stores before it lands)
                entry = self._get(key)
                if self._fresh(entry, cfg):
                    response = self._mark(_from_entry(entry), "HIT")
            if response is None:
                response = self._fetch(request, next, cfg, directives, key, entry)
            landing = Landing.of(response)
            return response
        finally:
            self.flights.land(flight, landing)

    def _fetch(self, request: Request, next: Handler, cfg: FlowCache, directives: set[str],
               key: str | None, entry: dict[str, Any] | None, *,
               stale_key: str | None = None) -> Response:
        """The engine's answer: stored when it may be, else a stale entry (``key``'s, or
        ``stale_key``'s when there was no lookup) when the engine failed. Marked once."""
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
        return (self._stale(key or stale_key, entry, cfg, response)
                or self._mark(response, "MISS" if key is not None else "BYPASS"))

    def _follow(self, request: Request, next: Handler, cfg: FlowCache, directives: set[str],
                key: str, entry: dict[str, Any] | None, flight: Flight) -> Response:
        """Wait for the leader's answer — at most the request's deadline, else the
        upstream's total timeout — and answer with it."""
        leader = flight.leader_trace_id
        note(request, "cache.coalesced", **{"flowgate.leader_trace_id": leader or ""})
        log.debug("waiting for an identical request in flight",
                  extra={"flow_id": request.flow_id, "leader_trace_id": leader})
        bound = self.settings.upstream.timeouts.total_s
        deadline = request.ctx.get("deadline")
        if isinstance(deadline, int | float):
            bound = min(bound, deadline - time.monotonic())
        started = time.perf_counter()
        landing = self.flights.wait(flight, bound)
        waited = time.perf_counter() - started
        if landing is not None and landing.kind == "unshared":
            return self._fetch(request, next, cfg, directives, key, entry)
        if landing is None:
            timeout = error_response(
                504, "timeout", f"no answer within {max(bound, 0):g} s (waited for an "
                "identical request's answer)", request)
            response = self._stale(key, entry, cfg, timeout) or self._mark(timeout, "COALESCED")
        elif landing.kind == "failed":
            log.error("the identical request this one waited for failed",
                      extra={"flow_id": request.flow_id, "leader_trace_id": leader})
            response = self._mark(error_response(500, "internal", "internal error; the trace "
                                                 "id identifies it in the logs", request),
                                  "COALESCED")
        else:
            response = self._mark(follower_response(landing, request),
                                  "STALE" if landing.result == "STALE" else "COALESCED")
        # time spent waiting for the engine's answer: not the ambassador's overhead (nor an
        # upstream attempt of this request's)
        response.meta["waited_s"] = waited
        return response

    def _stale(self, key: str | None, entry: dict[str, Any] | None, cfg: FlowCache,
               response: Response) -> Response | None:
        """The entry still within ``stale_if_error_s`` when ``response`` is an upstream
        failure (None otherwise)."""
        if key is None or not _upstream_failed(response) or cfg.stale_if_error_s <= 0:
            return None
        entry = entry if entry is not None else self._get(key)
        if entry is None or self._clock() - entry["stored_at"] > cfg.ttl_s + cfg.stale_if_error_s:
            return None
        stale = _from_entry(entry)
        stale.headers["Warning"] = '110 - "Response is Stale"'
        return self._mark(stale, "STALE")

    def _fresh(self, entry: dict[str, Any] | None, cfg: FlowCache) -> bool:
        return entry is not None and self._clock() - entry["stored_at"] <= cfg.ttl_s

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
