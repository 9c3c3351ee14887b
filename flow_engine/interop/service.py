"""Importing and exporting flows, between the API and the flow service: the request's
rules, who may publish, which flow an import becomes a version of.

Import: the export is translated (``langflow/translate.py``; nothing in it is executed),
validated like any definition — problems are reported at the export's own paths — and
stored: a new flow (version 1, live at once, as ``POST /flows``), or with ``id`` naming an
existing flow a new version of it (not live unless ``publish``, as ``PUT /flows/{id}``; the
flow keeps its name). ``publish: true`` needs the publisher role, checked before anything
is stored. An ``id`` that names no flow creates a flow with that id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flow_engine.auth import Principal
from flow_engine.errors import BadRequest, FlowInvalid, FlowNotFound, Forbidden
from flow_engine.interop.langflow import LangFlowImportError, translate
from flow_engine.interop.langflow.export import to_langflow
from flow_engine.service import FlowService
from flow_engine.store.base import Change

log = logging.getLogger(__name__)
FORMATS = ("langflow",)
_KEYS = {"format", "flow", "id", "publish", "message"}
MAX_MESSAGE = 500


@dataclass(frozen=True)
class ImportRequest:
    format: str
    flow: Any
    flow_id: str | None
    publish: bool
    message: str | None

    @classmethod
    def from_body(cls, body: Any) -> ImportRequest:
        if not isinstance(body, dict):
            raise BadRequest('the body must be a JSON object: {"format": "langflow", "flow": '
                             '<the LangFlow export>, "id"?, "publish"?, "message"?}')
        unknown = sorted(set(body) - _KEYS)
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(unknown)}; the fields are "
                             f"{', '.join(sorted(_KEYS))}")
        fmt = body.get("format")
        if fmt not in FORMATS:
            raise BadRequest(f"format must be one of: {', '.join(FORMATS)}")
        if not isinstance(body.get("flow"), dict):
            raise BadRequest("flow must be the export: a JSON object")
        flow_id = body.get("id")
        if flow_id is not None and (not isinstance(flow_id, str) or not flow_id):
            raise BadRequest("id must be a flow's id or name")
        publish = body.get("publish", False)
        if not isinstance(publish, bool):
            raise BadRequest("publish must be true or false")
        message = body.get("message")
        if message is not None and (not isinstance(message, str) or len(message) > MAX_MESSAGE
                                    or not message.isprintable()):
            raise BadRequest(f"message must be printable text of at most {MAX_MESSAGE} characters")
        return cls(fmt, body["flow"], flow_id, publish, message)


def import_flow(flows: FlowService, request: ImportRequest, caller: Principal,
                trace_id: str | None = None) -> dict[str, Any]:
    """Translate, validate, store (and publish); the flow, its version and the report."""
    from flow_engine.api.flows import flow_json  # the flows API's own shape of a flow

    if request.publish and not caller.may("publisher"):
        raise Forbidden(f"publish: true needs the publisher role; key '{caller.key}' has the "
                        f"{caller.role} role (import without it, then publish)", role="publisher")
    translation = translate(request.flow, flows.registry)
    definition = translation.definition
    existing = None
    if request.flow_id is not None:
        try:
            existing = flows.store.get_flow(request.flow_id)
        except FlowNotFound:
            definition = {"id": request.flow_id, **definition}
    if existing is not None:
        definition = {k: v for k, v in definition.items() if k != "name"}  # keeps its name
    try:
        flows.validate({**definition, "name": definition.get("name", "x")},
                       flow_id=existing.id if existing else "imported-flow")
    except FlowInvalid as exc:
        raise LangFlowImportError(translation.locate(exc.problems), []) from None
    made = Change(actor=caller.actor, message=request.message, trace_id=trace_id)
    if existing is not None:
        record = flows.new_version(existing.id, definition, made)
        number = record.version
        flow = flows.publish(existing.id, number, made) if request.publish else (
            flows.store.get_flow(existing.id))
    else:
        flow = flows.create(definition, made)
        number = 1
    stored = flows.store.get_version(flow.id, number).definition
    log.info("flow imported", extra={"flow_id": flow.id, "version": number, "format": request.format,
                                     "actor": caller.actor, "import_message": request.message,
                                     "warnings": len(translation.report["warnings"])})
    body: dict[str, Any] = {"flow": flow_json(flow, stored), "version": number,
                            "live": flow.live_version == number, "report": translation.report}
    if request.message is not None:
        body["message"] = request.message
    return body


def export_flow(flows: FlowService, flow_ref: str, fmt: str | None,
                version: int | None) -> tuple[str, dict[str, Any]]:
    """``(flow id, the export)`` of a version (default: the live one, else the latest)."""
    if (fmt or "langflow") not in FORMATS:
        raise BadRequest(f"format must be one of: {', '.join(FORMATS)}")
    flow = flows.store.get_flow(flow_ref)
    number = version or flow.live_version or flow.latest_version
    record = flows.store.get_version(flow.id, number)
    definition = flows.validate(record.definition, flow_id=flow.id)
    return flow.id, to_langflow(definition, flow_id=flow.id, version=number)
