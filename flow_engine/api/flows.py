"""Flow CRUD, versions, publish, rollback and routing (DESIGN.md "Engine HTTP API")."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from flow_engine.api.common import engine, json_body
from flow_engine.errors import BadRequest, NotFound
from flow_engine.runs.request import MAX_VERSION
from flow_engine.store.base import FlowRecord, VersionRecord

bp = Blueprint("flows", __name__)


def flow_json(flow: FlowRecord, definition: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {
        "id": flow.id, "name": flow.name, "description": flow.description,
        "latest_version": flow.latest_version, "live_version": flow.live_version,
        "previous_live_versions": list(flow.live_history), "routing": flow.routing,
        "created_at": flow.created_at.isoformat(), "updated_at": flow.updated_at.isoformat(),
    }
    if definition is not None:
        body["definition"] = definition
    return body


def version_json(v: VersionRecord, *, live: int | None, definition: bool) -> dict[str, Any]:
    body = {"flow_id": v.flow_id, "version": v.version, "live": v.version == live,
            "created_at": v.created_at.isoformat()}
    if definition:
        body["definition"] = v.definition
    return body


@bp.post("/flows")
def create_flow():
    flow = engine().flows.create(json_body())
    version = engine().store.get_version(flow.id, 1)
    return jsonify(flow_json(flow, version.definition)), 201, {"Location": f"/api/v1/flows/{flow.id}"}


@bp.get("/flows")
def list_flows():
    limit = _int_arg("limit", 100, 1, 1000)
    offset = _int_arg("offset", 0, 0, 10**9)
    flows = engine().store.list_flows(limit=limit, offset=offset)
    return jsonify({"flows": [flow_json(f) for f in flows], "limit": limit, "offset": offset})


@bp.get("/flows/<flow_ref>")
def get_flow(flow_ref: str):
    store = engine().store
    flow = store.get_flow(flow_ref)
    shown = flow.live_version or flow.latest_version
    return jsonify(flow_json(flow, store.get_version(flow.id, shown).definition))


@bp.put("/flows/<flow_ref>")
def new_version(flow_ref: str):
    version = engine().flows.new_version(flow_ref, json_body())
    flow = engine().store.get_flow(version.flow_id)
    return jsonify(version_json(version, live=flow.live_version, definition=True)), 201


@bp.delete("/flows/<flow_ref>")
def delete_flow(flow_ref: str):
    engine().flows.delete(flow_ref)
    return "", 204


@bp.get("/flows/<flow_ref>/versions")
def list_versions(flow_ref: str):
    store = engine().store
    flow = store.get_flow(flow_ref)
    versions = store.list_versions(flow.id)
    return jsonify({"flow_id": flow.id, "live_version": flow.live_version,
                    "versions": [version_json(v, live=flow.live_version, definition=False)
                                 for v in versions]})


@bp.get("/flows/<flow_ref>/versions/<int:number>")
def get_version(flow_ref: str, number: int):
    store = engine().store
    flow = store.get_flow(flow_ref)
    if number > MAX_VERSION:  # no store column holds it: no such version, never a 500
        raise NotFound(f"flow '{flow.id}' has no version {number}")
    return jsonify(version_json(store.get_version(flow.id, number), live=flow.live_version,
                                definition=True))


@bp.post("/flows/<flow_ref>/publish")
def publish(flow_ref: str):
    body = json_body()
    number = body.get("version") if isinstance(body, dict) else None
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_VERSION:
        raise BadRequest('publish needs {"version": N} with N a version number')
    return jsonify(flow_json(engine().flows.publish(flow_ref, number)))


@bp.post("/flows/<flow_ref>/rollback")
def rollback(flow_ref: str):
    return jsonify(flow_json(engine().flows.rollback(flow_ref)))


@bp.put("/flows/<flow_ref>/routing")
def set_routing(flow_ref: str):
    flow = engine().flows.set_routing(flow_ref, json_body())
    return jsonify(flow_json(flow))


@bp.post("/flows/validate")
def validate():
    """Validate a definition without storing it (what ``flowgate flows validate`` does)."""
    definition = engine().flows.validate(json_body(), flow_id="unsaved")
    return jsonify({"valid": True, "nodes": len(definition.nodes), "edges": len(definition.edges)})


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name} must be between {low} and {high}")
    return value
