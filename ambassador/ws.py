"""``WS /ws/run-flow``: the engine's WebSocket (``/api/v1/ws/runs``) bridged for the app.

The app speaks the engine's run protocol (see flow_engine/api/ws.py) to localhost. Before
the upgrade the ambassador checks the page's ``Origin`` (:mod:`ambassador.origin`; 403),
the headers (400) and the caller, with the same trace, auth and rate-limit filters as
HTTP. It then opens the upstream WebSocket with the engine's service key, the trace
headers and the caller's identity and tenant, and relays messages both ways — each app
message first passing :class:`ambassador.ws_guard.Guard` (flow allowlist, rate limits,
the credential still valid), and a ``run`` message may say ``input`` (as ``POST
/run-flow`` does) for ``input_value``. A message over ``max_body_bytes`` closes the
connection with 1009. If the engine cannot be reached the app gets ``{"type": "error",
"code": "upstream_unavailable"}`` and the connection closes with 1011.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, g, request
from flask import Response as FlaskResponse
from flask_sock import Sock
from simple_websocket import Client, ConnectionClosed
from simple_websocket import ConnectionError as HandshakeFailed

from ambassador import hygiene, origin
from ambassador.answer import forwarded
from ambassador.chain import Request, Response, build_chain, error_response
from ambassador.ws_guard import ROUTE, UPSTREAM_PATH, Close, Guard
from flowgate.websockets import WholeFrames

if TYPE_CHECKING:
    from ambassador.app import Ambassador

log = logging.getLogger(__name__)
_MAX_REASON = 120  # a close frame's reason: at most 123 bytes
_CLOSE_WAIT_S = 2.0


def admit(filters: list, request: Request) -> Response:
    """Run the handshake through the caller-facing filters; 200 means admitted."""
    return build_chain(filters, lambda r: Response(200))(request)


def mount(app: Flask, amb: Ambassador) -> None:
    """The admission check (before the upgrade: a refusal is an ordinary HTTP error) and
    the route."""
    sock = Sock(app)
    m = amb.metrics

    @app.before_request
    def _admit_websocket():
        if request.path != ROUTE:
            return None
        amb.holder.maybe_reload()
        settings = amb.settings
        # read by flask-sock for each connection: the size limit in force now
        app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.max_body_bytes}
        req = Request("GET", UPSTREAM_PATH, forwarded(request.environ), ROUTE)
        req.ctx["trace"] = g.trace
        refused = origin.refusal(request.environ, settings.websocket.allowed_origins)
        problem = hygiene.header_problem(req.headers)
        if refused:
            answer = error_response(403, "forbidden", refused, req)
        elif problem:
            answer = error_response(400, "bad_request", problem, req)
        elif request.headers.get("Upgrade", "").lower() != "websocket":
            answer = error_response(400, "bad_request", "this route is a WebSocket: send "
                                    "'Upgrade: websocket'", req)
        else:
            answer = admit(amb.handshake_filters, req)
        if answer.status != 200:
            m.requests.labels(ROUTE, "", str(answer.status), "none").inc()
            return FlaskResponse(answer.body, status=answer.status, headers=answer.headers)
        g.ws_guard = Guard(amb, req.headers, req.ctx.get("identity"), g.trace)
        return None

    @sock.route(ROUTE)
    def ws_run_flow(ws):
        guard: Guard = g.ws_guard
        url = "ws" + amb.settings.upstream.url[len("http"):] + UPSTREAM_PATH
        headers = {"traceparent": g.trace.child().traceparent, "x-request-id": g.trace.request_id}
        key = amb.settings.upstream_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if guard.identity is not None:
            headers["x-flowgate-identity"] = guard.identity.name
            if guard.identity.tenant:
                headers["x-flowgate-tenant"] = guard.identity.tenant
        m.requests.labels(ROUTE, "", "101", "none").inc()
        bridge(ws, url, headers, guard.check, guard.tick, trace_id=g.trace.trace_id)


def bridge(ws: Any, upstream_url: str, headers: dict[str, str],
           check: Callable[[str | bytes], str | bytes | dict[str, Any] | Close],
           tick: Callable[[], Close | None], trace_id: str | None,
           connect: Callable[..., Any] = Client.connect) -> None:
    """Relay between the app's socket ``ws`` and a new upstream socket until either closes.
    ``check`` decides about each app message, ``tick`` runs when a second passed without
    one; either may close the connection."""
    ws.sock = WholeFrames(ws.sock)  # see flowgate/websockets.py
    try:
        upstream = connect(upstream_url, headers=headers)
        upstream.sock = WholeFrames(upstream.sock)
    except (OSError, ConnectionClosed, HandshakeFailed) as exc:
        _send(ws, {"type": "error", "code": "upstream_unavailable", "trace_id": trace_id,
                   "message": f"the flow engine's WebSocket is unreachable ({type(exc).__name__})"})
        ws.close(1011, "upstream unavailable")
        return
    done = threading.Event()
    closed_by_engine: list[tuple[int | None, str | None]] = []

    def engine_to_app() -> None:
        try:
            while not done.is_set():
                message = upstream.receive(timeout=1)
                if message is not None:
                    ws.send(message)
        except ConnectionClosed as exc:  # the engine's close code and reason go to the app
            closed_by_engine.append((exc.reason, exc.message))
        finally:
            done.set()

    pump = threading.Thread(target=engine_to_app, daemon=True, name="ws-bridge")
    pump.start()
    try:
        while not done.is_set():
            message = ws.receive(timeout=1)
            verdict = tick() if message is None else check(message)
            if verdict is None:
                continue
            if isinstance(verdict, Close):
                closed_by_engine.clear()  # ours is the reason the app gets
                _close(ws, verdict.code, verdict.reason)
                break
            if isinstance(verdict, dict):
                _send(ws, verdict)  # refused here; nothing went upstream
            else:
                upstream.send(verdict)
    except ConnectionClosed:
        pass
    finally:
        done.set()
        with contextlib.suppress(Exception):  # already closed
            upstream.close()
        pump.join(timeout=2)
        if closed_by_engine:
            code, reason = closed_by_engine[0]
            with contextlib.suppress(Exception):
                ws.close(reason=code or 1000, message=reason)


def _close(ws: Any, code: int, reason: str) -> None:
    """Close with ``code`` and wait (briefly) for the app's answer, so the closing
    handshake completes before the connection is dropped."""
    reason = reason.encode()[:_MAX_REASON].decode(errors="ignore")
    with contextlib.suppress(ConnectionClosed):
        ws.close(code, reason)
    reader = getattr(ws, "thread", None)  # simple-websocket's reader ends on the answer
    if reader is not None:
        reader.join(_CLOSE_WAIT_S)


def _send(ws: Any, payload: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionClosed):
        ws.send(json.dumps(payload))
