"""``answer``: a request through the filter chain, then its metrics and access line once
the answer has gone out; ``forwarded``: the request headers the chain may use. Shared by
the Flask routes and :class:`ambassador.run_flow.RunFlowPath`."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ambassador.chain import Request
from flowgate import otel, tracing

if TYPE_CHECKING:
    from ambassador.app import Ambassador

access_log = logging.getLogger("ambassador.access")
# request headers the chain may use, by their WSGI environ key
_FORWARD = {"HTTP_" + name.upper().replace("-", "_"): name for name in (
    "idempotency-key", "cache-control", "traceparent", "x-request-id", "authorization",
    "x-api-key", "accept", "last-event-id")}


def forwarded(environ: Mapping[str, Any]) -> dict[str, str]:
    """The request headers the chain may use (see _FORWARD), under lower-case names."""
    return {name: environ[key] for key, name in _FORWARD.items() if key in environ}


def answer(amb: Ambassador, req: Request, trace: tracing.TraceContext, started: float):
    """Run ``req`` through the chain: ``(status, headers, body, done)``. ``body`` is a list
    of bytes, or for a stream an iterator that relays the engine's events; ``done`` (None for
    a stream, which does this itself at its end) records the request's metrics and access
    line and is to be called once the answer has been sent."""
    m = amb.metrics
    req.ctx["trace"] = trace
    span = None
    if amb.telemetry is not None:  # the request's span; upstream attempts are its children
        span = req.ctx["span"] = amb.telemetry.server_span(
            f"{req.method} {req.route}", trace, req.header("traceparent"),
            {"http.request.method": req.method, "http.route": req.route})
        req.ctx["telemetry"] = amb.telemetry
    response = amb.handle(req)
    upstream_s = response.meta.get("upstream_s", 0.0)
    # the ambassador's own time, plus what the engine says the hop to it cost (Server-Timing)
    overhead_s = max(0.0, time.perf_counter() - started - upstream_s) + response.meta.get(
        "hop_s", 0.0)
    response.headers["X-Ambassador-Overhead-Ms"] = f"{overhead_s * 1000:.3f}"
    cache = response.meta.get("cache", "none")

    def record(elapsed: float, first_byte: float | None = None, **extra: Any) -> None:
        """Metrics and the access line: after the answer has gone out (off its latency).
        A stream's time to answer is to its first event; ``elapsed`` is its whole length."""
        m.overhead.labels(req.route).observe(overhead_s)
        if upstream_s:
            m.upstream_duration.labels(req.route).observe(upstream_s)
        if response.meta.get("engine_answered") and 200 <= response.status < 300 \
                and not response.meta.get("fallback"):
            amb.labels.succeeded(req.flow_id)  # a real flow: it may be a label value now
        flow = amb.labels.of(req.flow_id)  # bounded: made-up flow ids are "other"
        m.requests.labels(req.route, flow, str(response.status), cache).inc()
        if response.chunks is None:
            m.request_duration.labels(req.route, flow).observe(elapsed)
        else:
            m.stream_duration.labels(req.route, flow).observe(elapsed)
            if first_byte is not None:
                m.request_duration.labels(req.route, flow).observe(first_byte)
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
        if span is not None:
            identity = req.ctx.get("identity")
            otel.ended_with(span, response.status, **{
                "flowgate.flow.id": req.flow_id, "flowgate.cache": cache,
                "flowgate.attempts": response.meta.get("attempts", 1),
                "flowgate.fallback": bool(response.meta.get("fallback")),
                "flowgate.identity": identity.name if identity else None,
                "flowgate.tenant": identity.tenant if identity else None})

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
