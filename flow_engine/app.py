"""``create_app(config)``: settings → store → services → blueprints. No logic here."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from flow_engine import console
from flow_engine.api import components, flows, health, knowledge, openapi, runs, ws
from flow_engine.api.common import Engine, authenticate, check_host
from flow_engine.auth import KeyRing
from flow_engine.components import default_registry
from flow_engine.config import Settings
from flow_engine.errors import FlowgateError, TenantLimited
from flow_engine.interop import api as interop
from flow_engine.knowledge.service import KnowledgeService
from flow_engine.maintenance import Maintenance
from flow_engine.metrics import EngineMetrics
from flow_engine.rollouts.controller import RolloutController
from flow_engine.rollouts.figures import RecentFigures
from flow_engine.rollouts.outcomes import OutcomeRecorder, RedisWindow, StoreWindow
from flow_engine.runs.events import MemoryEventLog, RedisEventLog, RunEventLog
from flow_engine.runs.service import RunService
from flow_engine.service import FlowService
from flow_engine.store import SqlFlowStore
from flow_engine.store.engines import PoolSize
from flow_engine.tenants import TenantLimits
from flow_engine.ws_tickets import WsTickets
from flowgate.common import gevent_worker, jsonlog, otel, tracing
from flowgate.common.at_exit import flush_at_exit
from flowgate.common.signals import Signals

log = logging.getLogger("flow_engine")
access_log = logging.getLogger("flow_engine.access")
API_PREFIX = "/api/v1"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# probes and scrapes (every few seconds, per kubelet, ambassador and Prometheus) make no
# traces: they would bury the runs in Tempo and fill the span queue
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
               413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limited",
               431: "request_header_fields_too_large"}


def create_app(config: Mapping[str, Any] | None = None, *, metrics: EngineMetrics | None = None,
               migrate: bool = True) -> Flask:
    settings = Settings.load(config)
    jsonlog.configure(settings.log_level)
    keys = settings.check()
    if not keys:
        log.warning("AUTH DISABLED: the engine accepts requests without an API key "
                    "(--insecure-no-auth); never run it like this outside a developer machine")
    metrics = metrics or EngineMetrics()
    # spans over OTLP when the OTEL_* variables ask for them (flowgate/common/otel.py); else None
    telemetry = otel.from_env("flowgate-engine", on_dropped=lambda reason, n: (
        metrics.spans_dropped.labels(reason).inc(n)))
    if telemetry is not None:  # registered first, so it runs last: after the runs' records
        flush_at_exit(telemetry.flush)  # (and their spans) are flushed; bounded (2 s)
    store = SqlFlowStore(settings.database_url,
                         on_error=lambda op: metrics.store_errors.labels(op).inc(),
                         on_reconnect=lambda op: metrics.store_reconnects.labels(op).inc(),
                         on_audit=metrics.audited,
                         pool=PoolSize(settings.db_pool_size, settings.db_max_overflow,
                                       settings.db_pool_timeout_s))
    if migrate:
        store.migrate()
    events, signals, limits, window, tickets = _shared_state(settings, metrics, keys, store)
    # knowledge bases (flow_engine/knowledge): completes its schema if it can, recovers
    # indexing a dead engine left, and is the lookup KnowledgeRetriever nodes search with
    knowledge_service = KnowledgeService.for_engine(settings, store)
    flow_service = FlowService(store, default_registry(), settings, metrics, signals=signals,
                               lookups={"knowledge": knowledge_service})
    # guarded rollouts (flow_engine/rollouts/): every run's outcome into the shared window,
    # and the controller that judges guarded canaries and publishes from it
    outcomes = OutcomeRecorder(window, flush_s=settings.outcome_flush_s,
                               on_error=metrics.outcome_flush_errors.inc)
    run_service = RunService(flow_service, store, settings, metrics, events=events,
                             signals=signals, limits=limits, outcomes=outcomes,
                             telemetry=telemetry)
    if signals is not None:
        signals.start()
    maintenance = Maintenance(store, settings, metrics)
    maintenance.start()  # a pass now (runs left behind by a dead process), then periodically
    rollouts = RolloutController(store, outcomes, metrics, interval_s=settings.rollout_interval_s,
                                 on_change=flow_service.forget,
                                 check_builds=flow_service.check_builds)
    outcomes.start()
    rollouts.start()
    flush_at_exit(outcomes.flush)
    flush_at_exit(run_service.executor.flush)  # ended runs still queued reach the store

    app = Flask("flow_engine")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["flowgate"] = Engine(settings, store, metrics, flow_service, run_service, keys,
                                        maintenance, rollouts, tickets, RecentFigures(outcomes))
    app.extensions[knowledge.EXTENSION] = knowledge_service
    app.extensions["flowgate_telemetry"] = telemetry

    _install_request_hooks(app, metrics, telemetry)  # first: errors below carry the trace id

    @app.before_request
    def _auth():  # every /api/v1 path, known or not: unauthenticated callers learn nothing
        if not keys and request.path.startswith(API_PREFIX + "/"):
            check_host(request.host, settings.allowed_hosts)
        if request.path.startswith(API_PREFIX + "/"):
            authenticate()

    app.register_blueprint(health.bp)
    app.register_blueprint(console.bp)  # /ui/: the console (flow_engine/console)
    for blueprint in (components.bp, flows.bp, runs.bp, ws.bp, openapi.bp, knowledge.bp,
                      interop.bp):
        app.register_blueprint(blueprint, url_prefix=API_PREFIX)
    _install_error_handlers(app)
    return app


def _shared_state(settings: Settings, metrics: EngineMetrics, keys: KeyRing, store: Any):
    """The run event log, the signals, the tenant limits, the window of run outcomes and the
    WebSocket tickets: shared between processes through Redis when REDIS_URL is set (the
    outcomes through the store otherwise)."""
    # This process's recent runs, for live watching and resuming: bounded in bytes so that a
    # busy worker stays small (Redis, when configured, keeps events for event_ttl_s).
    memory = MemoryEventLog(max_runs=settings.event_memory_runs,
                            max_bytes=settings.event_memory_bytes,
                            ttl_s=min(settings.event_ttl_s, 600.0),
                            on_bytes=metrics.event_memory_bytes.set)
    policy = settings.tenant_policy(keys)
    on_error = lambda op: metrics.event_log_errors.labels(op).inc()  # noqa: E731
    if not settings.redis_url:
        return (RunEventLog(memory), None, TenantLimits(policy, on_error=on_error),
                StoreWindow(store), WsTickets(keys=keys))
    import redis

    # Every call gives up after redis_timeout_s: a hung Redis costs a request that much. A
    # blocking XREAD waits at most as long again, on a client whose timeout allows for it.
    # A connection Redis closed (a restart) is replaced at once, once; a timeout is final.
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    def connect(timeout: float, read_timeout: float | None = None) -> redis.Redis:
        return redis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_connect_timeout=timeout,
            socket_timeout=read_timeout or timeout, health_check_interval=30,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))

    timeout = settings.redis_timeout_s
    client, reader = connect(timeout), connect(timeout, 2 * timeout)
    quick = connect(min(0.5, timeout))  # admission is on every run's path: half a second at most
    shared = RedisEventLog(client, reader=reader, ttl_s=int(settings.event_ttl_s),
                           block_s=timeout, retry_s=settings.event_write_retry_s,
                           on_error=on_error, on_lost=metrics.event_log_lost.inc)
    flush_at_exit(shared.flush)  # a worker's last events still reach Redis on SIGTERM
    limits = TenantLimits(policy, quick if policy.limited else None, on_error=on_error)
    return (RunEventLog(memory, shared), Signals(client, on_error=on_error), limits,
            RedisWindow(client), WsTickets(client, keys=keys))


def _install_request_hooks(app: Flask, metrics: EngineMetrics,
                           telemetry: otel.Telemetry | None) -> None:
    @app.before_request
    def _start():
        g.started = time.perf_counter()
        g.trace = tracing.from_headers(request.headers.get("traceparent"),
                                       request.headers.get("X-Request-ID"))
        g.trace_token = tracing.current.set(g.trace)
        if telemetry is not None and (request.url_rule is None
                                      or request.url_rule.rule not in _UNTRACED):
            _start_span(telemetry)

    @app.after_request
    def _finish(response):
        trace = getattr(g, "trace", None)
        if trace is not None:
            response.headers["X-Trace-ID"] = trace.trace_id
            response.headers["X-Request-ID"] = trace.request_id
            response.headers["traceparent"] = trace.traceparent
        route = request.url_rule.rule if request.url_rule else "unmatched"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        # the time spent in the engine, so a proxy can tell its own share of the latency
        # (the ambassador's X-Ambassador-Overhead-Ms); idem: claiming an Idempotency-Key
        timing = f"app;dur={elapsed * 1000:.3f}"
        if g.get("claim_s"):
            timing += f", idem;dur={g.claim_s * 1000:.3f}"
        response.headers["Server-Timing"] = timing
        # labels never take a caller's string: methods outside a fixed set are "other"
        method = request.method if request.method in _METHODS else "other"
        metrics.http_requests.labels(route, method, str(response.status_code)).inc()
        metrics.http_duration.labels(route, method).observe(elapsed)
        if route not in ("/healthz", "/readyz", "/metrics"):
            caller = g.get("principal")
            access_log.info("request", extra={
                "method": method, "path": request.path, "route": route,
                "status": response.status_code, "duration_ms": round(elapsed * 1000, 3),
                "flow_id": g.get("flow_id"), "run_id": g.get("run_id"),
                "actor": caller.actor if caller else None,
                "tenant": caller.tenant if caller else None})
        span = g.pop("span", None)
        if span is not None:  # ended once the answer (a stream: its end) has gone out
            caller = g.get("principal")
            attrs = {"flowgate.flow.id": g.get("flow_id"), "flowgate.run.id": g.get("run_id"),
                     "flowgate.tenant": caller.tenant if caller else None,
                     "flowgate.actor": caller.actor if caller else None}
            if request.headers.get("Upgrade", "").lower() == "websocket" \
                    and response.status_code < 300:  # a session the view ran to its end
                otel.ended_with(span, 101, **attrs)
            else:
                status = response.status_code
                response.call_on_close(lambda: otel.ended_with(span, status, **attrs))
        return response

    @app.teardown_request
    def _reset(_exc):
        token = g.pop("trace_token", None)
        if token is not None:
            tracing.current.reset(token)
        if telemetry is not None:
            _end_span(telemetry)


def _start_span(telemetry: otel.Telemetry) -> None:
    """The request's server span, current while the request is handled."""
    route = request.url_rule.rule if request.url_rule else None
    method = request.method if request.method in _METHODS else "other"
    attrs = {"http.request.method": method, "url.path": request.path}
    if route:
        attrs["http.route"] = route
    # from when the request's head arrived: the time it waited for the worker shows
    g.span = telemetry.server_span(f"{method} {route}" if route else method, g.trace,
                                   request.headers.get("traceparent"), attrs,
                                   gevent_worker.request_arrived())
    g.span_token = telemetry.activate(g.span)


def _end_span(telemetry: otel.Telemetry) -> None:
    token = g.pop("span_token", None)
    if token is not None:
        telemetry.deactivate(token)
    span = g.pop("span", None)  # still here: no response was made (after_request ends it)
    if span is not None:
        otel.ended_with(span, 500, error="no_response")


def _error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
    trace = g.get("trace")
    body = {**body, "trace_id": trace.trace_id if trace else None}
    return jsonify({"error": body}), status, headers or {}


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(FlowgateError)
    def _flowgate(exc: FlowgateError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if g.get("run_id"):
            headers["X-Run-ID"] = g.run_id
        if g.get("flow_version") is not None:
            headers["X-Flow-Version"] = str(g.flow_version)
        if exc.status == 503:
            headers["Retry-After"] = "1"
        if exc.status == 408:  # the body's end is unknown: this connection serves no more
            headers["Connection"] = "close"
        if isinstance(exc, TenantLimited):
            headers["Retry-After"] = str(exc.retry_after_s)
        return _error(exc.status, exc.to_dict(), headers)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = {404: f"no route {request.method} {request.path}" + (
                       "; /run-flow is the ambassador sidecar's (apps call it on "
                       "localhost:8080); the engine runs flows at POST /api/v1/run/{flow}"
                       if request.path.rstrip("/") == "/run-flow" else ""),
                   405: f"{request.method} is not allowed on {request.path}",
                   413: f"request body over the {app.config['MAX_CONTENT_LENGTH']} byte limit",
                   }.get(status, exc.description or exc.name)
        headers = {}
        valid = getattr(exc, "valid_methods", None)
        if status == 405 and valid:
            headers["Allow"] = ", ".join(sorted(valid))
        return _error(status, {"code": code, "message": message}, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, {"code": "internal",
                            "message": "internal error; the trace id identifies it in the logs"})
