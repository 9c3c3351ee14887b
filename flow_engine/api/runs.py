"""Runs: ``POST /run/{flow}`` (JSON or SSE), run records, cancellation.

SSE protocol (``?stream=true`` or ``Accept: text/event-stream``): each run event is
``id: <seq>`` / ``event: <type>`` / ``data: <json>``; the stream ends after ``run_finished``
or ``error``. A ``: keep-alive`` comment goes out whenever the run is quiet for
``sse_keepalive_s`` (15 s). Headers turn off proxy buffering so every token is flushed.
"""

from __future__ import annotations

import re

from flask import Blueprint, Response, after_this_request, g, jsonify, request, stream_with_context

from flow_engine.api.common import KEEPALIVE, engine, json_body, sse
from flow_engine.errors import BadRequest
from flow_engine.runs.service import RunRequest

bp = Blueprint("runs", __name__)
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def wants_stream() -> bool:
    flag = request.args.get("stream", "").lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    return request.accept_mimetypes.best == "text/event-stream"


@bp.post("/run/<flow_ref>")
def run_flow(flow_ref: str):
    body = json_body(required=False)
    run_request = RunRequest.from_body(body)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _KEY.match(key):
        raise BadRequest("Idempotency-Key must be 1-200 printable ASCII characters")
    trace = getattr(g, "trace", None)
    runs = engine().runs
    prepared = runs.prepare(flow_ref, run_request, idempotency_key=key,
                            trace_id=trace.trace_id if trace else None)
    g.flow_id, g.run_id = prepared.compiled.flow_id, prepared.run_id
    replay_header = {"Idempotent-Replayed": "true"} if prepared.replay else {}
    if wants_stream():
        keepalive = engine().settings.sse_keepalive_s

        def events():
            for event in runs.stream(prepared, keepalive):
                yield KEEPALIVE if event is None else sse(event.seq, event.type, event.data)

        headers = {**SSE_HEADERS, **replay_header,
                   "X-Run-ID": prepared.replay.run_id if prepared.replay else prepared.run_id}
        return Response(stream_with_context(events()), mimetype="text/event-stream",
                        headers=headers)
    deferred: list = []
    prepared.defer = deferred.append  # record the run after the answer has gone out
    try:
        result, _replayed = runs.run(prepared)
    finally:
        @after_this_request
        def _write_record_after_response(response):
            for write in deferred:
                response.call_on_close(write)
            return response
    return jsonify(result), 200, {**replay_header, "X-Run-ID": result["run_id"]}


@bp.get("/runs/<run_id>")
def get_run(run_id: str):
    return jsonify(engine().runs.get(run_id))


@bp.post("/runs/<run_id>/cancel")
def cancel_run(run_id: str):
    return jsonify(engine().runs.cancel(run_id)), 202
