"""``GET /openapi.json``: the OpenAPI 3.1 description of the ambassador's routes.

Written by hand next to the routes (app.py, run_flow.py, ws.py), like the engine's; tests
check that it is valid, that its paths are exactly the routes the app serves, and that what
the app answers matches it (tests/ambassador/test_openapi.py). It is what an app developer
reads and what fuzzers (schemathesis) check the ambassador against, so every status a route
can give is listed, each with its content type: errors are always
``{"error": {"code", "message", "trace_id"}}``, whether the ambassador refused the request
itself or relays the engine's refusal.
"""

from __future__ import annotations

from typing import Any

from ambassador.hygiene import ID, LAST_EVENT_ID
from flowgate.common.run_request import CHOICES, MAX_VERSION

JSON = "application/json"
SSE = "text/event-stream"
PRINTABLE = r"^[\x20-\x7e\t]*$"  # forwarded header values (hygiene.header_problem)

ERROR_TEXT = {
    400: "malformed request (JSON, ids, header values, nesting deeper than 64 levels)",
    401: "missing or invalid credentials (inbound auth), or the engine refused its key",
    403: "the caller may not run this flow (or watch this run, or send X-Flowgate-Fault), or "
         "the engine refused it",
    404: "unknown flow or run (a run of another tenant is unknown too)",
    409: "the Idempotency-Key was used with another body, or the run cannot be followed",
    413: "the body is larger than max_body_bytes",
    415: "the body is not JSON (Content-Type: application/json)",
    422: "the engine refused the run (invalid tweaks, input or output type, …)",
    426: "a WebSocket version other than 13",
    429: "over a rate limit (the ambassador's, or the tenant's limit on the engine)",
    500: "an error inside the ambassador or the engine; the trace id finds it in the logs",
    502: "the flow or its LLM failed, or the engine answered something broken",
    503: "the engine is unreachable, shedding load, or the circuit breaker is open",
    504: "no answer within the deadline",
}
RUN_ERRORS = (400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 502, 503, 504)
EVENTS_ERRORS = (400, 401, 403, 404, 409, 429, 500, 502, 503, 504)
HANDSHAKE_ERRORS = (400, 401, 403, 426, 429)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _header(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string", "pattern": PRINTABLE, **schema}}


TRACE_HEADERS = [
    _header("traceparent", "W3C trace context; kept, and a child span goes to the engine"),
    _header("X-Request-ID", "kept and returned"),
]
# fault drills (ambassador/filters/fault.py): only from identities the config allows
FAULT_HEADER = _header(
    "X-Flowgate-Fault", "fault drill: `delay=<ms>` (0-60000), `abort=<status>` (400-599) or "
    "both, `delay=500;abort=503`, applied to every attempt; only from an API key with "
    "`allow_fault_header: true` or a JWT identity in `inbound_auth.jwt.fault_header_identities` "
    "(403 `fault_not_allowed` otherwise, and always with inbound auth `none`); a malformed or "
    "out-of-range value is 400 `bad_request`; an injected abort is "
    "`{\"error\": {\"code\": \"fault_injected\"}}` with that status",
    maxLength=64)
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}


# on every answer, errors included
_ANSWER_HEADERS = {name: {"$ref": f"#/components/headers/{name}"}
                   for name in ("X-Trace-ID", "traceparent", "X-Request-ID")}


# refused by the HTTP server (gunicorn) before the ambassador sees the request, with its
# own HTML page: not in the error contract, and possible on every route
SERVER_REFUSALS = {414: "the request line is longer than 4094 bytes (refused by the HTTP "
                        "server, before the ambassador: an HTML page)",
                   431: "a header field is longer than 8190 bytes, or there are more than "
                        "100 (refused by the HTTP server, before the ambassador: an HTML page)"}


def _errors(statuses: tuple[int, ...]) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/E{status}"}
            for status in (*statuses, *SERVER_REFUSALS)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "headers": dict(_ANSWER_HEADERS),
            "content": {JSON: {"schema": schema}}}


def _probe(summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "security": [], "responses": {"200": ok, **_errors(())}}


def build_spec() -> dict[str, Any]:
    run_ok = _json(_ref("RunResult"), "the run's result (or the flow's configured fallback, "
                   "marked X-Fallback: true and \"fallback\": true)")
    run_ok["headers"] = {**_ANSWER_HEADERS, **{name: {"$ref": f"#/components/headers/{name}"}
                                               for name in ("X-Cache", "X-Upstream-Attempts",
                                                            "X-Run-ID", "X-Flow-Version")}}
    run_ok["content"][SSE] = {"schema": _ref("RunEvent")}
    paths: dict[str, Any] = {
        "/run-flow": {"post": {
            "summary": "run a flow on the engine (the app's one call)",
            "description": "`\"stream\": true` or `Accept: text/event-stream` answers with the "
                           "run's events as Server-Sent Events.",
            "parameters": [
                _header("Idempotency-Key", "the same key and body → the same run, not a "
                        "second one (the ambassador adds one to every run otherwise)",
                        pattern=r"^[\x21-\x7e]{1,200}$"),
                _header("Cache-Control", "no-cache: skip the cache lookup; no-store: do not "
                        "cache the answer"),
                _header("Accept", "text/event-stream to stream"),
                FAULT_HEADER,
                *TRACE_HEADERS],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("RunFlowRequest")}}},
            "responses": {"200": run_ok, **_errors(RUN_ERRORS)},
        }},
        "/runs/{run_id}/events": {"get": {
            "summary": "the run's events (SSE): replayed after Last-Event-ID, then live",
            "parameters": [
                {"name": "run_id", "in": "path", "required": True,
                 "schema": {"type": "string", "pattern": f"^{ID.pattern}$"}},
                {"name": "last_event_id", "in": "query", "required": False,
                 "description": "resume after this event (EventSource cannot set the header "
                                "on a first connect)",
                 "schema": {"type": "string", "pattern": f"^{LAST_EVENT_ID.pattern}$"}},
                _header("Last-Event-ID", "resume after this event",
                        pattern=f"^{LAST_EVENT_ID.pattern}$"),
                FAULT_HEADER,
                *TRACE_HEADERS],
            "responses": {"200": {"description": "the run's events",
                                  "headers": _ANSWER_HEADERS,
                                  "content": {SSE: {"schema": _ref("RunEvent")}}},
                          **_errors(EVENTS_ERRORS)},
        }},
        "/ws/run-flow": {"get": {
            "summary": "WebSocket: the engine's run protocol, bridged (an HTTP GET with "
                       "Upgrade: websocket)",
            "description": "Send `{\"type\": \"run\", \"flow_id\", \"input\"}`, `cancel`, "
                           "`watch`; receive each run event as a message. A refused message "
                           "is answered `{\"type\": \"error\", \"code\": \"forbidden\" | "
                           "\"run_not_found\" | \"rate_limited\" | \"bad_request\"}`. Close "
                           "codes: the engine's (1013 at its limit, …); 1008 credential "
                           "expired or revoked; 1009 message over max_body_bytes; 1011 the "
                           "engine unreachable or gone. Pages of other origins get 403.",
            "parameters": [
                {"name": "Upgrade", "in": "header", "required": True,
                 "schema": {"type": "string", "enum": ["websocket"]}},
                {"name": "Connection", "in": "header", "required": True,
                 "schema": {"type": "string", "enum": ["Upgrade"]}},
                {"name": "Sec-WebSocket-Version", "in": "header", "required": True,
                 "schema": {"type": "string", "enum": ["13"]}},
                {"name": "Sec-WebSocket-Key", "in": "header", "required": True,
                 "schema": {"type": "string", "pattern": "^[A-Za-z0-9+/]{21}[AQgw]==$"}},
                {"name": "Origin", "in": "header", "required": False,
                 "description": "browsers: only the same origin and websocket.allowed_origins",
                 "schema": {"type": "string"}},
                *TRACE_HEADERS],
            "responses": {"101": {"description": "switched to the WebSocket protocol"},
                          **_errors(HANDSHAKE_ERRORS)},
        }},
        "/healthz": {"get": _probe("liveness", _json(
            {"type": "object", "required": ["status"],
             "properties": {"status": {"const": "ok"}}}, "alive"))},
        "/readyz": {"get": {
            **_probe("readiness: the config is loaded (never tied to the engine's health)",
                     _json(_ref("Readiness"), "ready")),
            "parameters": [{"name": "verbose", "in": "query", "required": False,
                            "description": "any value: add the breaker, the last upstream "
                                           "success and error, and the config's state",
                            "schema": {"type": "string"}}]}},
        "/metrics": {"get": _probe("Prometheus metrics", {
            "description": "text exposition format", "headers": _ANSWER_HEADERS,
            "content": {"text/plain": {"schema": {"type": "string"}}}})},
        "/openapi.json": {"get": _probe("this document", _json({"type": "object"}, "OpenAPI 3.1"))},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Flowgate ambassador", "version": "1",
                 "description": "The sidecar business apps call on localhost: it runs flows on "
                                "the flow engine with auth, trace ids, timeouts, retries, a "
                                "circuit breaker, caching, rate limits and fallbacks."},
        "servers": [{"url": "/"}],
        # inbound auth is the deployment's choice: none (loopback), API keys or JWTs
        "security": [{}, {"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": _components(),
    }


def _components() -> dict[str, Any]:
    def text_header(description: str) -> dict[str, Any]:
        return {"description": description, "schema": {"type": "string"}}

    responses: dict[str, Any] = {
        f"E{status}": {"description": description,
                       "content": {"text/html": {"schema": {"type": "string"}}}}
        for status, description in SERVER_REFUSALS.items()}
    for status, description in ERROR_TEXT.items():
        response: dict[str, Any] = {"description": description,
                                    "headers": dict(_ANSWER_HEADERS),
                                    "content": {JSON: {"schema": _ref("Error")}}}
        if status in (429, 503):
            response["headers"].update(RETRY_AFTER)
        responses[f"E{status}"] = response
    return {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "an API key of inbound_auth.api_keys, or a JWT"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        "headers": {
            "X-Trace-ID": {**text_header("the trace id (also in errors' trace_id)"),
                           "required": True},
            "traceparent": {**text_header("W3C trace context (the caller's, when it sent one)"),
                            "required": True},
            "X-Request-ID": {**text_header("the caller's, or a new one"), "required": True},
            "X-Cache": {"description": "the cache's part in this answer",
                        "schema": {"type": "string",
                                   "enum": ["HIT", "MISS", "BYPASS", "STALE", "COALESCED"]}},
            "X-Upstream-Attempts": text_header("attempts made to reach the engine"),
            "X-Run-ID": text_header("the run's id"),
            "X-Flow-Version": text_header("the flow version that answered (a cached answer: "
                                          "the one it was stored from)"),
        },
        "responses": responses,
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message", "trace_id"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                               "trace_id": {"type": ["string", "null"]}}}}},
            "RunFlowRequest": {
                "type": "object", "required": ["flow_id"], "additionalProperties": False,
                "properties": {
                    "flow_id": {"type": "string", "pattern": f"^{ID.pattern}$",
                                "description": "the id or unique name of a flow"},
                    "input": {"type": ["string", "null"]},
                    "input_value": {"type": ["string", "null"],
                                    "description": "LangFlow's name for input (send one of them)"},
                    "session_id": {"type": ["string", "null"], "minLength": 1, "maxLength": 200},
                    "tweaks": {"type": ["object", "null"],
                               "description": "{node_id: {param: value}}: what the flow lists "
                                              "as tweakable"},
                    "version": {"type": ["integer", "null"], "minimum": 1,
                                "maximum": MAX_VERSION},
                    "stream": {"type": ["boolean", "null"]},
                    **{name: {"enum": [*allowed, None]} for name, allowed in CHOICES.items()}}},
            "RunResult": {
                "type": "object", "required": ["flow_id"],
                "properties": {
                    "run_id": {"type": ["string", "null"]},
                    "flow_id": {"type": ["string", "null"]},
                    "version": {"type": ["integer", "null"]},
                    "session_id": {"type": ["string", "null"]},
                    "output": {"description": "the text of the first output node that ran "
                                              "(a fallback's: as configured)"},
                    "outputs": {"type": "array"}, "usage": {"type": "object"},
                    "duration_ms": {"type": "number"},
                    "fallback": {"type": "boolean"}, "fallback_reason": {"type": "string"}}},
            # one Server-Sent Event (what `schema` of text/event-stream describes in 3.1)
            "RunEvent": {
                "type": "object", "required": ["data"],
                "description": "run_started, node_started, token, node_finished, error, "
                               "run_finished; an error event also ends a stream the "
                               "ambassador cut (upstream_timeout, bad_upstream)",
                "properties": {
                    "event": {"type": "string"},
                    "id": {"type": "string", "description": "the event's sequence number, "
                                                            "for Last-Event-ID"},
                    "data": {"type": "string", "contentMediaType": JSON,
                             "description": "the event as a JSON object"},
                    "retry": {"type": "integer"}}},
            "Readiness": {
                "type": "object", "required": ["status"],
                "properties": {
                    "status": {"const": "ready"},
                    "upstream": {"type": "object", "properties": {
                        "breaker": {"enum": ["closed", "open", "half_open"]},
                        "last_ok": {"type": ["number", "null"]},
                        "last_error": {"type": ["object", "null"]},
                        "url": {"type": "string"}}},
                    "config": {"type": "object", "properties": {
                        "last_reload_failed": {"type": "boolean"},
                        "path": {"type": ["string", "null"]},
                        "last_reload_error": {"type": ["string", "null"]}}}}},
        },
    }


SPEC = build_spec()
