"""Trace: keep the caller's W3C ``traceparent`` and ``X-Request-ID`` (or start a trace), make
them the context of every log line, and return them on every response, errors included.
The upstream call forwards a child span of the same trace."""

from __future__ import annotations

from ambassador.chain import Handler, Request, Response
from flowgate.common import tracing


class Trace:
    name = "trace"

    def __call__(self, request: Request, next: Handler) -> Response:
        trace = request.ctx.get("trace") or tracing.from_headers(
            request.header("traceparent"), request.header("x-request-id"))
        request.ctx["trace"] = trace
        response = next(request)
        response.headers["X-Trace-ID"] = trace.trace_id
        response.headers["traceparent"] = trace.traceparent
        response.headers["X-Request-ID"] = trace.request_id
        return response
