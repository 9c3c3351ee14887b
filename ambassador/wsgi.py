"""The one adapter between WSGI and the filter chain, for every proxied route.

    environ → chain.Request → the route's chain (ambassador/pipeline.py) → chain.Response
    → status, headers and body back to the server

``/run-flow``, ``/runs/<id>/events`` and ``/ws/run-flow`` are served here, on the
pipeline in force when the request came in (read once); every other path goes to the
Flask app behind (the probes, and the 404 for anything else). What a route needs beyond
the method and the forwardable headers (the body, the query, the socket) stays in
``request.ctx["environ"]`` for the validate filter and the WebSocket upgrade to read.

The answer's ``after`` callbacks (metrics, the access line, the in-flight gauge) run when
the server closes the body — after the last byte went out — and a stream's relay is
closed first, so an app that leaves early closes the engine's stream too.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from ambassador.chain import Request, Response
from ambassador.filters.validate import EVENTS_ROUTE
from ambassador.ws_guard import ROUTE as WS_ROUTE
from flowgate.common import gevent_worker, tracing

if TYPE_CHECKING:
    from ambassador.app import Ambassador

log = logging.getLogger("ambassador")
_EVENTS = re.compile(r"/runs/([^/]+)/events")
# request headers the chain may use, by their WSGI environ key
_FORWARD = {"HTTP_" + name.upper().replace("-", "_"): name for name in (
    "idempotency-key", "cache-control", "traceparent", "x-request-id", "authorization",
    "x-api-key", "accept", "last-event-id", "x-flowgate-fault")}


def forwarded(environ: Mapping[str, Any]) -> dict[str, str]:
    """The request headers the chain may use (see _FORWARD), under lower-case names."""
    return {name: environ[key] for key, name in _FORWARD.items() if key in environ}


def route_of(path: str) -> tuple[str, str | None] | None:
    """The proxied route ``path`` is, with the run id of an events path; None for others."""
    if path == "/run-flow" or path == WS_ROUTE:
        return path, None
    match = _EVENTS.fullmatch(path)
    return (EVENTS_ROUTE, match.group(1)) if match else None


class Gateway:
    """The WSGI app: the proxied routes through their chains, the rest to ``app``."""

    def __init__(self, amb: Ambassador, app: Any) -> None:
        self.amb, self.app = amb, app

    def __call__(self, environ: dict[str, Any], start_response):
        found = route_of(environ.get("PATH_INFO", ""))
        if found is None:
            return self.app(environ, start_response)
        route, run_id = found
        request = Request(environ.get("REQUEST_METHOD", "GET"), "", forwarded(environ), route)
        arrived = gevent_worker.request_arrived()  # before gunicorn parsed it: its time is ours
        request.ctx.update(environ=environ, run_id=run_id,
                           started=arrived if arrived is not None else time.perf_counter())
        self.amb.holder.maybe_reload()  # (the watcher does it too; this is one clock read)
        response = self.amb.pipeline.routes[route](request)
        if response.status == 101:
            return _upgraded(response, environ, request.ctx["trace"])
        start_response(_status_line(response.status), _headers(response))
        return _Closing(response)


# the reason phrases the ambassador has always sent where Python's differ (RFC 7231's 413)
_PHRASES = {413: "Payload Too Large"}


def _status_line(status: int) -> str:
    phrase = _PHRASES.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Status"
    return f"{status} {phrase}"


def _headers(response: Response) -> list[tuple[str, str]]:
    out = list(response.headers.items())
    if response.chunks is None:
        out.append(("Content-Length", str(len(response.body))))
    return out


def _upgraded(response: Response, environ: dict[str, Any],
              trace: tracing.TraceContext) -> Iterable[bytes]:
    """Run the WebSocket session (its log lines carry the handshake's trace); then tell
    the server the connection is handled (under gunicorn: StopIteration, as flask-sock
    does, and it closes the connection)."""
    token = tracing.current.set(trace)
    try:
        mode = response.meta["upgrade"](environ)
    finally:
        tracing.current.reset(token)
        _run_after(response)
    if mode == "gunicorn":
        raise StopIteration
    return []


def _run_after(response: Response) -> None:
    for callback in response.after:  # each runs: a failed metric never leaks the gauge
        try:
            callback()
        except Exception:
            log.exception("recording an answer failed")


class _Closing:
    """The WSGI body: the answer's bytes (or its stream's chunks); ``close`` closes the
    stream and runs ``response.after``, once the server is done with the answer."""

    __slots__ = ("_response",)

    def __init__(self, response: Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        chunks = self._response.chunks
        return iter([self._response.body]) if chunks is None else iter(chunks)

    def close(self) -> None:
        try:
            close = getattr(self._response.chunks, "close", None)
            if close is not None:
                close()  # a stream's relay: records its metrics at its end
        finally:
            _run_after(self._response)
