"""``create_app(config)``: load settings, build the filter chain, mount the routes.

Routes (DESIGN.md "Ambassador HTTP API"): ``POST /run-flow``, ``GET /runs/<id>/events``,
``WS /ws/run-flow``, ``GET /healthz``, ``GET /readyz`` (``?verbose=1`` adds upstream
health), ``GET /metrics``.

``/run-flow`` is every app's one call, so it is served below Flask, by :class:`RunFlowPath`
(a WSGI middleware in front of the Flask app): Flask's request context, routing and
response objects cost more per request than everything the route itself does. The other
routes are Flask's. Both share :func:`answer`, which runs a request through the filter
chain and records its metrics and access line once the answer has gone out.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, g, jsonify, request, stream_with_context
from flask import Response as FlaskResponse
from flask_sock import Sock
from werkzeug.datastructures import MIMEAccept
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_accept_header

from ambassador import config as config_module
from ambassador import ws as ws_bridge
from ambassador.chain import Handler, Request, Response, build_chain, error_response
from ambassador.filters.auth import Auth
from ambassador.filters.breaker import Breaker, CircuitBreaker
from ambassador.filters.cache import Cache, MemoryCacheStore, RedisCacheStore
from ambassador.filters.fallback import Fallback
from ambassador.filters.ratelimit import LocalBuckets, RateLimit, RedisBuckets
from ambassador.filters.retry import Retry, RetryBudget
from ambassador.filters.timeout import Timeout
from ambassador.filters.trace import Trace
from ambassador.metrics import BREAKER_STATES, AmbassadorMetrics
from ambassador.upstream import Upstream
from flowgate import jsonlog, tracing

log = logging.getLogger("ambassador")
access_log = logging.getLogger("ambassador.access")
FLOW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
REFUSED = frozenset({400, 401, 403, 404, 405, 413, 415, 422})
RUN_FLOW_FIELDS = {"flow_id", "input", "session_id", "tweaks", "version", "stream",
                   "input_type", "output_type", "on_disconnect"}
# request headers the chain may use, by their WSGI environ key
_FORWARD = {"HTTP_" + name.upper().replace("-", "_"): name for name in (
    "idempotency-key", "cache-control", "traceparent", "x-request-id", "authorization",
    "x-api-key", "accept", "last-event-id")}
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}


class Ambassador:
    """The per-process state: settings in force, the chain built from them, the metrics."""

    def __init__(self, settings: config_module.Settings, metrics: AmbassadorMetrics,
                 path: str | None, overrides: Mapping[str, Any] | None = None) -> None:
        self.metrics = metrics
        import os

        refuse = os.environ.get(config_module.REFUSE_NO_AUTH_ENV) == "1"
        self.holder = config_module.ConfigHolder(
            settings, path, overrides=overrides, on_change=self.rebuild,
            on_reload_error=lambda _msg: metrics.config_reload_errors.inc(),
            check=config_module.refuse_no_auth if refuse else None)
        self.rebuild(settings)

    def rebuild(self, settings: config_module.Settings) -> None:
        m = self.metrics
        redis_client = _redis(settings.redis_url)

        def transition(old: str, new: str) -> None:
            for state in BREAKER_STATES:
                m.breaker_state.labels(state).set(1 if state == new else 0)
            m.breaker_transitions.labels(new).inc()
            log.warning("circuit breaker %s → %s", old, new)

        def observe(outcome: str, seconds: float) -> None:
            m.upstream_attempts.labels(outcome).inc()
            m.upstream_up.set(0 if outcome in ("connect_error", "timeout", "reset") else 1)

        old = getattr(self, "upstream", None)
        self.upstream = Upstream(settings.upstream, settings.upstream_key(), observe=observe)
        if old is not None:
            old.close()
        self.breaker = CircuitBreaker(settings.breaker, on_transition=transition)
        available = {
            "trace": Trace(),
            "auth": Auth(settings.inbound_auth,
                         on_failure=lambda reason: m.auth_failures.labels(reason).inc()),
            "ratelimit": RateLimit(settings, LocalBuckets(),
                                   RedisBuckets(redis_client) if redis_client else None,
                                   on_limited=lambda scope: m.ratelimited.labels(scope).inc(),
                                   on_error=m.ratelimit_errors.inc),
            "fallback": Fallback(settings, on_fallback=lambda flow: m.fallbacks.labels(flow).inc()),
            "cache": Cache(settings, RedisCacheStore(redis_client) if redis_client
                           else MemoryCacheStore(settings.cache.max_entries),
                           on_result=lambda r: m.cache.labels(r).inc(),
                           on_error=lambda op: m.cache_errors.labels(op).inc()),
            "breaker": Breaker(self.breaker),
            "retry": Retry(settings.retry, RetryBudget(settings.retry.budget_ratio,
                                                       settings.retry.budget_min_per_s,
                                                       settings.retry.budget_window_s),
                           on_retry=lambda reason: m.retries.labels(reason).inc(),
                           on_budget_exhausted=m.retry_budget_exhausted.inc),
            "timeout": Timeout(settings.upstream.timeouts),
        }
        self.chain: Handler = build_chain([available[name] for name in settings.filters],
                                          self.upstream)
        # the WebSocket handshake passes the caller-facing filters only
        self.handshake_filters = [available[name] for name in settings.filters
                                  if name in ("trace", "auth", "ratelimit")]
        self.settings = settings

    def handle(self, req: Request) -> Response:
        self.holder.maybe_reload()
        return self.chain(req)


def _redis(url: str | None):
    if not url:
        return None
    import redis

    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=0.5,
                                socket_timeout=0.5, health_check_interval=30)


def create_app(config: Mapping[str, Any] | None = None, *, path: str | None = None,
               metrics: AmbassadorMetrics | None = None) -> Flask:
    """``config`` maps dotted keys to values (``{"upstream.url": ...}``) over the YAML file."""
    import os

    path = path if path is not None else os.environ.get("AMBASSADOR_CONFIG")
    settings = config_module.load(path, overrides=config)
    jsonlog.configure(settings.log_level)
    amb = Ambassador(settings, metrics or AmbassadorMetrics(), path, config)
    app = Flask("ambassador")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["ambassador"] = amb
    _routes(app, amb)
    app.wsgi_app = RunFlowPath(amb, app.wsgi_app)  # type: ignore[method-assign]
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
        if not FLOW_ID.match(run_id):
            return bad_request("invalid run id")
        last = request.args.get("last_event_id")
        if last is not None and not last.isdigit():
            return bad_request("last_event_id must be a non-negative integer")
        path = f"/api/v1/runs/{run_id}/events" + (f"?last_event_id={last}" if last else "")
        req = Request("GET", path, _forwarded(request.environ), "/runs/<id>/events", None, stream=True)
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

    sock = Sock(app)

    @app.before_request
    def _admit_websocket():
        """Check the caller before the upgrade: a refusal is an ordinary HTTP error."""
        if request.path != "/ws/run-flow":
            return None
        req = Request("GET", "/api/v1/ws/runs", _forwarded(request.environ), "/ws/run-flow")
        req.ctx["trace"] = g.trace
        answer = ws_bridge.admit(amb.handshake_filters, req)
        if answer.status != 200:
            return FlaskResponse(answer.body, status=answer.status, headers=answer.headers)
        g.identity = req.ctx.get("identity")
        return None

    @sock.route("/ws/run-flow")
    def ws_run_flow(ws):
        identity = g.get("identity")
        upstream = amb.settings.upstream
        url = "ws" + upstream.url[len("http"):] + "/api/v1/ws/runs"
        headers = {"traceparent": g.trace.child().traceparent, "x-request-id": g.trace.request_id}
        key = amb.settings.upstream_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if identity is not None:
            headers["x-flowgate-identity"] = identity.name
        m.requests.labels("/ws/run-flow", "", "101", "none").inc()
        ws_bridge.bridge(ws, url, headers,
                         may_run=lambda flow: identity is None or identity.may_run(flow),
                         trace_id=g.trace.trace_id)

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        """Ready once the config is loaded: never tied to the engine's health, so an engine
        outage does not pull every app pod out of its Service."""
        body: dict[str, Any] = {"status": "ready"}
        if request.args.get("verbose"):
            up = amb.upstream
            body["upstream"] = {
                "url": amb.settings.upstream.url, "breaker": amb.breaker.state,
                "last_ok": up.last_ok,
                "last_error": {"at": up.last_error[0], "kind": up.last_error[1]}
                if up.last_error else None}
            body["config"] = {"path": amb.holder.path, "last_reload_error": amb.holder.last_error}
        return jsonify(body)

    @app.get("/metrics")
    def metrics():
        data, content_type = m.render()
        return FlaskResponse(data, content_type=content_type)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        status = exc.code or 500
        return bad_request(exc.description or exc.name, status, _HTTP_CODES.get(status, "http_error"))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return bad_request("internal error; the trace id identifies it in the logs", 500, "internal")


def answer(amb: Ambassador, req: Request, trace: tracing.TraceContext, started: float):
    """Run ``req`` through the chain: ``(status, headers, body, done)``. ``body`` is a list
    of bytes, or for a stream an iterator that relays the engine's events; ``done`` (None for
    a stream, which does this itself at its end) records the request's metrics and access
    line and is to be called once the answer has been sent."""
    m = amb.metrics
    req.ctx["trace"] = trace
    response = amb.handle(req)
    upstream_s = response.meta.get("upstream_s", 0.0)
    overhead_s = max(0.0, time.perf_counter() - started - upstream_s)
    response.headers["X-Ambassador-Overhead-Ms"] = f"{overhead_s * 1000:.3f}"
    cache = response.meta.get("cache", "none")

    def record(elapsed: float, first_byte: float | None = None, **extra: Any) -> None:
        """Metrics and the access line: after the answer has gone out (off its latency).
        A stream's time to answer is to its first event; ``elapsed`` is its whole length."""
        m.overhead.labels(req.route).observe(overhead_s)
        if upstream_s:
            m.upstream_duration.labels(req.route).observe(upstream_s)
        # a refused or unknown flow id is the caller's string: keep it out of label values
        flow = req.flow_id or "" if response.status not in REFUSED else ""
        m.requests.labels(req.route, flow, str(response.status), cache).inc()
        if response.chunks is None:
            m.request_duration.labels(req.route).observe(elapsed)
        else:
            m.stream_duration.labels(req.route).observe(elapsed)
            if first_byte is not None:
                m.request_duration.labels(req.route).observe(first_byte)
                extra["first_event_ms"] = round(first_byte * 1000, 3)
        token = tracing.current.set(trace)  # the request context is gone by now
        try:
            access_log.info("request", extra={
                "route": req.route, "flow_id": req.flow_id, "status": response.status,
                "attempts": response.meta.get("attempts", 1), "cache": cache,
                "overhead_ms": round(overhead_s * 1000, 3), **extra,
                "duration_ms": round(elapsed * 1000, 3)})
        finally:
            tracing.current.reset(token)

    if response.chunks is None:
        elapsed = time.perf_counter() - started
        return response.status, response.headers, [response.body], lambda: record(elapsed)

    def relay():
        first_byte = None
        chunks = response.chunks
        try:
            for chunk in chunks:
                if first_byte is None:
                    first_byte = time.perf_counter() - started
                yield chunk
        finally:
            # the app left early (or the stream ended): close the upstream stream now, so the
            # engine sees the disconnect and cancels the run
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            record(time.perf_counter() - started, first_byte, stream=True)

    headers = {**response.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return response.status, headers, relay(), None


class RunFlowPath:
    """WSGI middleware serving ``/run-flow`` itself and passing every other path to ``app``
    (see the module docstring). Same contract as a Flask route would give: the trace
    headers on every answer, errors in the error contract, 405/413/415 for a wrong method,
    size or content type, the in-flight gauge held until the answer (a stream: its end) is
    done."""

    def __init__(self, amb: Ambassador, app) -> None:
        self.amb, self.app = amb, app

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != "/run-flow":
            return self.app(environ, start_response)
        started = time.perf_counter()
        trace = tracing.from_headers(environ.get("HTTP_TRACEPARENT"),
                                     environ.get("HTTP_X_REQUEST_ID"))
        in_flight = self.amb.metrics.in_flight
        in_flight.inc()
        token = tracing.current.set(trace)
        try:
            status, headers, body, done = self._answer(environ, trace, started)
        except Exception:
            log.exception("unhandled error on %s /run-flow", environ.get("REQUEST_METHOD"))
            status, headers, body, done = _refusal(
                trace, 500, "internal", "internal error; the trace id identifies it in the logs")
        finally:
            tracing.current.reset(token)
        out = [(name, value) for name, value in headers.items()]
        out += [("X-Trace-ID", trace.trace_id), ("traceparent", trace.traceparent),
                ("X-Request-ID", trace.request_id)] if "X-Trace-ID" not in headers else []
        if isinstance(body, list):
            out.append(("Content-Length", str(sum(map(len, body)))))
        start_response(f"{status} {_REASONS.get(status, 'Status')}", out)
        return _Closing(body, done, in_flight.dec)

    def _answer(self, environ, trace: tracing.TraceContext, started: float):
        method = environ.get("REQUEST_METHOD")
        if method != "POST":
            status, headers, body, done = _refusal(
                trace, 405, "method_not_allowed", f"{method} is not allowed here; use POST")
            headers["Allow"] = "POST"
            return status, headers, body, done
        mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if mimetype != "application/json" and not mimetype.endswith("+json"):
            return _refusal(trace, 415, "unsupported_media_type",
                            "expected Content-Type: application/json")
        limit = self.amb.settings.max_body_bytes
        length = environ.get("CONTENT_LENGTH")
        if length and length.isdigit() and int(length) > limit:
            return _refusal(trace, 413, "payload_too_large",
                            f"the body is larger than {limit} bytes")
        data = environ["wsgi.input"].read(int(length) if length and length.isdigit() else limit + 1)
        if len(data) > limit:
            return _refusal(trace, 413, "payload_too_large",
                            f"the body is larger than {limit} bytes")
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _refusal(trace, 400, "bad_request", f"malformed JSON body: {exc}")
        problem = _check_run_body(body)
        if problem:
            return _refusal(trace, 400, "bad_request", problem)
        accept = environ.get("HTTP_ACCEPT", "")
        stream = bool(body.get("stream")) or (
            "text/event-stream" in accept
            and MIMEAccept(parse_accept_header(accept)).best == "text/event-stream")
        upstream_body = {"input_value": body.get("input")}
        for name in ("session_id", "tweaks", "version", "input_type", "output_type",
                     "on_disconnect"):
            if body.get(name) is not None:
                upstream_body[name] = body[name]
        path = f"/api/v1/run/{body['flow_id']}" + ("?stream=true" if stream else "")
        req = Request("POST", path, _forwarded(environ), "/run-flow", upstream_body,
                      flow_id=body["flow_id"], stream=stream)
        return answer(self.amb, req, trace, started)


class _Closing:
    """A WSGI body that runs ``done`` (metrics, access line) and ``release`` (the in-flight
    gauge) when the server closes it, after the answer went out."""

    __slots__ = ("_body", "_done", "_release")

    def __init__(self, body, done, release) -> None:
        self._body, self._done, self._release = body, done, release

    def __iter__(self):
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()  # a stream's relay: records its metrics at its end
            if self._done is not None:
                self._done()
        finally:
            self._release()


def _refusal(trace: tracing.TraceContext, status: int, code: str, message: str):
    body = json.dumps({"error": {"code": code, "message": message,
                                 "trace_id": trace.trace_id}}).encode()
    return status, {"Content-Type": "application/json"}, [body], None


_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            415: "Unsupported Media Type", 422: "Unprocessable Entity",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def _forwarded(environ: Mapping[str, Any]) -> dict[str, str]:
    """The request headers the chain may use (see _FORWARD), under lower-case names."""
    return {name: environ[key] for key, name in _FORWARD.items() if key in environ}


def _check_run_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return 'the body must be a JSON object like {"flow_id": "faq", "input": "hello"}'
    unknown = sorted(set(body) - RUN_FLOW_FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(RUN_FLOW_FIELDS))}"
    flow_id = body.get("flow_id")
    if not isinstance(flow_id, str) or not FLOW_ID.match(flow_id):
        return "flow_id is required: the id or name of a flow (letters, digits, '_', '.', '-')"
    if body.get("input") is not None and not isinstance(body["input"], str):
        return "input must be a string"
    if body.get("session_id") is not None and (
            not isinstance(body["session_id"], str) or not 0 < len(body["session_id"]) <= 200):
        return "session_id must be a string of 1-200 characters"
    if body.get("tweaks") is not None and not isinstance(body["tweaks"], dict):
        return "tweaks must be an object {node_id: {param: value}}"
    version = body.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        return "version must be a positive integer"
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        return "stream must be true or false"
    return None


__all__ = ["Ambassador", "create_app", "error_response"]
