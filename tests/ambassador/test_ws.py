"""WS /ws/run-flow before the upgrade (the Flask test client; the bridge itself runs against
real processes in tests/integration/test_ambassador_isolation.py): a page of another origin
is refused with 403 — even when it holds valid credentials — and bad headers or a request
that is not a WebSocket with 400, all in the error contract and before anything goes
upstream; the message size limit in force is what the WebSocket server gets. And the bridge's
parts: its upstream client keeps a close that came with the 101, the engine's close code is
what the app gets (never 1005 or 1006, which say no code came), the first close decides."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading

import pytest
from app_harness import API_KEYS, APP_KEY, assert_error_contract, run_flow
from simple_websocket import ConnectionClosed
from wsproto.frame_protocol import CloseReason

from ambassador.ws import AppSide, EngineSocket, relayed, server_options

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
KEYS_MODE = {"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS}


@pytest.mark.parametrize(("config", "headers", "status", "code"), [
    pytest.param(KEYS_MODE, {"Origin": "https://evil.example"}, 403, "forbidden",
                 id="another-site"),
    pytest.param(KEYS_MODE, {"Origin": "https://evil.example", "x-api-key": APP_KEY}, 403,
                 "forbidden", id="another-site-with-the-apps-key"),
    pytest.param(KEYS_MODE, {"Origin": "null"}, 403, "forbidden", id="sandboxed-page"),
    pytest.param(KEYS_MODE, {"Origin": "http://localhost:9999"}, 403, "forbidden",
                 id="same-host-other-port"),
    pytest.param({}, {"Origin": "http://127.0.0.1:3000"}, 403, "forbidden",
                 id="auth-none-loopback-dev-page"),
    pytest.param(KEYS_MODE, {"Origin": "http://localhost"}, 401, "unauthorized",
                 id="same-origin-passes-to-auth"),
    pytest.param(KEYS_MODE, {}, 401, "unauthorized", id="no-origin-passes-to-auth"),
    pytest.param({**KEYS_MODE, "websocket.allowed_origins": ["https://app.example.com"]},
                 {"Origin": "https://app.example.com"}, 401, "unauthorized",
                 id="configured-origin-passes-to-auth"),
    pytest.param(KEYS_MODE, {"x-api-key": APP_KEY, "Idempotency-Key": "cl\u00e9"}, 400,
                 "bad_request", id="header-not-ascii"),
    # a broken handshake is refused in the error contract before the WebSocket library sees it
    pytest.param({}, {"Connection": "keep-alive"}, 400, "bad_request", id="no-connection-upgrade"),
    pytest.param({}, {"Sec-WebSocket-Key": "not-16-bytes"}, 400, "bad_request",
                 id="bad-websocket-key"),
    pytest.param({}, {"Sec-WebSocket-Version": "8"}, 426, "upgrade_required",
                 id="another-websocket-version"),
])
def test_handshake_refusals(make_app, engine, config, headers, status, code) -> None:
    client, amb = make_app(config)
    response = client.get("/ws/run-flow", headers={**UPGRADE, **headers})
    error = assert_error_contract(response, status, code)
    if status == 403:
        assert "allowed_origins" in error["message"]
    if status == 426:
        assert response.headers["Sec-WebSocket-Version"] == "13"
    assert engine.requests == []
    assert amb.metrics.requests.labels("/ws/run-flow", "", str(status), "none")._value.get() == 1


def test_a_refused_origin_spends_no_rate_limit_token(make_app) -> None:
    client, _ = make_app({**KEYS_MODE, "ratelimit": {"requests_per_s": 0.001, "burst": 1}})
    for _ in range(3):
        response = client.get("/ws/run-flow", headers={**UPGRADE, "Origin": "https://evil.example",
                                                       "x-api-key": APP_KEY})
        assert response.status_code == 403
    # the identity's one token is still there (HTTP and WebSocket share the bucket)
    assert run_flow(client, headers={"x-api-key": APP_KEY}).status_code == 200


def test_a_plain_get_is_told_to_upgrade(make_app, engine) -> None:
    client, _ = make_app()
    error = assert_error_contract(client.get("/ws/run-flow"), 400, "bad_request")
    assert "Upgrade" in error["message"]


@pytest.mark.parametrize("limit", [1024, 65536])
def test_the_message_size_limit_is_max_body_bytes(make_app, limit) -> None:
    _, amb = make_app(max_body_bytes=limit)
    assert server_options(amb.settings)["max_message_size"] == limit


# -- the bridge's upstream client and its close codes (issue #11) ------------------------------

class AcceptAndClose:
    """A WebSocket server that accepts and closes in one write — the 101 and the close frame
    in the same TCP segment, as the engine at its connection limit often does — then keeps
    the connection open until the test ends."""

    def __init__(self, code: int, reason: str) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/api/v1/ws/runs"
        self.frame = bytes([0x88, 2 + len(reason.encode())]) + code.to_bytes(2, "big") + \
            reason.encode()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = re.search(rb"(?i)sec-websocket-key: *(\S+)", request)[1]
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                         b"\r\n\r\n" + self.frame)
            self.done.wait(10)

    def close(self) -> None:
        self.done.set()
        self.listener.close()
        self.thread.join(5)


GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def test_a_close_that_came_with_the_101_is_not_lost() -> None:
    server = AcceptAndClose(1013, "engine at its limit; try again later")
    try:
        with pytest.raises(ConnectionClosed) as closed:
            EngineSocket.connect(server.url)
    finally:
        server.close()
    assert (closed.value.reason, closed.value.message) == (
        1013, "engine at its limit; try again later")


@pytest.mark.parametrize(("code", "reason", "relayed_as"), [
    pytest.param(1013, "busy", (1013, "busy"), id="try-again-later"),
    pytest.param(1000, "idle", (1000, "idle"), id="normal"),
    pytest.param(4001, None, (4001, ""), id="an-application-code-without-reason"),
    pytest.param(CloseReason.NO_STATUS_RCVD, None,
                 (1011, "the flow engine's connection ended without a close code"),
                 id="1005-no-status"),
    pytest.param(1006, None, (1011, "the flow engine's connection ended without a close code"),
                 id="1006-no-close-frame"),
    pytest.param(None, None, (1011, "the flow engine's connection ended without a close code"),
                 id="nothing"),
])
def test_what_the_app_gets_of_the_engines_close(code, reason, relayed_as) -> None:
    assert relayed(code, reason) == relayed_as


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closes: list[tuple[int, str]] = []

    def send(self, data: str) -> None:
        self.sent.append(data)

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


def test_the_first_close_decides_and_nothing_is_sent_after_it() -> None:
    ws = RecordingSocket()
    app = AppSide(ws)
    assert app.send({"type": "token"}) is True
    app.close(1013, "engine at its limit")
    app.close(1000, "")  # the other thread noticing the end too
    assert app.send("late") is False
    assert ws.sent == ['{"type": "token"}'] and ws.closes == [(1013, "engine at its limit")]
