"""``create_app(config)``: load settings, build the pipeline, serve the routes.

Routes (docs/design.md "Ambassador HTTP API"; described in :mod:`ambassador.openapi`):
``POST /run-flow``, ``GET /runs/<id>/events`` and ``WS /ws/run-flow`` go through their
filter chains (ambassador/pipeline.py) by one adapter (ambassador/wsgi.py); Flask serves
``GET /healthz``, ``GET /readyz`` (``?verbose=1`` adds upstream health), ``GET /metrics``,
``GET /openapi.json`` and the 404 for anything else. The host guard is in front of all.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from typing import Any

from flask import Flask, g, jsonify, request
from flask import Response as FlaskResponse
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ambassador import config as config_module
from ambassador import hygiene, openapi
from ambassador import pipeline as pipeline_module
from ambassador.chain import Request, error_response
from ambassador.filters.auth import Auth
from ambassador.filters.breaker import CircuitBreaker
from ambassador.filters.coalesce import Flights
from ambassador.host_guard import HostGuard, local_host
from ambassador.labels import FlowLabels
from ambassador.metrics import AmbassadorMetrics
from ambassador.parts import Parts
from ambassador.routing_view import RoutingView
from ambassador.upstream import Upstream
from ambassador.wsgi import Gateway, forwarded
from flowgate.common import jsonlog, otel, tracing
from flowgate.common.at_exit import flush_at_exit
from flowgate.common.signals import Signals

log = logging.getLogger("ambassador")
ROUTING_READ_S = 1.0  # reading a flow's routing gives up after this (the last view stands)
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}


class Ambassador:
    """The per-process state: the pipeline in force (settings, chains, the parts they
    use), the parts that outlive reloads, the metrics and what else outlives reloads."""

    log = log

    def __init__(self, settings: config_module.Settings, metrics: AmbassadorMetrics,
                 path: str | None, overrides: Mapping[str, Any] | None = None) -> None:
        self.metrics = metrics
        # spans over OTLP when the OTEL_* variables ask for them (flowgate/common/otel.py);
        # else None. Environment only: a config reload keeps it.
        self.telemetry = otel.from_env("flowgate-ambassador", on_dropped=lambda reason, n: (
            metrics.spans_dropped.labels(reason).inc(n)))
        if self.telemetry is not None:
            flush_at_exit(self.telemetry.flush)
        self.labels = FlowLabels()  # outlives reloads: the flows seen stay label values
        self.parts = Parts()  # breaker, budgets, buckets, cache store, pool: outlive reloads
        self.flights = Flights()  # requests being coalesced (ambassador/filters/coalesce.py)
        refuse = os.environ.get(config_module.REFUSE_NO_AUTH_ENV) == "1"
        # which version answers a request, for the cache (outlives reloads; asks whichever
        # upstream is in force)
        self.routing = RoutingView(lambda ref: self.pipeline.upstream.flow(ref, ROUTING_READ_S))
        self.holder = config_module.ConfigHolder(
            settings, path, overrides=overrides, on_change=self.rebuild,
            on_reload_error=lambda _msg: metrics.config_reload_errors.inc(),
            check=config_module.refuse_no_auth if refuse else None)
        self.rebuild(settings)
        self.holder.watch()  # a file edit is in force within 2 s, traffic or not
        self.signals = _follow_flow_changes(settings.redis_url, self.routing)

    def rebuild(self, settings: config_module.Settings) -> None:
        """Build the pipeline ``settings`` need, then put it in force with one assignment:
        a part that cannot be built (a key file) leaves the previous one wholly in force."""
        fresh = pipeline_module.build(self, settings)
        self.labels.configure(settings)
        self.routing.check_s = settings.routing_check_s
        self.pipeline = fresh

    # what the pipeline in force holds, for the probes, the WebSocket guard and tests
    @property
    def settings(self) -> config_module.Settings:
        return self.pipeline.settings

    @property
    def upstream(self) -> Upstream:
        return self.pipeline.upstream

    @property
    def breaker(self) -> CircuitBreaker:
        return self.pipeline.breaker

    @property
    def auth(self) -> Auth:
        return self.pipeline.auth

    @property
    def handshake_filters(self) -> tuple[Any, ...]:
        return self.pipeline.handshake_filters

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
    import redis

    signals = Signals(redis.Redis.from_url(redis_url, decode_responses=True,
                                           socket_connect_timeout=5.0, socket_timeout=5.0,
                                           health_check_interval=30),
                      on_subscribe=routing.forget_all)
    signals.on("flow_changed", lambda m: routing.forget(m.get("flow_id"), m.get("name")))
    signals.start()
    return signals


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
    _probes(app, amb)
    app.wsgi_app = Gateway(amb, app.wsgi_app)  # type: ignore[method-assign]
    app.wsgi_app = HostGuard(app.wsgi_app, lambda: amb.settings)  # type: ignore[method-assign]
    return app


def _probes(app: Flask, amb: Ambassador) -> None:
    """The probes, the metrics and the OpenAPI document (and the 404 for other paths):
    Flask's, off the proxied routes' path (ambassador/wsgi.py)."""
    m = amb.metrics

    @app.before_request
    def _start():
        g.trace = tracing.from_headers(request.headers.get("traceparent"),
                                       request.headers.get("X-Request-ID"))
        g.token = tracing.current.set(g.trace)

    @app.teardown_request
    def _end(_exc):
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
        """The error contract, built as the proxied routes build it (chain.error_response)."""
        req = Request(request.method, "", {}, request.path)
        req.ctx["trace"] = g.get("trace")
        answer = error_response(status, code, message, req)
        return FlaskResponse(answer.body, status=status, headers=answer.headers), status

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
