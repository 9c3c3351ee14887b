"""Every proxied route takes one path (ambassador/wsgi.py → observe → validate → filters):
the same error body, trace headers, in-flight gauge and metrics for each, refusals included.
"""

from __future__ import annotations

import pytest
from app_harness import assert_error_contract, run_flow

REFUSALS = [
    pytest.param("post", "/run-flow", {"data": "{", "content_type": "application/json"}, 400,
                 "bad_request", "/run-flow", id="run-flow-bad-json"),
    pytest.param("put", "/run-flow", {}, 405, "method_not_allowed", "/run-flow",
                 id="run-flow-wrong-method"),
    pytest.param("get", "/runs/r%0A1/events", {}, 400, "bad_request", "/runs/<id>/events",
                 id="events-bad-run-id"),
    pytest.param("post", "/runs/r1/events", {}, 405, "method_not_allowed", "/runs/<id>/events",
                 id="events-wrong-method"),
    pytest.param("get", "/ws/run-flow", {}, 400, "bad_request", "/ws/run-flow",
                 id="ws-not-an-upgrade"),
    pytest.param("post", "/ws/run-flow", {}, 405, "method_not_allowed", "/ws/run-flow",
                 id="ws-wrong-method"),
]


def counted(amb, route: str, status: int) -> float:
    value = amb.metrics.registry.get_sample_value(
        "flowgate_ambassador_requests_total",
        {"route": route, "flow": "", "status": str(status), "cache": "none"})
    return value or 0.0


def in_flight(amb) -> float:
    return amb.metrics.registry.get_sample_value("flowgate_ambassador_in_flight_requests")


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code", "route"), REFUSALS)
def test_a_refusal_looks_the_same_on_every_route(make_app, engine, method, path, kwargs,
                                                 status, code, route) -> None:
    client, amb = make_app()
    response = getattr(client, method)(path, headers={"traceparent": TRACEPARENT}, **kwargs)
    error = assert_error_contract(response, status, code)
    assert error["trace_id"] == TRACE_ID == response.headers["X-Trace-ID"]
    assert float(response.headers["X-Ambassador-Overhead-Ms"]) >= 0
    if status == 405:
        assert response.headers["Allow"]
    assert counted(amb, route, status) == 1
    assert in_flight(amb) == 0
    assert engine.requests == []


def test_an_unexpected_error_in_a_filter_is_a_500_in_the_contract(make_app, engine,
                                                                  monkeypatch) -> None:
    client, amb = make_app()
    import ambassador.run_flow

    def broken(request, settings):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ambassador.run_flow, "parse", broken)
    error = assert_error_contract(run_flow(client), 500, "internal")
    assert "bug" not in error["message"]
    assert in_flight(amb) == 0 and counted(amb, "/run-flow", 500) == 1


def test_a_stream_holds_the_in_flight_gauge_until_it_is_closed(make_app, engine) -> None:
    client, amb = make_app()
    engine.script.append((200, {"Content-Type": "text/event-stream"},
                          b"id: 1\nevent: run_finished\ndata: {}\n\n"))
    response = client.post("/run-flow", json={"flow_id": "faq", "input": "hi", "stream": True},
                           buffered=False)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-cache"
    assert in_flight(amb) == 1  # the answer is still going out
    assert b"run_finished" in b"".join(response.response)
    response.close()
    assert in_flight(amb) == 0


def test_a_websocket_handshake_passes_the_caller_facing_filters(make_app, engine) -> None:
    keys = [{"key": "app-key-123456", "identity": "orders-app"}]
    client, amb = make_app({"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": keys})
    assert_error_contract(client.get("/ws/run-flow", headers=UPGRADE_HEADERS), 401,
                          "unauthorized")
    assert counted(amb, "/ws/run-flow", 401) == 1 and in_flight(amb) == 0


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


UPGRADE_HEADERS = {"Connection": "Upgrade", "Upgrade": "websocket",
                   "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.mark.parametrize(("body", "status_line"), [
    pytest.param(b"x" * 2048, "413 Payload Too Large", id="too-large"),
    pytest.param(b"{", "400 Bad Request", id="bad-json"),
])
def test_the_status_line_keeps_its_reason_phrases(make_app, engine, body, status_line) -> None:
    """What slow-loris and other raw-socket clients read (tests/chaos): the ambassador's
    phrases, not Python's older names (413 "Request Entity Too Large")."""
    client, _ = make_app(max_body_bytes=1024)
    response = client.post("/run-flow", data=body, content_type="application/json")
    assert response.status == status_line
