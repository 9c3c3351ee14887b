"""The terminal handler: a pooled HTTP/1.1 client to the flow engine.

It speaks HTTP/1.1 through :mod:`ambassador.http1` (kept lean: it is on every request's
path). It adds the engine's service key (apps never hold it), forwards the trace headers and the
caller's identity, and turns every transport failure into an error response whose
``meta["upstream_error"]`` tells the retry and breaker filters what happened:

    connect_error   no connection was made: the request certainly was not processed
    timeout         no answer within the per-try (or first-byte) deadline
    reset           the connection broke after the request was sent
    protocol        the engine answered something that is not HTTP

What the engine did answer is marked ``meta["engine_answered"]``. A request that cannot
be sent at all (its body does not serialize, a header or the path cannot be written) is a
400 ``bad_request`` of the ambassador's own, never an exception: nothing reached the engine,
so neither retry nor breaker takes it for an engine failure.

Streams are passed through chunk by chunk as they arrive, with a
first-byte deadline for the response head and an idle deadline between chunks instead of a
total deadline, so long generations are never cut while tokens keep flowing.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from ambassador import http1
from ambassador.chain import Request, Response, error_response
from ambassador.config import Upstream as UpstreamSettings
from flowgate.common import otel

# engine response headers passed to the app: lower-case name → the name filters look up
PASS_HEADERS = {name.lower(): name for name in (
    "Content-Type", "X-Run-ID", "X-Flow-Version", "Idempotent-Replayed", "Retry-After",
    "Cache-Control", "X-Accel-Buffering", "Location")}


def engine_timing(headers: list[tuple[str, str]], attempt_s: float) -> dict[str, float]:
    """``hop_s``: of this attempt's time, what the engine did not spend on the run itself —
    the extra hop (both sockets, the engine's HTTP parsing and writing) and claiming the
    Idempotency-Key the retry filter added — from the engine's ``Server-Timing`` (``app``,
    ``idem``); empty when the engine sent none. Part of X-Ambassador-Overhead-Ms."""
    timing = next((v for k, v in headers if k == "server-timing"), None)
    if timing is None:
        return {}
    spent = {}
    for metric in timing.split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                with contextlib.suppress(ValueError):
                    seconds = float(value) / 1000
                    if math.isfinite(seconds) and seconds >= 0:
                        spent[name] = seconds
    if "app" not in spent:
        return {}
    run_s = spent["app"] - spent.get("idem", 0.0)
    return {"hop_s": max(0.0, attempt_s - run_s)}


class Upstream:
    def __init__(self, settings: UpstreamSettings, key: str | None, *,
                 observe: Callable[[str, float], None] | None = None) -> None:
        self.settings = settings
        self.base = settings.url
        self._key_header = f"Bearer {key}" if key else None
        self._observe = observe or (lambda outcome, seconds: None)
        scheme, _, rest = settings.url.partition("://")
        host, _, port = rest.partition(":")
        self.pool = http1.Pool(scheme, host, int(port) if port else (80 if scheme == "http" else 443),
                               maxsize=settings.pool_size, max_idle_s=settings.max_idle_s)
        self.last_ok: float | None = None
        self.last_error: tuple[float, str] | None = None

    def __call__(self, request: Request) -> Response:
        parent = request.ctx.get("span")
        if parent is None or not parent.is_recording():
            # no spans, or this trace is not sampled: the engine is told so (traceparent)
            return self._attempt(request, parent)
        # this attempt's span (flowgate/common/otel.py): the engine's spans are its children
        path = request.path.partition("?")[0]
        span = request.ctx["telemetry"].client(  # named by the route: ids are attributes
            parent, f"{request.method} {_ENGINE_ROUTE.sub(_template, path)}",
            {"http.request.method": request.method, "url.path": path,
             "server.address": self.pool.host, "server.port": self.pool.port,
             "flowgate.attempt": request.ctx.get("attempt", 1)})
        response = self._attempt(request, span)
        kind = response.meta.get("upstream_error")
        if response.chunks is None:
            otel.ended_with(span, response.status, error=kind)
        else:
            response.chunks = _ending(response.chunks, span, response.status)
        return response

    def _attempt(self, request: Request, span: Any) -> Response:
        t = self.settings.timeouts
        per_try = request.ctx.get("per_try_s", t.per_try_s)
        read = min(t.stream_first_byte_s, per_try) if request.stream else per_try
        try:
            headers = self._headers(request, span)
            body = json.dumps(request.body).encode() if request.body is not None else None
        except (ValueError, TypeError, RecursionError) as exc:
            return self._unsendable(request, exc)
        started = time.perf_counter()
        try:
            resp = self.pool.request(request.method, request.path, headers, body,
                                     connect_timeout=t.connect_s, read_timeout=read)
            out_headers = {PASS_HEADERS[k]: v for k, v in resp.headers if k in PASS_HEADERS}
            timing = engine_timing(resp.headers, time.perf_counter() - started)
            if request.stream and resp.status == 200:
                self._ok(started, "ok")
                return Response(resp.status, out_headers, chunks=self._chunks(resp),
                                meta={"upstream_s": self._spent(request, started),
                                      "engine_answered": True, **timing})
            try:
                data = resp.read()
            finally:
                resp.close()
        except http1.InvalidRequest as exc:
            return self._unsendable(request, exc)
        except http1.ConnectFailed as exc:
            return self._failed(request, started, "connect_error", 503, "upstream_unavailable",
                                f"the flow engine is unreachable ({exc})")
        except http1.Timeout:
            return self._failed(request, started, "timeout", 504, "upstream_timeout",
                                f"the flow engine did not answer within {read:g} s")
        except http1.Broken as exc:
            return self._failed(request, started, "reset", 502, "bad_upstream",
                                f"the connection to the flow engine broke ({exc})")
        except http1.BadResponse as exc:
            return self._failed(request, started, "protocol", 502, "bad_upstream",
                                f"the flow engine answered something that is not HTTP ({exc})")
        self._ok(started, "ok" if resp.status < 500 else "error")
        return Response(resp.status, out_headers, data,
                        meta={"upstream_s": self._spent(request, started), "engine_answered": True,
                              **timing})

    def flow_of_run(self, run_id: str, request: Request) -> str | None:
        """The flow a run belongs to (from the engine's run record), None when unknown.
        Asked as the caller (its identity and tenant headers): a run of another tenant is
        unknown to it."""
        probe = Request("GET", f"/api/v1/runs/{run_id}", dict(request.headers), request.route,
                        None, ctx={"trace": request.ctx.get("trace"),
                                   "identity": request.ctx.get("identity")})
        probe.headers.pop("last-event-id", None)
        answer = self(probe)
        if answer.status != 200:
            return None
        try:
            return answer.json().get("flow_id")
        except ValueError:
            return None

    def flow(self, flow_ref: str, timeout_s: float) -> dict[str, Any] | None:
        """The engine's record of a flow (its routing: ambassador/routing_view.py); None
        when the engine has no such flow. Raises when the engine did not say."""
        resp = self.pool.request("GET", f"/api/v1/flows/{flow_ref}", self._headers(
            Request("GET", "", {}, "routing")), None,
            connect_timeout=self.settings.timeouts.connect_s, read_timeout=timeout_s)
        try:
            data = resp.read()
        finally:
            resp.close()
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise http1.HttpError(f"GET /api/v1/flows/{flow_ref} answered {resp.status}")
        flow = json.loads(data)
        if not isinstance(flow, dict) or not isinstance(flow.get("id"), str):
            raise ValueError("the engine's flow record has no id")
        return flow

    def ready(self, path: str, timeout_s: float) -> bool:
        """Does the engine say it is ready (``GET path`` answers 200)? The circuit breaker
        asks before a trial. An engine without such a path (404, 405, 501) says nothing
        against it: True. No answer, or any other status: False. A pooled connection the
        engine dropped (it restarted) is retried once on a new one."""
        connect_s = self.settings.timeouts.connect_s
        for attempt in (1, 2):
            try:
                resp = self.pool.request("GET", path, {"Accept": "application/json"}, None,
                                         connect_timeout=connect_s, read_timeout=timeout_s)
                try:
                    resp.read()
                finally:
                    resp.close()
            except http1.Broken:
                if attempt == 2:
                    return False
                continue
            except http1.HttpError:
                return False
            return resp.status == 200 or resp.status in (404, 405, 501)
        return False

    def _headers(self, request: Request, span: Any = None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": request.header("accept") or
                   ("text/event-stream" if request.stream else "application/json")}
        for name in ("idempotency-key", "last-event-id", "cache-control", "x-request-id"):
            value = request.header(name)
            if value:
                headers[name] = value
        trace = request.ctx.get("trace")
        if span is not None:
            headers["traceparent"] = otel.traceparent_of(span)
            headers["x-request-id"] = trace.request_id
        elif trace is not None:
            headers["traceparent"] = trace.child().traceparent
            headers["x-request-id"] = trace.request_id
        identity = request.ctx.get("identity")
        if identity is not None:
            headers["x-flowgate-identity"] = identity.name
            if identity.tenant:
                headers["x-flowgate-tenant"] = identity.tenant
        if self._key_header:
            headers["Authorization"] = self._key_header
        return headers

    def _chunks(self, resp: http1.Response) -> Iterator[bytes]:
        """Body pieces as they arrive; after the head, each read waits at most stream_idle_s."""
        idle = self.settings.timeouts.stream_idle_s
        resp.set_read_timeout(idle)
        try:
            yield from resp.stream()
        except http1.Timeout:
            yield _sse_error("upstream_timeout", f"no event from the flow engine for {idle:g} s")
        except (http1.Broken, http1.BadResponse) as exc:
            yield _sse_error("bad_upstream", f"the stream from the flow engine broke ({exc})")
        finally:
            # Unless the stream was read to the end (the connection is then pooled again),
            # the app left or the stream broke: close the connection so the engine sees the
            # disconnect now and cancels the run, instead of streaming on into a socket
            # nobody reads.
            resp.close()

    def _ok(self, started: float, outcome: str) -> None:
        self.last_ok = time.time()
        self._observe(outcome, time.perf_counter() - started)

    @staticmethod
    def _spent(request: Request, started: float) -> float:
        """Seconds of this attempt; the request keeps the sum over its attempts."""
        seconds = time.perf_counter() - started
        request.ctx["upstream_s"] = request.ctx.get("upstream_s", 0.0) + seconds
        return request.ctx["upstream_s"]

    def _failed(self, request: Request, started: float, kind: str, status: int, code: str,
                message: str) -> Response:
        self.last_error = (time.time(), kind)
        self._observe(kind, time.perf_counter() - started)
        response = error_response(status, code, message, request,
                                  headers={"Retry-After": "1"} if status == 503 else None)
        response.meta.update(upstream_error=kind, sent=kind != "connect_error",
                             upstream_s=self._spent(request, started))
        return response

    @staticmethod
    def _unsendable(request: Request, exc: Exception) -> Response:
        reason = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        return error_response(400, "bad_request",
                              f"the request cannot be sent to the flow engine: {reason}", request)

    def close(self) -> None:
        self.pool.close()


_ENGINE_ROUTE = re.compile(r"^/api/v1/(run|runs)/[^/]+")


def _template(match: re.Match[str]) -> str:
    return f"/api/v1/{match[1]}/" + ("{flow}" if match[1] == "run" else "{run_id}")


def _ending(chunks: Iterator[bytes], span: Any, status: int) -> Iterator[bytes]:
    """A streamed attempt's chunks; its span ends with the stream (closed early too)."""
    try:
        yield from chunks
    finally:
        otel.ended_with(span, status)


def _sse_error(code: str, message: str) -> bytes:
    data = json.dumps({"code": code, "message": message, "node": None})
    return f"event: error\ndata: {data}\n\n".encode()
