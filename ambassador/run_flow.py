"""``POST /run-flow``, every app's one call, served below Flask by :class:`RunFlowPath` (a
WSGI middleware in front of the Flask app): Flask's request context, routing and response
objects cost more per request than everything the route itself does."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from ambassador import hygiene
from ambassador.answer import answer, forwarded
from ambassador.chain import Request
from flowgate import tracing

if TYPE_CHECKING:
    from ambassador.app import Ambassador

log = logging.getLogger("ambassador")
MAX_VERSION = 2**31 - 1
IO_TYPES = ("chat", "text", "any", "debug")  # the engine's (debug: any)
CHOICES = {"input_type": IO_TYPES, "output_type": IO_TYPES,
           "on_disconnect": ("cancel", "continue")}
RUN_FLOW_FIELDS = {"flow_id", "input", "input_value", "session_id", "tweaks", "version", "stream",
                   "input_type", "output_type", "on_disconnect"}


class RunFlowPath:
    """WSGI middleware serving ``/run-flow`` itself and passing every other path to ``app``
    (see the module docstring). Same contract as a Flask route would give: the trace
    headers on every answer, errors in the error contract, 405/413/415 for a wrong method,
    size or content type, the in-flight gauge held until the answer (a stream: its end) is
    done."""

    path, methods = "/run-flow", ("POST",)  # what it serves (and the OpenAPI document says)

    def __init__(self, amb: Ambassador, app) -> None:
        self.amb, self.app = amb, app

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != self.path:
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
        if method not in self.methods:
            status, headers, body, done = _refusal(
                trace, 405, "method_not_allowed", f"{method} is not allowed here; use POST")
            headers["Allow"] = ", ".join(self.methods)
            return status, headers, body, done
        headers = forwarded(environ)
        problem = hygiene.header_problem(headers)
        if problem:
            return _refusal(trace, 400, "bad_request", problem)
        mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if mimetype != "application/json" and not mimetype.endswith("+json"):
            return _refusal(trace, 415, "unsupported_media_type",
                            "expected Content-Type: application/json")
        limit = self.amb.settings.max_body_bytes
        length = environ.get("CONTENT_LENGTH")
        if length and length.isascii() and length.isdigit() and int(length) > limit:
            return _refusal(trace, 413, "payload_too_large",
                            f"the body is larger than {limit} bytes")
        try:
            data = environ["wsgi.input"].read(int(length) if length and length.isascii() and length.isdigit()
                                              else limit + 1)
        except TimeoutError as exc:  # flowgate.serving.BodyTimeout: the body stalled
            status, headers, body, done = _refusal(trace, 408, "request_timeout", str(exc))
            headers["Connection"] = "close"  # the rest of the body may still come
            return status, headers, body, done
        if len(data) > limit:
            return _refusal(trace, 413, "payload_too_large",
                            f"the body is larger than {limit} bytes")
        try:
            body = hygiene.loads(data)
        except hygiene.BadJson as exc:
            return _refusal(trace, 400, "bad_request", f"bad JSON body: {exc}")
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
        req = Request("POST", path, headers, "/run-flow", upstream_body,
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
            408: "Request Timeout",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            415: "Unsupported Media Type", 422: "Unprocessable Entity",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def _check_run_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return 'the body must be a JSON object like {"flow_id": "faq", "input": "hello"}'
    if "input_value" in body:  # LangFlow's name for it (the WebSocket takes it too)
        if "input" in body and body["input"] != body["input_value"]:
            return "input and input_value are one field (input_value is LangFlow's name); send one"
        body["input"] = body.pop("input_value")
    unknown = sorted(set(body) - RUN_FLOW_FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(RUN_FLOW_FIELDS))}"
    flow_id = body.get("flow_id")
    if not hygiene.valid_id(flow_id):
        return "flow_id is required: the id or name of a flow (letters, digits, '_', '.', '-')"
    if body.get("input") is not None and not isinstance(body["input"], str):
        return "input must be a string"
    if body.get("session_id") is not None and (
            not isinstance(body["session_id"], str) or not 0 < len(body["session_id"]) <= 200):
        return "session_id must be a string of 1-200 characters"
    if body.get("tweaks") is not None and not isinstance(body["tweaks"], dict):
        return "tweaks must be an object {node_id: {param: value}}"
    version = body.get("version")
    if isinstance(version, float) and version.is_integer():
        version = body["version"] = int(version)  # 2.0 is an integer in JSON (Schema) too
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 1 <= version <= MAX_VERSION):
        return f"version must be an integer from 1 to {MAX_VERSION}"
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        return "stream must be true or false"
    for name, allowed in CHOICES.items():  # the engine took {} or 0 for "chat"
        if body.get(name) is not None and body[name] not in allowed:
            return f"{name} must be one of {', '.join(allowed)}"
    return None
