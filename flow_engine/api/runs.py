"""Runs: ``POST /run/{flow}`` (JSON or SSE), run records, event streams, cancellation.

SSE protocol (``POST /run/{flow}?stream=true`` or ``Accept: text/event-stream``, and
``GET /runs/{id}/events``): each run event is ``id: <seq>`` / ``event: <type>`` /
``data: <json>`` and a blank line; the stream ends after ``run_finished`` or ``error``.
``GET /runs/{id}/events`` replays the events after ``Last-Event-ID`` (header, or the
``last_event_id`` query parameter) and then follows the run live, so a client that
reconnects with its last id misses nothing and sees nothing twice. A ``: keep-alive``
comment goes out whenever the run is quiet for ``sse_keepalive_s`` (15 s). The headers
turn off proxy buffering, so every token is flushed as it is generated. A stream never
skips an id: where events of the run were lost (the shared event log failed while it ran)
it ends with an ``error`` event ``events_lost`` naming them, and where the shared log stops
answering, with ``event_log_unavailable`` (reconnect with ``Last-Event-ID``); neither has
an ``id:``. Text holding a lone surrogate is sent escaped (``\\ud800``): always UTF-8.

A streamed run whose client goes away is cancelled, unless the request said
``on_disconnect=continue`` (query parameter or body field): then it runs to the end and
can be watched or resumed with ``GET /runs/{id}/events``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from datetime import UTC, datetime

from flask import Blueprint, Response, g, jsonify, request, stream_with_context

from flow_engine.api.common import KEEPALIVE, engine, int_arg, json_body, principal, sse
from flow_engine.errors import BadRequest
from flow_engine.runs.events import TERMINAL
from flow_engine.runs.request import RunRequest, on_disconnect
from flow_engine.runs.runner import RunEvent
from flow_engine.runs.watch import run_record_json

bp = Blueprint("runs", __name__)
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII; always fullmatch
EVENT_ID = re.compile(r"[0-9]{1,18}")
FLOW_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def wants_stream() -> bool:
    flag = request.args.get("stream", "").lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    return request.accept_mimetypes.best == "text/event-stream"


def _on_disconnect(body) -> str:
    if "on_disconnect" in request.args:
        value = request.args["on_disconnect"]
    elif isinstance(body, dict) and "on_disconnect" in body:
        value = body["on_disconnect"]
    else:
        return "cancel"
    return on_disconnect(value)


def sse_response(events: Iterator[RunEvent | None], headers: dict[str, str]) -> Response:
    """Frame ``events`` as SSE. The first event is pulled before the response starts, so a
    failure to start (unknown run, …) is still an ordinary JSON error response."""
    metrics = engine().metrics
    first = next(events, None)

    def frames():
        metrics.active_streams.labels("sse").inc()
        sent, finished = metrics.events_sent.labels("sse"), False
        try:
            for event in itertools.chain([first], events):
                if event is None:
                    yield KEEPALIVE
                    continue
                sent.inc()
                yield sse(event.seq or None, event.type, event.data)
                finished = event.type in TERMINAL
        finally:
            metrics.active_streams.labels("sse").dec()
            if not finished:
                metrics.stream_disconnects.labels("sse").inc()

    return Response(stream_with_context(frames()), mimetype="text/event-stream",
                    headers={**SSE_HEADERS, **headers})


@bp.post("/run/<flow_ref>")
def run_flow(flow_ref: str):
    body = json_body(required=False)
    run_request = RunRequest.from_body(body)
    when_gone = _on_disconnect(body)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest("Idempotency-Key must be 1-200 printable ASCII characters")
    trace = getattr(g, "trace", None)
    runs = engine().runs
    prepared = runs.prepare(flow_ref, run_request, caller=principal(), idempotency_key=key,
                            trace_id=trace.trace_id if trace else None)
    run_id = prepared.replay.run_id if prepared.replay else prepared.run_id
    g.flow_id, g.run_id = prepared.compiled.flow_id, run_id
    # the version that answers: a cache in front (the ambassador's) keys answers by it
    version = prepared.replay.version if prepared.replay else prepared.compiled.version
    g.flow_version = version  # failed answers say it too (app.py's error handler)
    g.claim_s = prepared.claim_s  # Server-Timing (app.py)
    headers = {"X-Run-ID": run_id, "X-Flow-Version": str(version)}
    if prepared.replay:
        headers["Idempotent-Replayed"] = "true"
    if wants_stream():
        events = runs.stream(prepared, engine().settings.sse_keepalive_s,
                             cancel_on_disconnect=when_gone == "cancel")
        return sse_response(events, headers)
    result, replayed = runs.run(prepared)  # its record is written in the background
    # the run that answered: a duplicate may have taken over an abandoned run meanwhile
    headers["X-Run-ID"] = g.run_id = result.get("run_id", run_id)
    if not replayed:
        headers.pop("Idempotent-Replayed", None)
    return jsonify(result), 200, headers


@bp.get("/runs")
def list_runs():
    """Recorded runs the caller may see (its tenant's; an operator's admin key: all),
    newest first: ``?flow=ID``, ``?limit`` (≤ 200), ``?before=<created_at>`` for the next
    page. A run is recorded when it ends (a keyed run when it starts)."""
    flow_id = request.args.get("flow") or None
    if flow_id is not None and not FLOW_ID.fullmatch(flow_id):
        raise BadRequest("flow must be a flow id (1-64 letters, digits, '_', '.', '-')")
    before = None
    if "before" in request.args:
        try:
            before = datetime.fromisoformat(request.args["before"][:40])
            before = before.astimezone(UTC) if before.tzinfo else before.replace(tzinfo=UTC)
        except (ValueError, OverflowError):
            raise BadRequest("before must be an ISO 8601 time (a run's created_at)") from None
    caller = principal()
    records = engine().store.list_runs(
        tenant=None if caller.sees_every_tenant else caller.tenant, flow_id=flow_id,
        limit=int_arg("limit", 50, 1, 200), before=before)
    runs = [{**{k: v for k, v in run_record_json(r).items() if k != "result"},
             "tenant": r.tenant} for r in records]
    return jsonify({"runs": runs, "next_before": runs[-1]["created_at"] if runs else None})


@bp.get("/runs/<run_id>")
def get_run(run_id: str):
    return jsonify(engine().runs.get(run_id, principal()))


@bp.get("/runs/<run_id>/events")
def run_events(run_id: str):
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    if not EVENT_ID.fullmatch(raw):
        raise BadRequest("Last-Event-ID must be the id of the last event received "
                         "(ASCII digits)")
    events = engine().runs.watch(run_id, int(raw), engine().settings.sse_keepalive_s,
                                 principal())  # an id the engine could not have made: 404 here
    g.run_id = run_id
    return sse_response(events, {"X-Run-ID": run_id})


@bp.post("/runs/<run_id>/cancel")
def cancel_run(run_id: str):
    return jsonify(engine().runs.cancel(run_id, principal())), 202
