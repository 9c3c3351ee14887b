"""Flow CRUD, versions, publish, rollback, routing, and their history: the audit log and
version diffs (docs/design.md "Engine HTTP API").

Every change carries who made it (the key's name; ``key/identity`` through a proxy), an
optional message — ``"message"`` in a JSON body that is not a definition, else the
``X-Flowgate-Message`` header (percent-encoded UTF-8) — and the trace id; the store writes
them to the audit log in the change's own transaction. Publish, rollback and routing build every version they
would make live first (422 if one cannot be built) and accept ``"dry_run": true`` to check
without changing anything. Their answers carry, under ``"audit"``, the audit entry the change
wrote (null if it cannot be told apart), so a console shows that entry — not whichever is
newest."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote

from flask import Blueprint, g, jsonify, request

from flow_engine.api.common import engine, int_arg, json_body, principal
from flow_engine.errors import BadRequest, FlowgateError, NotFound
from flow_engine.rollouts.analysis import Guard
from flow_engine.store.base import Change, FlowRecord, VersionRecord
from flowgate.common.run_request import MAX_VERSION, is_version

log = logging.getLogger(__name__)

MAX_MESSAGE = 2000

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


def change(body: Any = None) -> Change:
    """Who makes this change, with what message (see the module docstring)."""
    message = request.headers.get("X-Flowgate-Message")
    if message is not None:  # percent-encoded UTF-8 (a header holds ASCII)
        try:
            message = unquote(message, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("X-Flowgate-Message must be percent-encoded UTF-8") from None
    if isinstance(body, dict) and "message" in body:
        message = body["message"]
    if message is not None and (not isinstance(message, str) or len(message) > MAX_MESSAGE
                                or not message.replace("\n", " ").replace("\t", " ").isprintable()):
        raise BadRequest(f"message must be text of at most {MAX_MESSAGE} characters")
    trace = g.get("trace")
    return Change(actor=principal().actor, message=message or None,
                  trace_id=trace.trace_id if trace else None)


def written(flow: FlowRecord, action: str, made: Change) -> dict[str, Any]:
    """The flow with the audit entry this request's change wrote: the newest of the flow's
    entries with this request's trace id, actor and action. (The store commits the entry with
    the change but answers the flow only; another change of this flow by the same actor and
    trace id, sent concurrently with one traceparent, could be taken for this one.) The change
    is committed: a store that cannot be read now makes the entry null, never the answer an
    error — a caller retrying a rollback it was told had failed would roll back twice."""
    entry = None
    if made.trace_id is not None:
        try:
            entry = next((e.as_dict() for e in engine().store.list_audit(flow.id, 20)
                          if e.trace_id == made.trace_id and e.actor == made.actor
                          and e.action == action), None)
        except FlowgateError:
            log.warning("flow %s: %s committed, its audit entry could not be read back",
                        flow.id, action)
    return {**flow_json(flow), "audit": entry}


def _options(body: Any, allowed: set[str], example: str) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object like {example}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(sorted(allowed))}")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run must be true or false")
    return body


@bp.post("/flows")
def create_flow():
    flow = engine().flows.create(json_body(), change())
    version = engine().store.get_version(flow.id, 1)
    return jsonify(flow_json(flow, version.definition)), 201, {"Location": f"/api/v1/flows/{flow.id}"}


@bp.get("/flows")
def list_flows():
    limit = int_arg("limit", 100, 1, 1000)
    offset = int_arg("offset", 0, 0, 10**9)
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
    version = engine().flows.new_version(flow_ref, json_body(), change())
    flow = engine().store.get_flow(version.flow_id)
    return jsonify(version_json(version, live=flow.live_version, definition=True)), 201


@bp.delete("/flows/<flow_ref>")
def delete_flow(flow_ref: str):
    engine().flows.delete(flow_ref, change())
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
    body = _options(json_body(), {"version", "message", "dry_run", "guard"},
                    '{"version": 3, "message": "…"}')
    number = body.get("version")
    if not is_version(number):
        raise BadRequest('publish needs {"version": N} with N a version number')
    guard = None
    if "guard" in body:
        try:
            guard = Guard.parse(body["guard"], "guard").as_dict()
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    made = change(body)
    flow = engine().flows.publish(flow_ref, number, made, dry_run=body.get("dry_run", False),
                                  guard=guard)
    if flow is None:
        return jsonify({"dry_run": True, "ok": True, "version": number})
    return jsonify(written(flow, "publish", made))


@bp.post("/flows/<flow_ref>/rollback")
def rollback(flow_ref: str):
    body = _options(json_body(required=False), {"message"}, '{"message": "…"}')
    made = change(body)
    return jsonify(written(engine().flows.rollback(flow_ref, made), "rollback", made))


@bp.put("/flows/<flow_ref>/routing")
def set_routing(flow_ref: str):
    body = json_body()
    made = change(body)
    dry_run = body.get("dry_run", False) if isinstance(body, dict) else False
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run must be true or false")
    if isinstance(body, dict):  # the rest is the routing itself
        body = {k: v for k, v in body.items() if k not in ("message", "dry_run")}
    flow = engine().flows.set_routing(flow_ref, body, made, dry_run=dry_run)
    if flow is None:
        return jsonify({"dry_run": True, "ok": True})
    return jsonify(written(flow, "routing", made))


@bp.get("/flows/<flow_ref>/audit")
def flow_audit(flow_ref: str):
    """A flow's changes, newest first (``?limit``, ``?before=seq`` for the next page)."""
    limit = int_arg("limit", 100, 1, 1000)
    before = int_arg("before", None, 1, 2**62)
    flow, entries = engine().flows.audit(flow_ref, limit, before)
    if flow is None and not entries:
        raise NotFound(f"no flow with id or name '{flow_ref}', nor a history of one")
    return jsonify({"flow_id": flow.id if flow else flow_ref,
                    "entries": [e.as_dict() for e in entries]})


@bp.get("/flows/<flow_ref>/stats")
def flow_stats(flow_ref: str):
    """Runs, failure rate and p95 of the flow's live, canary and latest versions over the
    last ``?window_s`` (≤ 3600), from the per-version outcomes canary analysis reads;
    computed at most every few seconds per flow and window (flow_engine/rollouts/figures.py)."""
    window_s = int_arg("window_s", 3600, 5, 3600)
    flow = engine().store.get_flow(flow_ref)
    return jsonify(engine().figures.of(flow, window_s))


@bp.get("/audit")
def audit_all():
    """Every flow's changes after ``?since=seq``, oldest first (tail it with the last seq)."""
    since = int_arg("since", 0, 0, 2**62)
    limit = int_arg("limit", 1000, 1, 10_000)
    entries = engine().store.audit_since(since, limit)
    return jsonify({"entries": [e.as_dict() for e in entries],
                    "next_since": entries[-1].seq if entries else since})


@bp.get("/flows/<flow_ref>/diff")
def diff(flow_ref: str):
    """What changed between versions ``?from=A`` and ``?to=B``."""
    if "from" not in request.args or "to" not in request.args:
        raise BadRequest("diff needs ?from=A&to=B (version numbers)")
    a = int_arg("from", 1, 1, MAX_VERSION)
    b = int_arg("to", 1, 1, MAX_VERSION)
    return jsonify(engine().flows.diff(flow_ref, a, b))


@bp.post("/flows/validate")
def validate():
    """Validate a definition without storing it (what ``flowgate flows validate`` does)."""
    definition = engine().flows.validate(json_body(), flow_id="unsaved")
    return jsonify({"valid": True, "nodes": len(definition.nodes), "edges": len(definition.edges)})
