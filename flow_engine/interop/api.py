"""``POST /api/v1/flows/import`` (editor; ``publish: true`` needs publisher) and
``GET /api/v1/flows/{id}/export?format=langflow[&version=N]`` (runner, like reading a flow).

Import answers 201 with ``{flow, version, live, report, message?}``; the report says what
became of every LangFlow node, field and edge, and warns about what was left out (keys,
custom code). An export that cannot be imported is a 422 listing every problem at once,
each at its path in the request (``$.flow.data.nodes[3]``); components with no Flowgate
equivalent are listed again in ``unsupported`` with their type, display name and what to do.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request

from flow_engine.api.common import engine, json_body, principal
from flow_engine.errors import BadRequest
from flow_engine.interop.service import ImportRequest, export_flow, import_flow

bp = Blueprint("interop", __name__)


@bp.post("/flows/import")
def import_langflow():
    trace = g.get("trace")
    result = import_flow(engine().flows, ImportRequest.from_body(json_body()), principal(),
                         trace.trace_id if trace else None)
    g.flow_id = result["flow"]["id"]
    return jsonify(result), 201, {"Location": f"/api/v1/flows/{g.flow_id}"}


@bp.get("/flows/<flow_ref>/export")
def export_langflow(flow_ref: str):
    raw = request.args.get("version")
    if raw is not None and (not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 10**9):
        raise BadRequest("version must be a version number")
    flow_id, body = export_flow(engine().flows, flow_ref, request.args.get("format"),
                                int(raw) if raw else None)
    g.flow_id = flow_id
    return jsonify(body), 200, {"Content-Disposition": f'attachment; filename="{flow_id}.json"'}


def openapi_paths() -> dict[str, Any]:
    """These routes in OpenAPI 3.1 (merged into GET /api/v1/openapi.json)."""

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}

    obj = {"type": "object"}
    flow_ref = {"name": "flow_ref", "in": "path", "required": True, "schema": {"type": "string"},
                "description": "flow id or unique name"}
    body = {"type": "object", "required": ["format", "flow"], "properties": {
        "format": {"enum": ["langflow"]}, "flow": {"type": "object", "description": "the export"},
        "id": {"type": "string", "description": "add a version to this flow (or create it)"},
        "publish": {"type": "boolean", "description": "make the version live (publisher)"},
        "message": {"type": "string", "maxLength": 500}}}
    imported = {"type": "object", "properties": {
        "flow": {"$ref": "#/components/schemas/Flow"}, "version": {"type": "integer"},
        "live": {"type": "boolean"}, "message": {"type": "string"},
        "report": {"type": "object", "properties": {
            "source": obj, "nodes": {"type": "array", "items": obj},
            "edges": {"type": "array", "items": obj}, "warnings": {"type": "array", "items": obj}}}}}
    return {
        "/api/v1/flows/import": {"post": {
            "summary": "import a LangFlow export as a new flow or version (nothing in it runs)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"201": {"description": "the flow, its new version and the report",
                                  "content": {"application/json": {"schema": imported}}},
                          "400": error("malformed request"), "401": error("no or bad key"),
                          "403": error("the role is missing (publish needs publisher)"),
                          "409": error("a flow with that name exists"),
                          "413": error("body too large"), "415": error("not JSON"),
                          "422": error("the export cannot be imported; every problem at its "
                                       "path, unsupported components listed")}}},
        "/api/v1/flows/{flow_ref}/export": {"get": {
            "summary": "a flow version as a LangFlow export (no component code)",
            "parameters": [flow_ref,
                           {"name": "format", "in": "query", "schema": {"enum": ["langflow"]}},
                           {"name": "version", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "the LangFlow export",
                                  "content": {"application/json": {"schema": obj}}},
                          "400": error("bad format or version"), "401": error("no or bad key"),
                          "404": error("unknown flow or version")}}},
    }
