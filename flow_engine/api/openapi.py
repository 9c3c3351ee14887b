"""``GET /api/v1/openapi.json``: the OpenAPI 3.1 description of the engine's HTTP API.

Written by hand next to the routes; a test checks it is valid and that its paths are
exactly the routes the app serves.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from flow_engine.api import knowledge
from flow_engine.interop import api as interop

bp = Blueprint("openapi", __name__)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


MESSAGE = {"type": "string", "maxLength": 2000,
           "description": "why (kept in the audit log, like a commit message)"}
ERRORS = {str(s): {"$ref": f"#/components/responses/E{s}"}
          for s in (400, 401, 404, 408, 409, 413, 415, 422, 503)}
FLOW_REF = {"name": "flow_ref", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "flow id or unique name"}
RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _op(summary: str, ok: dict[str, Any], *, status: str = "200", body: dict | None = None,
        params: list | None = None, errors: tuple[int, ...] = (400, 401, 404)) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {status: ok}}
    for code in errors:
        op["responses"][str(code)] = ERRORS[str(code)]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


SERVER_REFUSALS = {414: "the request line is longer than 4094 bytes (refused by gunicorn)",
                   431: "a header field is longer than 8190 bytes, or there are more than 100 "
                        "(refused by gunicorn)"}


def build_spec() -> dict[str, Any]:
    flow = _json(_ref("Flow"), "the flow")
    plain = {"security": []}
    paths: dict[str, Any] = {
        "/healthz": {"get": {**plain, "summary": "liveness",
                             "responses": {"200": _json({"type": "object"}, "alive")}}},
        "/readyz": {"get": {**plain, "summary": "readiness (store reachable, components loaded)",
                            "responses": {"200": _json({"type": "object"}, "ready"),
                                          "503": _json({"type": "object"}, "not ready")}}},
        "/metrics": {"get": {**plain, "summary": "Prometheus metrics",
                             "responses": {"200": {
                                 "description": "text exposition format",
                                 "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/api/v1/openapi.json": {"get": _op("this document", _json({"type": "object"}, "OpenAPI 3.1"),
                                            errors=(401,))},
        "/api/v1/components": {"get": _op("node types with params schema, inputs, outputs",
                                          _json({"type": "object"}, "components"), errors=(401,))},
        "/api/v1/flows": {
            "get": _op("list flows", _json({"type": "object", "properties": {
                "flows": {"type": "array", "items": _ref("Flow")}}}, "flows"),
                params=[{"name": "limit", "in": "query", "schema": {"type": "integer"}},
                        {"name": "offset", "in": "query", "schema": {"type": "integer"}}],
                errors=(400, 401)),
            "post": _op("create a flow (version 1, live)", flow, status="201",
                        body=_ref("FlowDefinition"), errors=(400, 401, 409, 413, 415, 422)),
        },
        "/api/v1/flows/validate": {"post": _op("validate a definition without storing it",
                                               _json({"type": "object"}, "valid"),
                                               body=_ref("FlowDefinition"),
                                               errors=(400, 401, 415, 422))},
        "/api/v1/flows/{flow_ref}": {
            "get": _op("read a flow and its live definition", flow, params=[FLOW_REF]),
            "put": _op("add an immutable version N+1 (not live until published)",
                       _json(_ref("Version"), "the new version"), status="201",
                       body=_ref("FlowDefinition"), params=[FLOW_REF],
                       errors=(400, 401, 404, 409, 413, 415, 422)),
            "delete": {"summary": "delete a flow and its versions", "parameters": [FLOW_REF],
                       "responses": {"204": {"description": "deleted"}, "401": ERRORS["401"],
                                     "404": ERRORS["404"]}},
        },
        "/api/v1/flows/{flow_ref}/versions": {"get": _op("list versions", _json(
            {"type": "object"}, "versions"), params=[FLOW_REF])},
        "/api/v1/flows/{flow_ref}/versions/{number}": {"get": _op("read one version", _json(
            _ref("Version"), "the version"), params=[FLOW_REF, {
                "name": "number", "in": "path", "required": True, "schema": {"type": "integer"}}])},
        "/api/v1/flows/{flow_ref}/publish": {"post": _op(
            "make a version live (built first: 422 if it cannot be)", flow, params=[FLOW_REF],
            body={"type": "object", "required": ["version"], "properties": {
                "version": {"type": "integer", "minimum": 1}, "message": MESSAGE,
                "dry_run": {"type": "boolean"}, "guard": _ref("Guard")}},
            errors=(400, 401, 404, 415, 422))},
        "/api/v1/flows/{flow_ref}/rollback": {"post": _op(
            "move the live pointer back to the previously live version", flow, params=[FLOW_REF],
            errors=(400, 401, 404, 409, 415, 422))},
        "/api/v1/flows/{flow_ref}/routing": {"put": _op(
            "set live version, canary and sticky key", flow, params=[FLOW_REF],
            body=_ref("Routing"), errors=(400, 401, 404, 415, 422))},
        "/api/v1/flows/{flow_ref}/audit": {"get": _op(
            "the flow's changes, newest first", _json({"type": "object", "properties": {
                "flow_id": {"type": "string"},
                "entries": {"type": "array", "items": _ref("AuditEntry")}}}, "its history"),
            params=[FLOW_REF, {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    {"name": "before", "in": "query", "schema": {"type": "integer"}}])},
        "/api/v1/audit": {"get": _op(
            "every flow's changes after ?since=seq, oldest first",
            _json({"type": "object", "properties": {
                "entries": {"type": "array", "items": _ref("AuditEntry")},
                "next_since": {"type": "integer"}}}, "changes"),
            params=[{"name": "since", "in": "query", "schema": {"type": "integer"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}}],
            errors=(400, 401))},
        "/api/v1/flows/{flow_ref}/diff": {"get": _op(
            "what changed between two versions", _json({"type": "object"}, "the diff"),
            params=[FLOW_REF, {"name": "from", "in": "query", "required": True,
                               "schema": {"type": "integer"}},
                    {"name": "to", "in": "query", "required": True,
                     "schema": {"type": "integer"}}])},
        "/api/v1/run/{flow_ref}": {"post": {
            **_op("run the live (or pinned / canary) version", _json(_ref("RunResult"), "result"),
                  params=[FLOW_REF,
                          {"name": "stream", "in": "query", "schema": {"type": "boolean"},
                           "description": "answer with Server-Sent Events"},
                          {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"},
                           "description": "same key and body → the same run, not a second one"}],
                  body=_ref("RunRequest"),
                  errors=(400, 401, 404, 408, 409, 413, 415, 422, 503)),
        }},
        "/api/v1/runs": {"get": _op(
            "recorded runs the caller may see, newest first",
            _json({"type": "object", "properties": {
                "runs": {"type": "array", "items": _ref("RunRecord")},
                "next_before": {"type": ["string", "null"]}}}, "runs"),
            params=[{"name": "flow", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    {"name": "before", "in": "query", "schema": {"type": "string"},
                     "description": "a run's created_at: the next page"}],
            errors=(400, 401))},
        "/api/v1/flows/{flow_ref}/stats": {"get": _op(
            "runs, failure rate and p95 of the flow's recent versions",
            _json({"type": "object", "properties": {
                "flow_id": {"type": "string"}, "window_s": {"type": "integer"},
                "versions": {"type": "array", "items": {"type": "object"}}}}, "figures"),
            params=[FLOW_REF, {"name": "window_s", "in": "query", "schema": {"type": "integer"}}],
            errors=(400, 401, 404))},
        "/api/v1/ws/ticket": {"post": _op(
            "a one-time ticket for the WebSocket handshake (?ticket=)",
            _json({"type": "object", "properties": {"ticket": {"type": "string"},
                                                    "expires_in": {"type": "integer"}}}, "ticket"),
            status="201", errors=(401, 503))},
        "/api/v1/runs/{run_id}": {"get": _op("a run record", _json(_ref("RunRecord"), "the run"),
                                             params=[RUN_ID], errors=(401, 404))},
        "/api/v1/runs/{run_id}/events": {"get": _op(
            "replay the run's events after Last-Event-ID, then follow it live (SSE)",
            {"description": "run events: id/event/data lines",
             "content": {"text/event-stream": {"schema": _ref("RunEvent")}}},
            params=[RUN_ID,
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}},
                    {"name": "last_event_id", "in": "query", "schema": {"type": "integer"}}],
            errors=(400, 401, 404, 409, 503))},
        "/api/v1/runs/{run_id}/cancel": {"post": _op(
            "cancel a running run", _json({"type": "object"}, "cancelling"), status="202",
            params=[RUN_ID], errors=(401, 404, 409, 503))},
        "/api/v1/ws/runs": {"get": {
            **_op("WebSocket: run flows and follow runs (protocol: flow_engine/api/ws.py)",
                  {"description": "WebSocket upgrade; then JSON messages: send "
                                 '{"type": "run" | "watch" | "cancel", ...}, receive run events '
                                 '{"type", "seq", ...} and errors {"type": "error", "code", ...}'},
                  status="101",
                  params=[{"name": "ticket", "in": "query", "schema": {"type": "string"},
                           "description": "a one-time ticket from POST /api/v1/ws/ticket"},
                          {"name": "token", "in": "query", "schema": {"type": "string"},
                           "description": "the API key, for clients that cannot set headers "
                                          "(it ends up in logs: prefer a ticket)"}],
                  errors=(400, 401)),
        }},
    }
    paths["/api/v1/run/{flow_ref}"]["post"]["responses"]["200"]["content"]["text/event-stream"] = {
        "schema": _ref("RunEvent")}
    paths.update(knowledge.openapi_paths())  # flow_engine/api/knowledge.py
    paths.update(interop.openapi_paths())  # flow_engine/interop/api.py
    # what gunicorn itself refuses before the app sees the request (HTML, not the contract)
    for operations in paths.values():
        for op in operations.values():
            for status, what in SERVER_REFUSALS.items():
                op["responses"].setdefault(str(status), {
                    "description": what, "content": {"text/html": {"schema": {"type": "string"}}}})
    error_schema = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "trace_id": {"type": ["string", "null"]},
                       "problems": {"type": "array", "items": {"type": "object", "properties": {
                           "path": {"type": "string"}, "message": {"type": "string"}}}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Flowgate flow engine", "version": "1",
                 "description": "Stores, versions, routes and runs LLM flows."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "responses": {f"E{s}": _json(_ref("Error"), d) for s, d in (
                (400, "malformed request"), (401, "missing or invalid API key"),
                (404, "unknown flow, version or run"), (408, "the body did not arrive in time"),
                (409, "conflict"), (413, "body too large"), (415, "not JSON"),
                (422, "invalid flow or tweaks"),
                (503, "the store or the shared event log is unavailable; see Retry-After"))},
            "schemas": {
                "Error": error_schema,
                "FlowDefinition": {"type": "object", "required": ["nodes"], "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"},
                    "description": {"type": "string"},
                    "nodes": {"type": "array", "items": {"type": "object", "required": ["id", "type"]}},
                    "edges": {"type": "array", "items": {"type": "object",
                                                         "required": ["source", "target"]}}}},
                "Flow": {"type": "object", "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"},
                    "latest_version": {"type": "integer"},
                    "live_version": {"type": ["integer", "null"]},
                    "routing": {"type": ["object", "null"]},
                    "definition": _ref("FlowDefinition"),
                    # on the answers of publish, rollback and routing: the entry they wrote
                    "audit": {"anyOf": [_ref("AuditEntry"), {"type": "null"}]}}},
                "Version": {"type": "object", "properties": {
                    "flow_id": {"type": "string"}, "version": {"type": "integer"},
                    "live": {"type": "boolean"}, "definition": _ref("FlowDefinition")}},
                "Routing": {"type": "object", "properties": {
                    "live": {"type": "integer"},
                    "canary": {"type": ["object", "null"], "properties": {
                        "version": {"type": "integer"}, "percent": {"type": "number"},
                        "guard": _ref("Guard"),
                        "steps": {"type": "array", "items": {"type": "number"}},
                        "step_after_s": {"type": "number"}}},
                    "sticky_key": {"type": ["string", "null"], "enum": ["session_id", None]},
                    "message": MESSAGE, "dry_run": {"type": "boolean"}}},
                "Guard": {"type": "object", "properties": {
                    "max_error_rate": {"type": "number"}, "max_latency_ratio": {"type": "number"},
                    "min_runs": {"type": "integer"}, "window_s": {"type": "number"}}},
                "AuditEntry": {"type": "object", "required": ["seq", "at", "actor", "action",
                                                              "flow_id"], "properties": {
                    "seq": {"type": "integer"}, "at": {"type": "string"},
                    "actor": {"type": "string"}, "action": {"type": "string"},
                    "flow_id": {"type": "string"},
                    "from_version": {"type": ["integer", "null"]},
                    "to_version": {"type": ["integer", "null"]},
                    "routing": {"type": ["object", "null"]}, "reason": {"type": ["object", "null"]},
                    "message": {"type": ["string", "null"]},
                    "trace_id": {"type": ["string", "null"]}}},
                # one Server-Sent Event (what the schema of text/event-stream describes)
                "RunEvent": {"type": "object", "required": ["data"], "properties": {
                    "event": {"type": "string", "description": "run_started, node_started, "
                              "token, node_finished, error, run_finished"},
                    "id": {"type": "string", "description": "the event's sequence number "
                           "(for Last-Event-ID); absent on an outcome replayed from the record"},
                    "data": {"type": "string", "contentMediaType": "application/json",
                             "description": "the event as a JSON object"}}},
                "RunRequest": {"type": "object", "properties": {
                    "input_value": {"type": ["string", "null"]},
                    "input_type": {"enum": ["chat", "text", "any"]},
                    "output_type": {"enum": ["chat", "text", "any", "debug"]},
                    "tweaks": {"type": "object"}, "session_id": {"type": "string"},
                    "version": {"type": "integer", "minimum": 1}}},
                "RunResult": {"type": "object", "properties": {
                    "run_id": {"type": "string"}, "flow_id": {"type": "string"},
                    "version": {"type": "integer"}, "session_id": {"type": ["string", "null"]},
                    "output": {"type": ["string", "null"]}, "outputs": {"type": "array"},
                    "usage": {"type": "object"}, "duration_ms": {"type": "number"},
                    "warnings": {"type": "array", "items": {"type": "string"},
                                 "description": "only when there are some (e.g. an input_type "
                                                "no input node reads)"}}},
                "RunRecord": {"type": "object", "properties": {
                    "run_id": {"type": "string"}, "status": {
                        "enum": ["running", "succeeded", "failed", "cancelled"]}}},
            },
        },
    }


SPEC = build_spec()


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(SPEC)
