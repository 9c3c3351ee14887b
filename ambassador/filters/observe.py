"""Observe: the outermost filter of every proxied route (ambassador/pipeline.py puts it there).

It starts (or continues) the request's W3C trace and makes it the context of every log
line, holds the in-flight gauge, opens the request's span when spans are exported, turns
an unexpected exception into a 500 in the error contract, and puts the trace headers and
``X-Ambassador-Overhead-Ms`` on every answer — refusals included. What is recorded once
the answer has gone out (the request metrics, the access line, the span's end) is added to
``response.after``, which the adapter runs when the server closes the answer: off the
request's latency. A stream is recorded at its end, its time to answer being its first
event; a WebSocket upgrade (101) is counted at once and the rest at the session's end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ambassador.chain import Handler, Request, Response, error_response
from flowgate.common import otel, tracing

if TYPE_CHECKING:
    from ambassador.app import Ambassador

log = logging.getLogger("ambassador")
access_log = logging.getLogger("ambassador.access")


class Observe:
    name = "observe"

    def __init__(self, amb: Ambassador) -> None:
        self.amb = amb  # its metrics, flow labels and telemetry outlive reloads

    def __call__(self, request: Request, next: Handler) -> Response:
        started = request.ctx.setdefault("started", time.perf_counter())
        trace = request.ctx["trace"] = tracing.from_headers(
            request.header("traceparent"), request.header("x-request-id"))
        in_flight = self.amb.metrics.in_flight
        in_flight.inc()
        token = tracing.current.set(trace)
        try:
            telemetry = self.amb.telemetry
            if telemetry is not None:  # the request's span; upstream attempts are its children
                request.ctx["span"] = telemetry.server_span(
                    f"{request.method} {request.route}", trace, request.header("traceparent"),
                    {"http.request.method": request.method, "http.route": request.route},
                    started)  # when the request's head arrived (ambassador/wsgi.py)
                request.ctx["telemetry"] = telemetry
            try:
                response = next(request)
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.route)
                response = error_response(
                    500, "internal", "internal error; the trace id identifies it in the logs",
                    request)
        finally:
            tracing.current.reset(token)
        for name, value in (("X-Trace-ID", trace.trace_id), ("traceparent", trace.traceparent),
                            ("X-Request-ID", trace.request_id)):
            response.headers.setdefault(name, value)
        _Record(self.amb, request, response, started).attach()
        response.after.append(in_flight.dec)
        return response


class _Record:
    """The metrics, access line and span end of one answer, once it has gone out."""

    def __init__(self, amb: Ambassador, request: Request, response: Response,
                 started: float) -> None:
        self.amb, self.request, self.response, self.started = amb, request, response, started
        upstream_s = response.meta.get("upstream_s", 0.0)
        self.upstream_s = upstream_s
        # the ambassador's own time, plus what the engine says the hop to it cost
        # (Server-Timing); a coalesced answer's wait for another request's is not its own
        self.overhead_s = max(0.0, time.perf_counter() - started - upstream_s
                              - response.meta.get("waited_s", 0.0)) \
            + response.meta.get("hop_s", 0.0)
        self.cache = response.meta.get("cache", "none")

    def attach(self) -> None:
        response = self.response
        response.headers["X-Ambassador-Overhead-Ms"] = f"{self.overhead_s * 1000:.3f}"
        if response.status == 101:  # a WebSocket session: counted as it starts
            self._count(self.amb.labels.of(self.request.flow_id))
            response.after.append(lambda: self._finish(time.perf_counter() - self.started,
                                                       None, counted=True))
        elif response.chunks is None:
            elapsed = time.perf_counter() - self.started
            response.after.append(lambda: self._finish(elapsed))
        else:
            response.chunks = self._relay(response.chunks)
            response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _relay(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        first_byte = None
        try:
            for chunk in chunks:
                if first_byte is None:
                    first_byte = time.perf_counter() - self.started
                yield chunk
        finally:
            # the app left early (or the stream ended): close the upstream stream now, so
            # the engine sees the disconnect and cancels the run
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            self._finish(time.perf_counter() - self.started, first_byte, stream=True)

    def _count(self, flow: str) -> None:
        self.amb.metrics.requests.labels(self.request.route, flow, str(self.response.status),
                                         self.cache).inc()

    def _finish(self, elapsed: float, first_byte: float | None = None, *,
                counted: bool = False, **extra: Any) -> None:
        m, req, response, amb = self.amb.metrics, self.request, self.response, self.amb
        if response.meta.get("engine_answered") and 200 <= response.status < 300 \
                and not response.meta.get("fallback"):
            amb.labels.succeeded(req.flow_id)  # a real flow: it may be a label value now
        flow = amb.labels.of(req.flow_id)  # bounded: made-up flow ids are "other"
        m.overhead.labels(req.route, flow).observe(self.overhead_s)
        if self.upstream_s:
            m.upstream_duration.labels(req.route, flow).observe(self.upstream_s)
        if not counted:
            self._count(flow)
            if response.chunks is None:
                m.request_duration.labels(req.route, flow).observe(elapsed)
            else:
                m.stream_duration.labels(req.route, flow).observe(elapsed)
                if first_byte is not None:
                    m.request_duration.labels(req.route, flow).observe(first_byte)
                    extra["first_event_ms"] = round(first_byte * 1000, 3)
        token = tracing.current.set(req.ctx["trace"])  # the request's context is gone by now
        try:
            access_log.info("request", extra={
                "route": req.route, "flow_id": req.flow_id, "status": response.status,
                "attempts": response.meta.get("attempts", 1), "cache": self.cache,
                "overhead_ms": round(self.overhead_s * 1000, 3), **extra,
                "duration_ms": round(elapsed * 1000, 3)})
        finally:
            tracing.current.reset(token)
        span = req.ctx.get("span")
        if span is not None:
            identity = req.ctx.get("identity")
            otel.ended_with(span, response.status, **{
                "flowgate.flow.id": req.flow_id, "flowgate.cache": self.cache,
                "flowgate.attempts": response.meta.get("attempts", 1),
                "flowgate.fallback": bool(response.meta.get("fallback")),
                "flowgate.identity": identity.name if identity else None,
                "flowgate.tenant": identity.tenant if identity else None})
