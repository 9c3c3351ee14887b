"""``create_app(config)``: load settings, build the filter chain, mount the routes.

Routes (DESIGN.md "Ambassador HTTP API"; described in :mod:`ambassador.openapi`):
``POST /run-flow`` (served below Flask by :class:`ambassador.run_flow.RunFlowPath`),
``GET /runs/<id>/events``, ``WS /ws/run-flow`` (:mod:`ambassador.ws`), ``GET /healthz``,
``GET /readyz`` (``?verbose=1`` adds upstream health), ``GET /metrics``,
``GET /openapi.json``. Every route runs its request through the filter chain with
:func:`ambassador.answer.answer`, which records its metrics and access line once the answer
has gone out.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, g, jsonify, request, stream_with_context
from flask import Response as FlaskResponse
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ambassador import config as config_module
from ambassador import hygiene, openapi
from ambassador import ws as ws_route
from ambassador.answer import answer, forwarded
from ambassador.chain import Handler, Request, Response, build_chain
from ambassador.filters.auth import Auth
from ambassador.filters.breaker import Breaker, CircuitBreaker
from ambassador.filters.cache import Cache, CacheStore, MemoryCacheStore, RedisCacheStore
from ambassador.filters.fallback import Fallback
from ambassador.filters.ratelimit import LocalBuckets, RateLimit, RedisBuckets
from ambassador.filters.retry import Retry, RetryBudget
from ambassador.filters.timeout import Timeout
from ambassador.filters.trace import Trace
from ambassador.host_guard import HostGuard, local_host
from ambassador.labels import FlowLabels
from ambassador.metrics import BREAKER_STATES, AmbassadorMetrics
from ambassador.redis_pause import RedisPause
from ambassador.routing_view import RoutingView
from ambassador.run_flow import RunFlowPath
from ambassador.upstream import Upstream
from flowgate import jsonlog, otel, tracing
from flowgate.at_exit import flush_at_exit
from flowgate.signals import Signals

log = logging.getLogger("ambassador")
ROUTING_READ_S = 1.0  # reading a flow's routing gives up after this (the last view stands)
PROBES = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})  # not in in-flight
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}


class Ambassador:
    """The per-process state: settings in force, the chain built from them, the metrics."""

    def __init__(self, settings: config_module.Settings, metrics: AmbassadorMetrics,
                 path: str | None, overrides: Mapping[str, Any] | None = None) -> None:
        self.metrics = metrics
        # spans over OTLP when the OTEL_* variables ask for them (flowgate/otel.py); else
        # None. Environment only: a config reload keeps it.
        self.telemetry = otel.from_env("flowgate-ambassador", on_dropped=lambda reason, n: (
            metrics.spans_dropped.labels(reason).inc(n)))
        if self.telemetry is not None:
            flush_at_exit(self.telemetry.flush)
        self.labels = FlowLabels()  # outlives reloads: the flows seen stay label values
        refuse = os.environ.get(config_module.REFUSE_NO_AUTH_ENV) == "1"
        # which version answers a request, for the cache (outlives reloads; asks whichever
        # upstream is in force)
        self.routing = RoutingView(lambda ref: self.upstream.flow(ref, ROUTING_READ_S))
        self.holder = config_module.ConfigHolder(
            settings, path, overrides=overrides, on_change=self.rebuild,
            on_reload_error=lambda _msg: metrics.config_reload_errors.inc(),
            check=config_module.refuse_no_auth if refuse else None)
        self.rebuild(settings)
        self.signals = _follow_flow_changes(settings.redis_url, self.routing)

    def rebuild(self, settings: config_module.Settings) -> None:
        """Build everything ``settings`` needs, then put it in force all at once: a part
        that cannot be built (a key file) leaves the previous config wholly in force."""
        m = self.metrics
        auth = Auth(settings.inbound_auth,
                    on_failure=lambda reason: m.auth_failures.labels(reason).inc())
        redis_client = _redis(settings.redis_url)
        # one pause for every store on this Redis: a failure one sees spares the others
        redis_pause = RedisPause(settings.redis_pause_s, on_failure=m.redis_failures.inc)

        def transition(old: str, new: str) -> None:
            for state in BREAKER_STATES:
                m.breaker_state.labels(state).set(1 if state == new else 0)
            m.breaker_transitions.labels(new).inc()
            log.warning("circuit breaker %s → %s", old, new)

        def observe(outcome: str, seconds: float) -> None:
            m.upstream_attempts.labels(outcome).inc()
            m.upstream_up.set(0 if outcome in ("connect_error", "timeout", "reset") else 1)

        upstream = Upstream(settings.upstream, settings.upstream_key(), observe=observe)
        b = settings.breaker
        probe = (lambda: upstream.ready(b.readiness_path, b.probe_timeout_s)) \
            if b.readiness_path else None
        breaker = CircuitBreaker(b, probe=probe, on_transition=transition, on_probe=lambda ready:
                                 m.breaker_probes.labels("ready" if ready else "not_ready").inc())
        available = {
            "trace": Trace(),
            "auth": auth,
            "ratelimit": RateLimit(settings, LocalBuckets(),
                                   RedisBuckets(redis_client, pause=redis_pause)
                                   if redis_client else None,
                                   on_limited=lambda scope: m.ratelimited.labels(scope).inc(),
                                   on_error=m.ratelimit_errors.inc),
            "fallback": Fallback(settings, on_fallback=lambda flow: m.fallbacks.labels(
                self.labels.of(flow)).inc()),
            "cache": Cache(settings, self._cache_store(settings, redis_client, redis_pause),
                           self.routing, on_result=lambda r: m.cache.labels(r).inc(),
                           on_error=lambda op: m.cache_errors.labels(op).inc()),
            "breaker": Breaker(breaker),
            "retry": Retry(settings.retry, RetryBudget(settings.retry.budget_ratio,
                                                       settings.retry.budget_min_per_s,
                                                       settings.retry.budget_window_s),
                           on_retry=lambda reason: m.retries.labels(reason).inc(),
                           on_budget_exhausted=m.retry_budget_exhausted.inc),
            "timeout": Timeout(settings.upstream.timeouts),
        }
        old = getattr(self, "upstream", None)
        self.upstream, self.breaker, self.auth = upstream, breaker, auth
        self.chain: Handler = build_chain([available[name] for name in settings.filters], upstream)
        # the WebSocket handshake and its messages pass the caller-facing filters only
        self.handshake_filters = [available[name] for name in settings.filters
                                  if name in ("trace", "auth", "ratelimit")]
        self.labels.configure(settings)
        self.settings = settings
        if old is not None:
            old.close()

    def _cache_store(self, settings: config_module.Settings, redis_client: Any,
                     pause: RedisPause) -> CacheStore:
        """Redis with a bounded in-memory fallback, or (no Redis) the in-memory store."""
        m = self.metrics

        def size(held: int, entries: int) -> None:
            m.cache_memory_bytes.set(held)
            m.cache_memory_entries.set(entries)

        def fallback(op: str) -> None:
            m.cache_errors.labels(op).inc()  # the configured store failed...
            m.cache_fallback.labels(op).inc()  # ...and memory did it instead

        memory = MemoryCacheStore(settings.cache.max_entries, settings.cache.max_bytes,
                                  on_size=size)
        if redis_client is None:
            return memory
        return RedisCacheStore(redis_client, memory, pause=pause, on_fallback=fallback)

    def handle(self, req: Request) -> Response:
        self.holder.maybe_reload()
        return self.chain(req)

    def authenticated(self, environ: Mapping[str, Any]) -> bool:
        """Is this caller one the inbound auth knows? With no inbound auth (mode none, or
        no auth filter): only a caller on this host (loopback) is."""
        if self.settings.inbound_auth.mode == "none" or "auth" not in self.settings.filters:
            # on this host, and not a rebound web page (its Host is the page's own name)
            return _loopback(environ.get("REMOTE_ADDR")) and local_host(
                environ.get("HTTP_HOST"), self.settings.allowed_hosts)
        headers = forwarded(environ)
        if hygiene.header_problem(headers):
            return False
        return self.auth.identify(Request("GET", "", headers, "/readyz")) is not None


def _loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _follow_flow_changes(redis_url: str | None, routing: RoutingView) -> Signals | None:
    """With Redis (the engine's), the engine's flow_changed signals drop the cache's view
    of a flow's routing at once; without, the view is re-read every 2 s."""
    if not redis_url:
        return None
    signals = Signals(_redis(redis_url, timeout_s=5.0), on_subscribe=routing.forget_all)
    signals.on("flow_changed", lambda m: routing.forget(m.get("flow_id"), m.get("name")))
    signals.start()
    return signals


def _redis(url: str | None, timeout_s: float = 0.5):
    if not url:
        return None
    import redis

    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=timeout_s,
                                socket_timeout=timeout_s, health_check_interval=30)


def create_app(config: Mapping[str, Any] | None = None, *, path: str | None = None,
               metrics: AmbassadorMetrics | None = None) -> Flask:
    """``config`` maps dotted keys to values (``{"upstream.url": ...}``) over the YAML file."""
    path = path if path is not None else os.environ.get("AMBASSADOR_CONFIG")
    settings = config_module.load(path, overrides=config)
    jsonlog.configure(settings.log_level)
    amb = Ambassador(settings, metrics or AmbassadorMetrics(), path, config)
    app = Flask("ambassador")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["ambassador"] = amb
    _routes(app, amb)
    app.wsgi_app = RunFlowPath(amb, app.wsgi_app)  # type: ignore[method-assign]
    app.wsgi_app = HostGuard(app.wsgi_app, lambda: amb.settings)  # type: ignore[method-assign]
    return app


def _routes(app: Flask, amb: Ambassador) -> None:
    m = amb.metrics

    @app.before_request
    def _start():
        g.started = time.perf_counter()
        g.trace = tracing.from_headers(request.headers.get("traceparent"),
                                       request.headers.get("X-Request-ID"))
        g.token = tracing.current.set(g.trace)
        if request.path not in PROBES:
            g.in_flight = True
            m.in_flight.inc()

    @app.teardown_request
    def _end(_exc):
        if g.pop("in_flight", False):  # teardown runs twice for streamed answers
            m.in_flight.dec()
        token = g.pop("token", None)
        if token is not None:
            tracing.current.reset(token)

    @app.after_request
    def _headers(response):
        trace = g.get("trace")
        if trace is not None:  # on every answer, errors included
            response.headers.setdefault("X-Trace-ID", trace.trace_id)
            response.headers.setdefault("traceparent", trace.traceparent)
            response.headers.setdefault("X-Request-ID", trace.request_id)
        return response

    def bad_request(message: str, status: int = 400, code: str = "bad_request"):
        trace = g.get("trace")
        return jsonify({"error": {"code": code, "message": message,
                                  "trace_id": trace.trace_id if trace else None}}), status

    @app.get("/runs/<run_id>/events")
    def run_events(run_id: str):
        if not hygiene.valid_id(run_id):
            return bad_request("invalid run id")
        last = request.args.get("last_event_id")
        if last is not None and not hygiene.valid_last_event_id(last):
            return bad_request("last_event_id must be a non-negative integer (ASCII digits)")
        headers = forwarded(request.environ)
        problem = hygiene.header_problem(headers)
        if problem:
            return bad_request(problem)
        path = f"/api/v1/runs/{run_id}/events" + (f"?last_event_id={last}" if last else "")
        req = Request("GET", path, headers, "/runs/<id>/events", None, stream=True)
        # callers limited to some flows may only watch runs of those flows
        req.ctx["flow_of_run"] = lambda: amb.upstream.flow_of_run(run_id, req)
        return _proxy(req)

    def _proxy(req: Request):
        status, headers, body, done = answer(amb, req, g.trace, g.started)
        if done is None:  # a stream: keep the request context (in-flight gauge) until its end
            return FlaskResponse(stream_with_context(body), status=status, headers=headers,
                                 direct_passthrough=True)
        response = FlaskResponse(body, status=status, headers=headers)
        response.call_on_close(done)
        return response

    ws_route.mount(app, amb)

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        """Ready once the config is loaded: never tied to the engine's health, so an engine
        outage does not pull every app pod out of its Service. ``verbose`` shows where the
        engine and the config file are, and why the last reload failed, only to callers
        the inbound auth knows (with none: to this host); anyone sees the rest."""
        body: dict[str, Any] = {"status": "ready"}
        if request.args.get("verbose"):
            up = amb.upstream
            body["upstream"] = {
                "breaker": amb.breaker.state, "last_ok": up.last_ok,
                "last_error": {"at": up.last_error[0], "kind": up.last_error[1]}
                if up.last_error else None}
            body["config"] = {"last_reload_failed": amb.holder.last_error is not None}
            if amb.authenticated(request.environ):
                body["upstream"]["url"] = amb.settings.upstream.url
                body["config"].update(path=amb.holder.path,
                                      last_reload_error=amb.holder.last_error)
        return jsonify(body)

    @app.get("/metrics")
    def metrics():
        data, content_type = m.render()
        return FlaskResponse(data, content_type=content_type)

    @app.get("/openapi.json")
    def openapi_json():
        return jsonify(openapi.SPEC)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 404 and request.path.startswith("/api/"):  # an engine path, sent here
            message = (f"no route {request.path}: this is the ambassador sidecar; apps call "
                       "POST /run-flow (or GET /runs/{run_id}/events, /ws/run-flow) and the "
                       "engine's /api/v1 is not served here")
        response, _ = bad_request(message, status, _HTTP_CODES.get(status, "http_error"))
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # RFC 9110: with a 405
        return response, status

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return bad_request("internal error; the trace id identifies it in the logs", 500, "internal")


__all__ = ["Ambassador", "create_app"]
