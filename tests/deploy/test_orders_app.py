"""The demo orders app (examples/orders_app) talks only to its sidecar at AMBASSADOR_URL,
with the ambassador's /run-flow body, and passes the sidecar's errors on."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from orders_app.app import create_app


@pytest.fixture
def sidecar() -> Iterator[tuple[str, list[dict]]]:
    """A stand-in ambassador on a free loopback port that records what it was sent."""
    received: list[dict] = []
    fake = Flask("fake-ambassador")

    @fake.post("/run-flow")
    def run_flow():
        body = request.get_json()
        received.append(body)
        if body["flow_id"] == "faq-rag" and "break" in body["input"]:
            return jsonify({"error": {"code": "circuit_open", "message": "engine unavailable",
                                      "trace_id": "t-2"}}), 503, {"Retry-After": "10", "X-Trace-ID": "t-2"}
        return jsonify({"run_id": "r-1", "output": f"answer to {body['input']}"}), 200, {
            "X-Trace-ID": "t-1", "X-Cache": "MISS"}

    server = make_server("127.0.0.1", 0, fake, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_faq_runs_the_faq_flow_through_the_sidecar(sidecar):
    url, received = sidecar
    client = create_app(url).test_client()
    resp = client.post("/faq", json={"question": "How long do refunds take?"})
    assert resp.status_code == 200
    assert resp.get_json() == {"answer": "answer to How long do refunds take?", "trace_id": "t-1",
                               "cache": "MISS"}
    assert received == [{"flow_id": "faq-rag", "input": "How long do refunds take?", "session_id": None}]


def test_order_help_sends_the_order_as_context_with_a_session(sidecar):
    url, received = sidecar
    client = create_app(url).test_client()
    resp = client.post("/orders/1001/help", json={"message": "I want my money back"})
    assert resp.status_code == 200
    assert received[0]["flow_id"] == "support-router"
    assert received[0]["session_id"] == "order-1001"
    assert received[0]["input"].startswith("Order 1001 (espresso machine, delivered): ")
    assert client.post("/orders/9/help", json={"message": "hi"}).status_code == 404
    assert client.post("/orders/1001/help", json={}).status_code == 400


def test_sidecar_errors_are_passed_on_with_their_status(sidecar):
    url, _received = sidecar
    resp = create_app(url).test_client().post("/faq", json={"question": "break it"})
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "circuit_open"
    assert resp.get_json()["trace_id"] == "t-2"


def test_an_unreachable_sidecar_is_a_503_not_a_crash():
    from support.procs import free_port

    resp = create_app(f"http://127.0.0.1:{free_port()}").test_client().post("/faq", json={"question": "hi"})
    assert resp.status_code == 503
    assert "sidecar is unreachable" in json.loads(resp.data)["error"]
