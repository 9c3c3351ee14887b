"""What the app-level unit tests share: a tiny in-test engine (http.server in a thread on
127.0.0.1) that records requests and answers from a script, a test client that closes its
answers like a WSGI server, and the error-contract assertion. The fixtures built on them
(``engine``, ``make_app``) are in conftest.py."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flask.testing import FlaskClient

SERVICE_KEY = "svc-key-for-the-engine-123"
APP_KEY = "orders-app-secret-456"
OTHER_KEY = "x-api-key-secret-789"
W3C = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
INCOMING_TRACE, INCOMING_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
API_KEYS = [{"key": APP_KEY, "identity": "orders-app", "tenant": "shop"},
            {"key": OTHER_KEY, "identity": "other-app"}]
ENGINE_ANSWER = {"run_id": "run-1", "flow_id": "faq", "version": 1, "output": "hello back"}


class FakeEngine:
    """Records each request and answers from a script (then with ENGINE_ANSWER, version 1);
    ``GET /api/v1/flows/{id}`` (the cache's routing view) answers a flow with live version 1."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.flow_reads = 0
        self.routing: dict[str, Any] = {}  # flow id → routing of its record
        self.script: list[tuple[int, dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                if self.command == "GET" and self.path.startswith("/api/v1/flows/"):
                    return self._flow(self.path.rsplit("/", 1)[1])
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with engine._lock:
                    engine.requests.append({
                        "method": self.command, "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": json.loads(raw) if raw else None})
                    status, headers, body = (engine.script.pop(0) if engine.script else
                                             (200, {"X-Run-ID": "run-1", "X-Flow-Version": "1"},
                                              json.dumps(ENGINE_ANSWER).encode()))
                self.send_response(status)
                self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
                for name, value in headers.items():
                    if name == "Content-Type":
                        continue
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _flow(self, flow_id: str) -> None:
                """A flow's record, as the cache's routing view reads it (not recorded)."""
                with engine._lock:
                    engine.flow_reads += 1
                    body = json.dumps({"id": flow_id, "name": flow_id, "live_version": 1,
                                       "routing": engine.routing.get(flow_id)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.script.append((status, headers or {}, json.dumps(body).encode()))


class ClosingClient(FlaskClient):
    """Reads each answer to the end and closes it, as a WSGI server does: the ambassador
    records metrics and the access line when its answer is closed."""

    def open(self, *args: Any, buffered: bool = True, **kwargs: Any):
        return super().open(*args, buffered=buffered, **kwargs)


def run_flow(client, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None):
    return client.post("/run-flow", json=body or {"flow_id": "faq", "input": "hello"},
                       headers=headers or {})


def assert_error_contract(response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    match = W3C.match(response.headers["traceparent"])
    assert match, response.headers
    assert error["trace_id"] == response.headers["X-Trace-ID"] == match[1]
    assert response.headers["X-Request-ID"]
    return error
