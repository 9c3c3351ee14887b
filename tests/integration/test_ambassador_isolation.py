"""Issue #10, ambassador side: what a hostile caller tries against a real `flowgate
ambassador` (gunicorn + gevent) in front of a real `flowgate engine` and the llm-sim —
the WebSocket doing what HTTP refuses (other flows, past the rate limit, past its token's
expiry or its key's revocation, from any web page, with huge messages), made-up flow ids
flooding the metrics, JSON built to crash the serializer and open the circuit for
everyone, bad ids and headers, and /readyz telling strangers where things are.

Only ambassador-side behaviour: the engine started here treats every key as an admin key
and ignores tenants. Processes and helpers are those of test_ambassador.py; every wait is
bounded.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families
from support.procs import ServerProcess
from support.waiting import wait_until
from test_ambassador import (
    BASE_CONFIG,
    ENGINE_AUTH,
    ENGINE_KEY,
    FLOW_ID,
    JWT_AUDIENCE,
    JWT_SECRET,
    ORDERS_KEY,
    REPORTS_KEY,
    Ambassador,
    assert_error_contract,
    expected_output,
    merged,
    wait_for,
)

pytestmark = pytest.mark.integration
WAIT_S = 15
API_KEYS = {"inbound_auth": {"mode": "api_keys", "api_keys": [
    {"key": ORDERS_KEY, "identity": "orders-app", "tenant": "shop", "flows": [FLOW_ID]},
    {"key": REPORTS_KEY, "identity": "reports-app", "tenant": "bank", "flows": ["reports-only"]},
]}}
JWT = {"inbound_auth": {"mode": "jwt", "jwt": {
    "algorithm": "HS256", "secret": JWT_SECRET, "audience": JWT_AUDIENCE, "leeway_s": 0}}}


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound, not listening
    (a port from free_port() could be taken, and answered on, by another process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as reserved:
        reserved.bind(("127.0.0.1", 0))
        yield reserved.getsockname()[1]


# -- WebSocket helpers ----------------------------------------------------------------------------

def ws_connect(amb: Ambassador, headers: dict[str, str] | None = None, **kw: Any
               ) -> websocket.WebSocket:
    header = [f"{k}: {v}" for k, v in (headers or {}).items()]
    return websocket.create_connection(amb.url.replace("http", "ws") + "/ws/run-flow",
                                       header=header, timeout=WAIT_S, **kw)


def receive(ws: websocket.WebSocket) -> dict[str, Any]:
    return json.loads(ws.recv())


def send(ws: websocket.WebSocket, message: dict[str, Any]) -> None:
    ws.send(json.dumps(message))


def until_last_event(ws: websocket.WebSocket) -> list[dict[str, Any]]:
    """Messages up to a run's last event (run_finished, or an error with a seq)."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT_S
    while not messages or not (messages[-1]["type"] in ("run_finished", "error")
                               and "seq" in messages[-1]):
        assert time.monotonic() < deadline, messages[-3:]
        messages.append(receive(ws))
    return messages


def close_frame(ws: websocket.WebSocket, timeout_s: float = WAIT_S) -> tuple[int, str, list[Any]]:
    """Read until the server's close frame: (code, reason, the messages before it)."""
    before: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(frame.data[:2], "big"), frame.data[2:].decode(), before
        if frame.opcode == websocket.ABNF.OPCODE_TEXT:
            before.append(json.loads(frame.data))
    pytest.fail("no close frame from the ambassador")


def run_over_ws(ws: websocket.WebSocket, text: str, flow_id: str = FLOW_ID, **body: Any
                ) -> list[dict[str, Any]]:
    send(ws, {"type": "run", "flow_id": flow_id, "input": text, **body})
    return until_last_event(ws)


def engine_status(engine: ServerProcess, run_id: str) -> str:
    """The run's status once recorded (the batch writer records a run a few ms after it ends)."""
    return wait_until(lambda: requests.get(f"{engine.url}/api/v1/runs/{run_id}", headers=ENGINE_AUTH,
                                           timeout=10).json().get("status"), f"run {run_id} recorded")


# -- WebSocket: the same rules as HTTP, message by message --------------------------------------

def test_ws_watch_cancel_and_run_of_another_flow_are_refused(engine, start_ambassador,
                                                             fresh_llm_sim):
    amb = start_ambassador(API_KEYS, engine.url)
    run_id = amb.run("orders only", headers={"x-api-key": ORDERS_KEY}).json()["run_id"]
    ws = ws_connect(amb, {"x-api-key": REPORTS_KEY})
    try:
        answers = []
        for message in ({"type": "watch", "run_id": run_id, "last_event_id": 0},
                        {"type": "cancel", "run_id": run_id},
                        {"type": "run", "flow_id": FLOW_ID, "input": "let me in"},
                        {"type": "watch", "run_id": "no-such-run"},
                        {"type": "watch", "run_id": f"{run_id} HTTP/1.1\r\nX-Evil: 1"}):
            send(ws, message)
            answers.append(receive(ws))
    finally:
        ws.close()

    assert [a["type"] for a in answers] == ["error"] * 5, answers
    assert [a["code"] for a in answers] == ["forbidden", "forbidden", "forbidden",
                                            "run_not_found", "bad_request"]
    assert all(a["message"] and a["trace_id"] and "seq" not in a for a in answers)
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1  # the owner's run only
    assert engine_status(engine, run_id) == "succeeded"  # not cancelled by the stranger

    owner = ws_connect(amb, {"x-api-key": ORDERS_KEY})
    try:
        send(owner, {"type": "watch", "run_id": run_id, "last_event_id": 0})
        events = until_last_event(owner)
    finally:
        owner.close()
    assert events[-1]["type"] == "run_finished"
    assert events[-1]["output"] == expected_output("orders only")


@pytest.mark.parametrize("config, flows, refused", [
    pytest.param({"ratelimit": {"requests_per_s": 0.001, "burst": 3}},
                 [FLOW_ID, FLOW_ID, FLOW_ID], [False, False, True],
                 id="per-identity-the-handshake-took-one-token"),
    pytest.param({"flows": {FLOW_ID: {"ratelimit": {"requests_per_s": 0.001, "burst": 1}}}},
                 [FLOW_ID, FLOW_ID], [False, True], id="per-flow"),
])
def test_ws_each_run_passes_the_rate_limits(engine, start_ambassador, fresh_llm_sim, config,
                                            flows, refused):
    amb = start_ambassador(config, engine.url)
    ws = ws_connect(amb)
    outcomes = []
    try:
        for n, flow in enumerate(flows):
            send(ws, {"type": "run", "flow_id": flow, "input": f"limited {n}"})
            first = receive(ws)
            if first["type"] == "error" and "seq" not in first:
                outcomes.append(first)
            else:
                outcomes.append(until_last_event(ws)[-1])
    finally:
        ws.close()

    assert [o.get("code") == "rate_limited" for o in outcomes] == refused, outcomes
    for outcome in outcomes:
        if outcome.get("code") == "rate_limited":
            assert outcome["retry_after_s"] >= 1 and outcome["trace_id"]
        else:
            assert outcome["type"] == "run_finished"
    assert fresh_llm_sim.stats()["chat_completions_started"] == refused.count(False)
    assert amb.metric("flowgate_ambassador_ratelimited_total") == 1


def ws_run_works(amb: Ambassador, **options: Any) -> bool:
    ws = ws_connect(amb, **options)
    try:
        return run_over_ws(ws, "from a page")[-1]["type"] == "run_finished"
    finally:
        ws.close()


@pytest.mark.parametrize("origin", [
    pytest.param("https://evil.example", id="another-site"),
    pytest.param("null", id="sandboxed-page"),
    pytest.param("http://localhost:3000", id="a-local-dev-page"),
    pytest.param("http://127.0.0.1", id="same-host-other-port"),
])
def test_ws_pages_of_other_origins_are_refused_before_the_upgrade(engine, start_ambassador,
                                                                  fresh_llm_sim, origin):
    """`flowgate up` runs the ambassador with inbound auth none on loopback: without this,
    any page a developer opens could run flows through it."""
    amb = start_ambassador({}, engine.url)

    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        ws_connect(amb, origin=origin)
    plain = requests.get(amb.url + "/ws/run-flow", timeout=10, headers={
        "Origin": origin, "Connection": "Upgrade", "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})

    assert info.value.status_code == 403
    assert json.loads(info.value.resp_body)["error"]["code"] == "forbidden"
    assert "allowed_origins" in assert_error_contract(plain, 403, "forbidden")["message"]
    assert fresh_llm_sim.stats()["chat_completions_started"] == 0
    # while the ambassador's own origin and clients that are not browsers get in
    assert ws_run_works(amb, origin=amb.url)
    assert ws_run_works(amb, suppress_origin=True)


def test_ws_configured_origins_get_in(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({"websocket": {"allowed_origins": ["http://localhost:3000"]}},
                           engine.url)
    assert ws_run_works(amb, origin="http://localhost:3000")
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        ws_connect(amb, origin="http://localhost:3001")
    assert info.value.status_code == 403


def test_ws_message_over_max_body_bytes_closes_with_1009(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({"max_body_bytes": 2048}, engine.url)
    ws = ws_connect(amb)
    try:
        send(ws, {"type": "run", "flow_id": FLOW_ID, "input": "x" * 4000})
        code, reason, _ = close_frame(ws)
    finally:
        ws.close()
    assert (code, reason) == (1009, "Message is too big")
    assert fresh_llm_sim.stats()["chat_completions_started"] == 0


def test_ws_closes_when_the_jwt_expires_mid_run(engine, start_ambassador, fresh_llm_sim):
    """An expired token cannot keep streaming: 1008 once its exp has passed, and the run
    it was following is cancelled (the engine's default when its client leaves)."""
    fresh_llm_sim.configure(tokens_per_s=5, reply_tokens=100)  # 20 s of tokens
    amb = start_ambassador(JWT, engine.url)
    exp = int(time.time()) + 4
    token = jwt.encode({"sub": "orders-app", "aud": JWT_AUDIENCE, "flows": [FLOW_ID], "exp": exp},
                       JWT_SECRET, algorithm="HS256")
    ws = ws_connect(amb, {"Authorization": f"Bearer {token}"})
    try:
        send(ws, {"type": "run", "flow_id": FLOW_ID, "input": "keep talking"})
        code, reason, before = close_frame(ws, timeout_s=exp - time.time() + WAIT_S)
    finally:
        ws.close()
    closed_at = time.time()

    assert (code, "expired" in reason) == (1008, True), (code, reason)
    assert closed_at >= exp
    assert not any(m["type"] == "run_finished" for m in before)
    for started in (m for m in before if m["type"] == "run_started"):
        wait_for(lambda run_id=started["run_id"]: engine_status(engine, run_id) == "cancelled",
                 WAIT_S, what="the engine cancels the run of the closed connection")
    assert amb.metric("flowgate_ambassador_auth_failures_total", reason="expired") == 1


def test_ws_closes_when_a_reload_removes_its_api_key(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador(API_KEYS, engine.url)
    ws = ws_connect(amb, {"x-api-key": ORDERS_KEY})
    try:
        assert run_over_ws(ws, "before the reload")[-1]["type"] == "run_finished"
        remaining = {"inbound_auth": {"mode": "api_keys",
                                      "api_keys": API_KEYS["inbound_auth"]["api_keys"][1:]}}
        amb.write_config(json.dumps(merged(BASE_CONFIG, remaining)))  # JSON is YAML
        code, reason, _ = close_frame(ws)
    finally:
        ws.close()
    assert code == 1008 and "invalid API key" in reason
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        ws_connect(amb, {"x-api-key": ORDERS_KEY})
    assert info.value.status_code == 401


class HandshakeRecorder:
    """A stand-in engine WebSocket that records the upgrade request's headers and refuses
    it (the ambassador then tells the app the engine is unavailable)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.headers: list[dict[str, str]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                lines = data.decode("latin-1").split("\r\n")[1:]
                self.headers.append({k.strip().lower(): v.strip() for k, _, v in
                                     (line.partition(":") for line in lines if ":" in line)})
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")


def test_ws_the_engine_gets_the_callers_identity_and_tenant(start_ambassador):
    recorder = HandshakeRecorder()
    try:
        amb = start_ambassador(API_KEYS, recorder.url)
        ws = ws_connect(amb, {"x-api-key": ORDERS_KEY})
        try:
            message = receive(ws)
            code, _, _ = close_frame(ws)
        finally:
            ws.close()
    finally:
        recorder.listener.close()
    assert (message["code"], code) == ("upstream_unavailable", 1011)
    [seen] = recorder.headers
    assert seen["x-flowgate-identity"] == "orders-app"
    assert seen["x-flowgate-tenant"] == "shop"
    assert seen["authorization"] == f"Bearer {ENGINE_KEY}"
    assert ORDERS_KEY not in json.dumps(seen)


# -- metrics: no series per made-up flow id -------------------------------------------------------

def flow_labels(amb: Ambassador) -> set[str]:
    return {s.labels["flow"] for family in text_string_to_metric_families(amb.metrics())
            for s in family.samples if family.name == "flowgate_ambassador_requests"}


@pytest.mark.parametrize("config, status", [
    pytest.param({"breaker": {"consecutive_failures": 5}}, 503, id="engine-down-503"),
    pytest.param({"ratelimit": {"requests_per_s": 0.001, "burst": 1}}, 429, id="rate-limited-429"),
])
def test_a_thousand_made_up_flow_ids_add_no_metric_series(start_ambassador, dead_port, config,
                                                          status):
    amb = start_ambassador({**config, "flows": {FLOW_ID: {"fallback": {"output": "busy"}}}},
                           f"http://127.0.0.1:{dead_port}")
    assert amb.run("configured").status_code == 200  # the fallback, under its own label
    before = flow_labels(amb)
    statuses = set()
    with requests.Session() as session:
        for _ in range(1000):
            resp = session.post(amb.url + "/run-flow", timeout=10, json={
                "flow_id": f"flow-{uuid.uuid4().hex}", "input": "x"})
            statuses.add(resp.status_code)
    assert statuses == {status}
    assert flow_labels(amb) == before | {"other"}
    assert FLOW_ID in before
    assert amb.metric("flowgate_ambassador_fallbacks_total", flow=FLOW_ID) == 1


# -- bad input: a 400 before the engine, never a 500, never the breaker's business ---------------

def deep_body(depth: int) -> str:
    return json.dumps({"flow_id": FLOW_ID, "input": "x"})[:-1] + ', "tweaks": ' + \
        '{"t":' * depth + "1" + "}" * depth + "}"


@pytest.mark.parametrize("depth", [960, 150_000])
def test_deep_json_is_a_400_and_never_opens_the_breaker(engine, start_ambassador, fresh_llm_sim,
                                                        depth):
    amb = start_ambassador({"breaker": {"consecutive_failures": 5}}, engine.url)
    for _ in range(10):
        resp = requests.post(amb.url + "/run-flow", data=deep_body(depth), timeout=10,
                             headers={"Content-Type": "application/json"})
        assert "deeper than 64" in assert_error_contract(resp, 400, "bad_request")["message"]
    verbose = requests.get(amb.url + "/readyz?verbose=1", timeout=5).json()
    assert verbose["upstream"]["breaker"] == "closed"
    assert amb.run("still fine").status_code == 200
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1
    assert amb.metric("flowgate_ambassador_breaker_transitions_total", to="open") == 0


@pytest.mark.parametrize("method, path, headers, body, words", [
    pytest.param("POST", "/run-flow", {"Idempotency-Key": "commande-\u00e9t\u00e9"}, None,
                 "idempotency-key", id="idempotency-key-latin-1"),
    pytest.param("POST", "/run-flow", {"X-Request-ID": "r\u00e9q-1"}, None, "x-request-id",
                 id="request-id-latin-1"),
    pytest.param("POST", "/run-flow", {}, {"flow_id": FLOW_ID + "\n", "input": "x"}, "flow_id",
                 id="flow-id-trailing-newline"),
    pytest.param("GET", "/runs/r1%0A/events", {}, None, "run id", id="run-id-trailing-newline"),
    pytest.param("GET", "/runs/r1/events?last_event_id=%C2%B2", {}, None, "last_event_id",
                 id="last-event-id-superscript"),
    pytest.param("GET", "/runs/r1/events?last_event_id=%D9%A3", {}, None, "last_event_id",
                 id="last-event-id-arabic-indic"),
    pytest.param("GET", "/runs/r1/events", {"Last-Event-ID": "\u00b2"}, None, "last-event-id",
                 id="last-event-id-header-superscript"),
])
def test_bad_ids_and_headers_are_a_400_before_the_engine(engine, start_ambassador, fresh_llm_sim,
                                                         method, path, headers, body, words):
    amb = start_ambassador({"breaker": {"consecutive_failures": 1}}, engine.url)
    resp = requests.request(method, amb.url + path, headers=headers, timeout=10,
                            json=body or {"flow_id": FLOW_ID, "input": "x"})
    assert words in assert_error_contract(resp, 400, "bad_request")["message"].lower()
    assert "X-Upstream-Attempts" not in resp.headers  # the ambassador's answer, not the engine's
    assert fresh_llm_sim.stats()["chat_completions_started"] == 0
    verbose = requests.get(amb.url + "/readyz?verbose=1", timeout=5).json()
    assert verbose["upstream"]["breaker"] == "closed"


# -- /readyz?verbose=1 ----------------------------------------------------------------------------

@pytest.mark.parametrize("config, headers, shown", [
    pytest.param(API_KEYS, {}, False, id="keys-stranger"),
    pytest.param(API_KEYS, {"x-api-key": "not-a-key-0000"}, False, id="keys-wrong-key"),
    pytest.param(API_KEYS, {"x-api-key": REPORTS_KEY}, True, id="keys-any-known-caller"),
    pytest.param({}, {}, True, id="none-from-loopback"),
])
def test_readyz_verbose_shows_locations_only_to_known_callers(engine, start_ambassador, config,
                                                              headers, shown):
    amb = start_ambassador(config, engine.url)
    resp = requests.get(amb.url + "/readyz?verbose=1", headers=headers, timeout=5)
    assert resp.status_code == 200
    body = resp.json()
    assert body["upstream"]["breaker"] == "closed"
    assert body["config"]["last_reload_failed"] is False
    assert (engine.url in resp.text, str(amb.config_path) in resp.text) == (shown, shown)
    assert amb.metric("flowgate_ambassador_auth_failures_total") == 0
