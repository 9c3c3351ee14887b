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
"code": "upstream_unavailable"}`` and the connection closes with 1011. When the engine
closes the connection (1013 at its connection limit, 1000 when idle, …) the app gets the
engine's code and reason, every time; an engine gone without a close frame is 1011.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from simple_websocket import Client, ConnectionClosed, Server
from simple_websocket import ConnectionError as HandshakeFailed
from werkzeug.datastructures import EnvironHeaders

from ambassador import hygiene, origin
from ambassador.chain import Request, Response, error_response
from ambassador.config import Settings
from ambassador.ws_guard import UPSTREAM_PATH, Close, Guard
from flowgate.common import otel
from flowgate.common.websockets import WholeFrames

if TYPE_CHECKING:
    from ambassador.app import Ambassador

log = logging.getLogger(__name__)
_MAX_REASON = 120  # a close frame's reason: at most 123 bytes
_CLOSE_WAIT_S = 2.0
_NOT_SENDABLE = frozenset({1004, 1005, 1006, 1015})  # reserved: never in a close frame


def upgrade_problem(method: str, headers: Any) -> tuple[int, str] | None:
    """Why this is not a WebSocket handshake the server can accept (RFC 6455 4.2.1), as
    (status, message), or None. Checked before the upgrade: what the WebSocket library
    would make of a broken handshake is not an answer in the error contract."""
    upgrade = "this route is a WebSocket: send GET with 'Upgrade: websocket'"
    if method != "GET" or headers.get("Upgrade", "").strip().lower() != "websocket":
        return 400, upgrade
    if "upgrade" not in {t.strip().lower() for t in headers.get("Connection", "").split(",")}:
        return 400, upgrade + " and 'Connection: Upgrade'"
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        return 426, "only WebSocket version 13 is spoken here (Sec-WebSocket-Version: 13)"
    try:
        key = base64.b64decode(headers.get("Sec-WebSocket-Key", "").strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 16:
        return 400, "Sec-WebSocket-Key must be 16 random bytes in base64"
    return None


def parse(request: Request, settings: Settings, _upstream: Any = None) -> Response | None:
    """The handshake's checks, before the upgrade (a refusal is an ordinary HTTP error):
    the page's origin (403), the headers (400), a real WebSocket handshake (400, 426)."""
    environ = request.ctx["environ"]
    refused = origin.refusal(environ, settings.websocket.allowed_origins)
    if refused:
        return error_response(403, "forbidden", refused, request)
    problem = hygiene.header_problem(request.headers)
    if problem:
        return error_response(400, "bad_request", problem, request)
    bad = upgrade_problem(request.method, EnvironHeaders(environ))
    if bad is not None:
        status, message = bad
        return error_response(status, "upgrade_required" if status == 426 else "bad_request",
                              message, request,
                              headers={"Sec-WebSocket-Version": "13"} if status == 426 else None)
    request.path = UPSTREAM_PATH
    return None


class Upgrade:
    """The route's end, once the caller-facing filters (trace, auth, rate limit) admitted
    the handshake: a 101 whose ``meta["upgrade"]`` the adapter (ambassador/wsgi.py) runs
    with the connection — the WebSocket accepted, bridged to the engine until either side
    closes. The message size limit is the ``max_body_bytes`` in force at the handshake."""

    def __init__(self, amb: Ambassador, settings: Settings) -> None:
        self.amb, self.settings = amb, settings

    def guard(self, request: Request) -> Guard:
        """The checks of the connection's messages, starting from the settings whose auth
        admitted the handshake (a reload landing meanwhile is checked at the first tick)."""
        return Guard(self.amb, request.headers, request.ctx.get("identity"),
                     request.ctx["trace"], admitted_with=self.settings)

    def __call__(self, request: Request) -> Response:
        trace = request.ctx["trace"]
        guard = self.guard(request)
        settings, span = self.settings, request.ctx.get("span")

        def run(environ: dict[str, Any]) -> str:
            """Accept, bridge until the end; the server mode (what the adapter returns)."""
            ws = Server(environ, **server_options(settings))
            url = "ws" + settings.upstream.url[len("http"):] + UPSTREAM_PATH
            headers = {"traceparent": otel.traceparent_of(span) if span is not None
                       else trace.child().traceparent, "x-request-id": trace.request_id}
            key = settings.upstream_key()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            if guard.identity is not None:
                headers["x-flowgate-identity"] = guard.identity.name
                if guard.identity.tenant:
                    headers["x-flowgate-tenant"] = guard.identity.tenant
            with contextlib.suppress(ConnectionClosed):
                bridge(ws, url, headers, guard.check, guard.tick, trace_id=trace.trace_id)
            with contextlib.suppress(Exception):
                ws.close()
            return ws.mode

        return Response(101, meta={"upgrade": run})


def server_options(settings: Settings) -> dict[str, Any]:
    """What the app's WebSocket server gets: the message size limit in force."""
    return {"max_message_size": settings.max_body_bytes}


class EngineSocket(Client):
    """simple-websocket's client, keeping what arrived together with the engine's 101.

    Its handshake takes the first event of the first read (the 101) and leaves the rest in
    wsproto's buffer, which is looked at again only when more bytes arrive. An engine that
    accepts and closes at once (1013 at its connection limit) often has its close frame in
    that same read — and after a close no more bytes come: the close was never seen, and
    the app got 1005 (no status) when the engine dropped the TCP connection. Here the rest
    of the read is handled at once: a close in it ends ``connect`` with ConnectionClosed
    carrying the engine's code and reason."""

    def handshake(self) -> None:
        super().handshake()
        self.connected = self._handle_events()  # what else the read held (a close, messages)
        if not self.connected:
            self.sock.close()
            raise ConnectionClosed(self.close_reason, self.close_message)


class AppSide:
    """What the bridge writes to the app's socket, from two threads: messages until one
    close, and no message after it. The first close decides the app's code and reason;
    later ones (the other thread noticing the end too) change nothing."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.closed = False
        self._lock = threading.Lock()

    def send(self, message: str | bytes | dict[str, Any]) -> bool:
        """False when the app is gone (or closed by the bridge)."""
        data = json.dumps(message) if isinstance(message, dict) else message
        with self._lock:
            if self.closed:
                return False
            try:
                self.ws.send(data)
                return True
            except (ConnectionClosed, OSError):
                self.closed = True
                return False

    def close(self, code: int, reason: str) -> None:
        """Close with ``code`` and wait (briefly) for the app's answer, so the closing
        handshake completes before the connection is dropped."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            reason = reason.encode()[:_MAX_REASON].decode(errors="ignore")
            with contextlib.suppress(ConnectionClosed, OSError):
                self.ws.close(code, reason)
        reader = getattr(self.ws, "thread", None)  # simple-websocket's reader ends on the answer
        if reader is not None and reader is not threading.current_thread():
            reader.join(_CLOSE_WAIT_S)


def relayed(code: int | None, reason: str | None) -> tuple[int, str]:
    """The engine's close as the app gets it. 1005 (no status) and 1006 (no close frame)
    say that no code came, and may not be sent: the app gets 1011 and why."""
    if code is None or int(code) in _NOT_SENDABLE or not 1000 <= int(code) <= 4999:
        return 1011, "the flow engine's connection ended without a close code"
    return int(code), reason or ""


def bridge(ws: Any, upstream_url: str, headers: dict[str, str],
           check: Callable[[str | bytes], str | bytes | dict[str, Any] | Close],
           tick: Callable[[], Close | None], trace_id: str | None,
           connect: Callable[..., Any] = EngineSocket.connect) -> None:
    """Relay between the app's socket ``ws`` and a new upstream socket until either closes.
    ``check`` decides about each app message, ``tick`` runs when a second passed without
    one; either may close the connection.

    Two threads: this one reads the app (and writes to the engine), a pump reads the
    engine (and writes to the app). When the engine closes, the pump relays its code and
    reason to the app at once. Whether the engine closed is read from the upstream socket
    itself — not from whichever thread happened to see it first — so the bridge's own end
    (the app left, or a Close of ours) never passes for the engine's, and the engine's is
    never lost to the bridge ending at the same moment."""
    ws.sock = WholeFrames(ws.sock)  # see flowgate/common/websockets.py
    app = AppSide(ws)
    try:
        upstream = connect(upstream_url, headers=headers)
        upstream.sock = WholeFrames(upstream.sock)
    except ConnectionClosed as exc:  # accepted, and closed in the same breath
        app.close(*relayed(exc.reason, exc.message))
        return
    except (OSError, HandshakeFailed) as exc:
        app.send({"type": "error", "code": "upstream_unavailable", "trace_id": trace_id,
                  "message": f"the flow engine's WebSocket is unreachable ({type(exc).__name__})"})
        app.close(1011, "upstream unavailable")
        return
    ours = threading.Event()  # set before the bridge closes the upstream socket itself

    def engine_closed() -> None:
        if not ours.is_set():
            app.close(*relayed(upstream.close_reason, upstream.close_message))

    def engine_to_app() -> None:
        try:
            while True:
                message = upstream.receive(timeout=1)
                if message is not None and not app.send(message):
                    return  # the app is gone
        except ConnectionClosed:
            engine_closed()

    pump = threading.Thread(target=engine_to_app, daemon=True, name="ws-bridge")
    pump.start()
    try:
        while pump.is_alive() and not app.closed:
            message = ws.receive(timeout=1)
            verdict = tick() if message is None else check(message)
            if verdict is None:
                continue
            if isinstance(verdict, Close):
                app.close(verdict.code, verdict.reason)  # ours is the reason the app gets
                break
            if isinstance(verdict, dict):
                app.send(verdict)  # refused here; nothing went upstream
            else:
                upstream.send(verdict)
    except (ConnectionClosed, OSError):  # the app left (receive), or the engine closed (send)
        pass
    finally:
        if not upstream.connected:
            engine_closed()  # (the pump may not have seen it yet)
        ours.set()
        with contextlib.suppress(Exception):  # already closed
            upstream.close()
        pump.join(timeout=2)
