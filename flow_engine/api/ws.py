"""``WS /api/v1/ws/runs``: run flows and follow runs over one WebSocket connection.

Use it where Server-Sent Events do not fit: a browser or app that runs many flows on one
long-lived connection, or that must cancel a run without a second HTTP call. One-shot
callers are better served by ``POST /run/{flow}?stream=true``.

Protocol
--------

Handshake. The API key travels as on every ``/api/v1`` path (``Authorization: Bearer <key>``
or ``x-api-key: <key>``). Browsers cannot set headers on a WebSocket: they first get a
one-time ``?ticket=`` from ``POST /api/v1/ws/ticket`` (flow_engine/ws_tickets.py), so the
key never appears in a URL; ``?token=<key>`` remains for other clients that cannot send
headers. It is checked before the upgrade: a missing or bad key gets the ordinary 401
JSON error response and no WebSocket. A browser's ``Origin`` must be this engine's own
origin or one of ``FLOW_ENGINE_WS_ALLOWED_ORIGINS`` (403 otherwise), so a page on another
site cannot drive the socket with a key the browser holds; clients that send no ``Origin``
(not browsers) are not affected. Everything the connection does runs as the caller that
opened it: its runs belong to its tenant, and it can watch and cancel only those.

Client → server: JSON text messages, one object each, told apart by ``type``.

- ``{"type": "run", "flow_id": "faq", "input_value": "…", "session_id"?, "tweaks"?,
  "version"?, "input_type"?, "output_type"?, "idempotency_key"?, "on_disconnect"?}`` runs
  the flow exactly like ``POST /run/{flow_id}?stream=true`` with that body;
  ``idempotency_key`` is the ``Idempotency-Key`` header (a replayed key streams the first
  run's events). ``on_disconnect``: ``"cancel"`` (default) or ``"continue"``, as for SSE.
- ``{"type": "watch", "run_id": "…", "last_event_id"?: n}`` follows an existing run like
  ``GET /runs/{id}/events``: its events after ``n`` (default 0), then live to its end.
- ``{"type": "cancel", "run_id"?: "…"}`` cancels the run this connection is following (the
  one it started, or the watched one, like ``POST /runs/{id}/cancel``); that run then ends
  with an ``error`` event whose code is ``run_cancelled`` (or ``run_finished``, if it won
  the race). A ``run_id``, when given, must be that run's (``conflict`` otherwise).

Server → client: JSON text messages.

- Run events ``{"type": <event type>, "seq": n, …event data}``: ``run_started``,
  ``node_started``, ``token``, ``node_finished``, ``error``, ``run_finished``, with the
  data of ``flow_engine/runs/runner.py``. ``seq`` is SSE's ``id`` (use it as
  ``last_event_id``); it is ``null`` for the outcome of a run whose events have expired,
  and for the ``error`` that ends a watch whose events were lost (``events_lost``) or whose
  shared event log stopped answering (``event_log_unavailable``), as for SSE.
  Node events carry the node type as ``node_type`` (``type`` names the message). A run's
  last event is ``run_finished`` or ``error``; from then on the connection takes the next
  ``run`` or ``watch``.
- Refusals ``{"type": "error", "code", "message", "trace_id", …details}`` carry no
  ``seq``: a message was refused (``bad_request``: not JSON, unknown type, invalid run
  body; ``flow_not_found``; ``run_not_found``; ``flow_invalid`` with ``problems`` for bad
  tweaks; ``conflict``: nothing to cancel, a reused idempotency key, …) and nothing else
  changed. ``busy``: a ``run`` or ``watch`` arrived while one is in progress; that one goes
  on. A watch that cannot start or go on (unknown run, events kept by another process, the
  shared event log down) ends with such an error as well. Codes are those of the HTTP
  error contract (DESIGN.md "Errors").

One run or watch at a time per connection; open more connections for parallel runs.

Connection lifetime
-------------------

- Heartbeat: the server pings every ``ws_ping_interval_s`` (25 s; 0 = off); a client that
  has not answered the previous ping with a pong is closed (1008, simple-websocket).
  Browsers and websocket libraries answer pings by themselves.
- Idle: with no run in progress and no message from the client for ``ws_idle_timeout_s``
  (300 s; 0 = never), the server closes with 1000 and a reason.
- Capacity: past ``ws_max_connections`` open connections in this process (500), a new
  connection is accepted and closed at once with 1013 (Try Again Later) and a reason,
  counted in ``flowgate_engine_ws_rejected_total{reason="capacity"}``.
- A message over ``max_body_bytes`` closes the connection with 1009 (simple-websocket).
- A client that goes away mid-run cancels it unless its ``run`` message said
  ``"on_disconnect": "continue"``; a watched run is never cancelled by its watcher leaving.

Metrics (``transport="ws"``): ``active_streams`` counts open connections, ``events_sent``
run events sent, ``stream_disconnects`` clients gone before the last event of the run they
followed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, current_app, g, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from flow_engine import jsontext
from flow_engine.api.common import engine, parse_json, principal
from flow_engine.auth import ANONYMOUS, Principal
from flow_engine.config import Settings
from flow_engine.egress import origin as egress_origin
from flow_engine.errors import BadRequest, Conflict, FlowgateError, Forbidden
from flow_engine.metrics import EngineMetrics
from flow_engine.runs.events import TERMINAL
from flow_engine.runs.request import RunRequest, on_disconnect
from flow_engine.runs.runner import RunEvent
from flow_engine.runs.service import RunService
from flow_engine.ws_tickets import TTL_S
from flowgate.common.websockets import WholeFrames

log = logging.getLogger(__name__)
bp = Blueprint("ws", __name__)
_sock = Sock()
_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # the Idempotency-Key header's rule (fullmatch)
_LIMIT_EXTENSION = "flowgate.ws_connections"
CLOSE_NORMAL, CLOSE_TRY_AGAIN_LATER = 1000, 1013
CLOSE_WAIT_S = 2.0


class Busy(FlowgateError):
    status, code = 409, "busy"


class ConnectionLimit:
    """Open WebSocket connections of this process, at most ``limit`` at a time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self._open >= self.limit:
                return False
            self._open += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._open -= 1


@dataclass
class _Following:
    """The run (or watch) whose events this connection is forwarding."""

    run_id: str
    events: Iterator[RunEvent | None]
    cancel: Callable[[str], object]  # called with the reason
    cancel_on_disconnect: bool


class RunSocket:
    """One connection speaking the protocol above: ``serve()`` reads client messages until
    the connection closes; a thread forwards the events of the current run meanwhile.

    ``ws`` needs ``send(text)``, ``receive(timeout) -> str | bytes | None`` (None: timed
    out; raises ``ConnectionClosed`` once closed) and ``close(code, reason)``, as
    ``simple_websocket.Server`` has."""

    def __init__(self, ws: Any, runs: RunService, settings: Settings, metrics: EngineMetrics,
                 *, trace_id: str | None = None, caller: Principal = ANONYMOUS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ws = ws
        self.runs = runs
        self.caller = caller
        self.settings = settings
        self.metrics = metrics
        self.trace_id = trace_id
        self._clock = clock
        self._lock = threading.Lock()  # guards _following and _quiet_since
        # wsproto (its permessage-deflate context) and the wire must see messages in one order
        self._send_lock = threading.Lock()
        self._following: _Following | None = None
        self._quiet_since = clock()  # last client message or end of the last run
        self._gone = False

    # -- the connection -------------------------------------------------------------------

    def serve(self) -> None:
        """Handle messages until the client leaves or the connection is idle too long."""
        self.metrics.active_streams.labels("ws").inc()
        try:
            while True:
                wait = self._idle_wait()
                if wait is not None and wait <= 0:
                    idle = self.settings.ws_idle_timeout_s
                    close(self.ws, CLOSE_NORMAL, f"idle for {idle:g} s without a run or a message")
                    return
                try:
                    raw = self.ws.receive(timeout=wait)
                except ConnectionClosed:
                    self._client_gone()
                    return
                if raw is None:
                    continue  # timed out: idleness is checked again at the top
                with self._lock:
                    self._quiet_since = self._clock()
                self._handle(raw)
        finally:
            self._gone = True
            self.metrics.active_streams.labels("ws").dec()

    def _idle_wait(self) -> float | None:
        """Seconds to wait for a message before closing as idle; None: no idle timeout."""
        idle = self.settings.ws_idle_timeout_s
        if not idle:
            return None
        with self._lock:
            if self._following is not None:
                return idle  # a run is never idle; look again later
            return self._quiet_since + idle - self._clock()

    def _client_gone(self) -> None:
        self._gone = True
        with self._lock:
            following = self._following
        if following is None:
            return
        self.metrics.stream_disconnects.labels("ws").inc()
        if following.cancel_on_disconnect:
            following.cancel("the WebSocket client went away")

    # -- client messages ------------------------------------------------------------------

    def _handle(self, raw: str | bytes) -> None:
        try:
            if isinstance(raw, bytes):
                raise BadRequest('send JSON text messages, not binary ones: {"type": "run", …}')
            message = parse_json(raw)
            if not isinstance(message, dict):
                raise BadRequest('a message is a JSON object like {"type": "run", "flow_id": "f", '
                                 '"input_value": "hi"}')
            handler = {"run": self._run, "watch": self._watch, "cancel": self._cancel}.get(
                message.get("type"))
            if handler is None:
                raise BadRequest(f"unknown message type {message.get('type')!r}; "
                                 "expected 'run', 'watch' or 'cancel'")
            handler(message)
        except FlowgateError as exc:
            self._refuse(exc)
        except Exception:
            log.exception("WebSocket message failed (trace %s)", self.trace_id)
            self._refuse(FlowgateError("internal error; the trace id identifies it in the logs"))

    def _run(self, message: dict[str, Any]) -> None:
        self._check_free()
        flow_id = message.get("flow_id")
        if not isinstance(flow_id, str) or not flow_id:
            raise BadRequest('a run message needs "flow_id": the id or name of the flow')
        request = RunRequest.from_body(message)
        when_gone = on_disconnect(message.get("on_disconnect", "cancel"))
        key = message.get("idempotency_key")
        if key is not None and not (isinstance(key, str) and _KEY.fullmatch(key)):
            raise BadRequest("idempotency_key must be 1-200 printable ASCII characters")
        prepared = self.runs.prepare(flow_id, request, caller=self.caller, idempotency_key=key,
                                     trace_id=self.trace_id)
        keep_going = when_gone == "continue"
        events = self.runs.stream(prepared, self.settings.sse_keepalive_s,
                                  cancel_on_disconnect=not keep_going)
        if prepared.replay is not None:  # the first run belongs to whoever started it
            run_id = prepared.replay.run_id
            self._follow(_Following(run_id, events,
                                    lambda _: self.runs.cancel(run_id, self.caller), False))
            return
        self._follow(_Following(prepared.run_id, events, prepared.cancel.cancel, not keep_going))

    def _watch(self, message: dict[str, Any]) -> None:
        self._check_free()
        run_id = message.get("run_id")
        if not isinstance(run_id, str) or not 0 < len(run_id) <= 200:
            raise BadRequest('a watch message needs "run_id": the id of the run to follow')
        after = message.get("last_event_id", 0)
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise BadRequest("last_event_id must be the integer seq of the last event received")
        events = self.runs.watch(run_id, after, self.settings.sse_keepalive_s, self.caller)
        self._follow(_Following(run_id, events,
                                lambda _: self.runs.cancel(run_id, self.caller), False))

    def _cancel(self, message: dict[str, Any]) -> None:
        with self._lock:
            following = self._following
        if following is None:
            raise Conflict("no run in progress on this connection to cancel")
        run_id = message.get("run_id")
        if run_id is not None and run_id != following.run_id:
            raise Conflict("a cancel's run_id must be the run this connection follows; "
                           "cancel other runs with POST /runs/{id}/cancel",
                           run_id=following.run_id)
        following.cancel("cancelled by the WebSocket client")

    def _check_free(self) -> None:
        with self._lock:
            following = self._following
        if following is not None:
            raise Busy("a run is in progress on this connection; wait for its run_finished or "
                       "error event, cancel it, or open another connection",
                       run_id=following.run_id)

    # -- forwarding run events --------------------------------------------------------------

    def _follow(self, following: _Following) -> None:
        with self._lock:
            self._following = following
        threading.Thread(target=self._forward, args=(following,), name="flowgate-ws-run",
                         daemon=True).start()

    def _forward(self, following: _Following) -> None:
        """Send the run's events until its last one; a client that left stops it."""
        sent = self.metrics.events_sent.labels("ws")
        try:
            for event in following.events:
                if self._gone:
                    break
                if event is None:
                    continue  # quiet: pings keep the connection alive
                if event.type in TERMINAL:
                    self._release(following)  # the client may start the next run on seeing it
                self._send(event_message(event))
                sent.inc()
        except ConnectionClosed:
            pass
        except FlowgateError as exc:  # a watch of an unknown run, …: nothing was sent yet
            self._refuse(exc)
        except Exception:
            log.exception("forwarding the events of run %s failed", following.run_id)
            self._refuse(FlowgateError("internal error; the trace id identifies it in the logs"))
        finally:
            self._release(following)
            close = getattr(following.events, "close", None)
            if close is not None:
                close()  # a run left behind is cancelled or goes on, as the client asked

    def _release(self, following: _Following) -> None:
        with self._lock:
            if self._following is following:
                self._following = None
                self._quiet_since = self._clock()

    # -- server messages ----------------------------------------------------------------------

    def _refuse(self, exc: FlowgateError) -> None:
        body = {"type": "error", **exc.to_dict(), "trace_id": self.trace_id}
        with contextlib.suppress(ConnectionClosed):
            self._send(body)

    def _send(self, body: dict[str, Any]) -> None:
        text = jsontext.dumps(body)  # valid UTF-8 even with a lone surrogate in it
        with self._send_lock:
            try:
                self.ws.send(text)
            except OSError as exc:  # the peer vanished before the reader thread noticed
                raise ConnectionClosed() from exc


def close(ws: Any, code: int, reason: str) -> None:
    """Close with ``code`` and wait (briefly) for the client's answer, so the closing
    handshake completes before the server drops the TCP connection."""
    with contextlib.suppress(ConnectionClosed):
        ws.close(code, reason)
    reader = getattr(ws, "thread", None)  # simple-websocket's reader ends on the answer
    if reader is not None:
        reader.join(CLOSE_WAIT_S)


def event_message(event: RunEvent) -> dict[str, Any]:
    """A run event as a WebSocket message."""
    data = dict(event.data)
    return {"type": event.type, "seq": event.seq or None, **data}


@bp.record_once
def _configure(state) -> None:
    """Heartbeat and message limit for flask-sock; this process's connection limit."""
    settings: Settings = state.app.extensions["flowgate"].settings
    state.app.config["SOCK_SERVER_OPTIONS"] = {
        "ping_interval": settings.ws_ping_interval_s or None,
        "max_message_size": settings.max_body_bytes,
    }
    state.app.extensions[_LIMIT_EXTENSION] = ConnectionLimit(settings.ws_max_connections)


@bp.before_request
def check_origin() -> None:
    """Before the upgrade: a browser page from another origin may not open the socket."""
    origin = request.headers.get("Origin")
    if origin is None or request.endpoint != "ws.run_socket":
        return
    allowed = engine().settings.ws_allowed_origins
    if "*" in allowed or origin in allowed or same_origin(origin, request.host_url):
        return
    engine().metrics.ws_rejected.labels("origin").inc()
    raise Forbidden(f"WebSocket connections from origin {origin[:200]!r} are not allowed; "
                    "the engine's operator can list it in FLOW_ENGINE_WS_ALLOWED_ORIGINS")


def same_origin(origin: str, host_url: str) -> bool:
    """Is a browser's ``Origin`` header this server's origin (scheme, host and port)?"""
    try:
        return egress_origin(origin) == egress_origin(host_url)
    except ValueError:
        return False


@_sock.route("/ws/runs", bp=bp)
def run_socket(ws) -> None:
    """The handshake (and its auth check) is done; serve the protocol until it closes."""
    ws.sock = WholeFrames(ws.sock)
    eng = engine()
    limit: ConnectionLimit = current_app.extensions[_LIMIT_EXTENSION]
    if not limit.acquire():
        eng.metrics.ws_rejected.labels("capacity").inc()
        close(ws, CLOSE_TRY_AGAIN_LATER,
              f"engine at its limit of {limit.limit} WebSocket connections; try again later")
        return
    try:
        trace = g.get("trace")
        RunSocket(ws, eng.runs, eng.settings, eng.metrics,
                  trace_id=trace.trace_id if trace else None, caller=principal()).serve()
    finally:
        limit.release()


@bp.post("/ws/ticket")
def ws_ticket():
    """A one-time ticket for ``WS /ws/runs?ticket=T`` (flow_engine/ws_tickets.py): the
    browser's key stays in a header, never in a URL."""
    ticket = engine().tickets.issue(principal())  # 429 past a tenant's share, 503 without Redis
    return {"ticket": ticket, "expires_in": TTL_S}, 201, {"Cache-Control": "no-store"}
