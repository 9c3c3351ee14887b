"""``WS /ws/run-flow``: the engine's WebSocket (``/api/v1/ws/runs``) bridged for the app.

The app speaks the engine's run protocol (see flow_engine/api/ws.py) to localhost; the
ambassador checks the caller at the handshake with the same trace, auth and rate-limit
filters as HTTP, opens the upstream WebSocket with the engine's service key and the trace
headers, and relays messages both ways unchanged — except that a ``run`` message may say
``input`` (as ``POST /run-flow`` does) for ``input_value``, and a ``run`` or ``watch`` of a
flow the caller may not run is refused with a ``forbidden`` error message. If the engine
cannot be reached the app gets ``{"type": "error", "code": "upstream_unavailable"}`` and the
connection closes with 1011.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from simple_websocket import Client, ConnectionClosed

from ambassador.chain import Request, Response, build_chain
from flowgate.websockets import WholeFrames

log = logging.getLogger(__name__)


def admit(filters: list, request: Request) -> Response:
    """Run the handshake through the caller-facing filters; 200 means admitted."""
    return build_chain(filters, lambda r: Response(200))(request)


def bridge(ws: Any, upstream_url: str, headers: dict[str, str],
           may_run: Callable[[str | None], bool], trace_id: str | None,
           connect: Callable[..., Any] = Client.connect) -> None:
    """Relay between the app's socket ``ws`` and a new upstream socket until either closes."""
    ws.sock = WholeFrames(ws.sock)  # see flowgate/websockets.py
    try:
        upstream = connect(upstream_url, headers=headers)
        upstream.sock = WholeFrames(upstream.sock)
    except (OSError, ConnectionClosed) as exc:
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
            if message is None:
                continue
            forwarded = _rewrite(message, may_run, trace_id)
            if isinstance(forwarded, dict):
                _send(ws, forwarded)  # refused here; nothing went upstream
            else:
                upstream.send(forwarded)
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


def _rewrite(message: str | bytes, may_run: Callable[[str | None], bool],
             trace_id: str | None) -> str | bytes | dict[str, Any]:
    """The message to send upstream, or an error message to answer the app with."""
    try:
        body = json.loads(message)
    except (TypeError, ValueError):
        return message  # the engine explains what is wrong with it
    if not isinstance(body, dict) or body.get("type") not in ("run", "watch"):
        return message
    if body.get("type") == "run":
        if "input" in body and "input_value" not in body:
            body["input_value"] = body.pop("input")
        if not may_run(body.get("flow_id")):
            return {"type": "error", "code": "forbidden", "trace_id": trace_id,
                    "message": f"this caller may not run flow '{body.get('flow_id')}'"}
    return json.dumps(body)


def _send(ws: Any, payload: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionClosed):
        ws.send(json.dumps(payload))
