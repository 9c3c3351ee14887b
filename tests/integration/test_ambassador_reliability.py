"""Issue #11, ambassador side: reliability shown against real processes — a real `flowgate
ambassador` (gunicorn + gevent) in front of a real `flowgate engine` and the llm-sim.

- recovery follows the engine's readiness: once its /readyz answers 200, the next request
  through the ambassador succeeds (event order, never a wall-clock threshold);
- the engine's WebSocket refusals reach the app with the engine's close code and reason,
  every time (20 in a row, so that a race would show); an engine gone without a close
  frame is 1011, never 1005;
- the OpenAPI document says what the HTTP server itself answers before the app.

(The cache's in-memory fallback while Redis is down is in test_ambassador.py, with the
other Redis tests.) Processes and helpers are those of test_ambassador.py; every wait is
bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
import websocket
from test_ambassador import (
    ENGINE_KEY,
    FLOW_ID,
    PrivateEngines,
    expected_output,
    kill_group,
    redis_server,
    wait_for,
)

pytestmark = pytest.mark.integration
WAIT_S = 15


@pytest.fixture
def private_engine(tmp_path, llm_sim) -> Iterator[PrivateEngines]:
    workdir = tmp_path / "private-engine"
    workdir.mkdir()
    engines = PrivateEngines(workdir, llm_sim)
    try:
        yield engines
    finally:
        engines.stop_all()


def close_frame(ws: websocket.WebSocket) -> tuple[int | None, str, list[Any]]:
    """Read until the close frame: (code — None when it carries none —, reason, messages
    before it)."""
    before: list[Any] = []
    while True:
        frame = ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
            return code, frame.data[2:].decode(errors="replace"), before
        if frame.opcode == websocket.ABNF.OPCODE_TEXT:
            before.append(json.loads(frame.data))


# -- WebSocket: the engine's close code and reason, every time ----------------------------------

def ws_round_trip_works(amb) -> bool:
    ws = websocket.create_connection(amb.url.replace("http", "ws") + "/ws/run-flow",
                                     timeout=WAIT_S)
    try:
        ws.send(json.dumps({"type": "run", "flow_id": FLOW_ID, "input": "still here"}))
        while True:
            raw = ws.recv()
            if not raw:  # closed: still at its limit
                return False
            message = json.loads(raw)
            if message["type"] in ("run_finished", "error"):
                return message["type"] == "run_finished"
    except websocket.WebSocketConnectionClosedException:
        return False  # still refused: at its limit
    finally:
        ws.close()


def test_ws_the_engines_refusal_reaches_the_app_every_time(private_engine, start_ambassador):
    """The engine at its connection limit accepts the upgrade and closes at once with 1013
    and a reason. The 101 and the close frame often arrive together, and the close frame
    was then left unread in the upstream client's buffer: the app got 1005 (no status) two
    seconds later instead. Twenty connections, half of them sending a run at once."""
    eng = private_engine.start(env={"FLOW_ENGINE_WS_MAX_CONNECTIONS": "1"}, warm=False)
    amb = start_ambassador({}, eng.url)
    holder = websocket.create_connection(f"ws://127.0.0.1:{eng.port}/api/v1/ws/runs",
                                         header=[f"x-api-key: {ENGINE_KEY}"], timeout=WAIT_S)
    results = []
    try:
        for attempt in range(20):
            ws = websocket.create_connection(amb.url.replace("http", "ws") + "/ws/run-flow",
                                             timeout=WAIT_S)
            try:
                if attempt % 2:
                    ws.send(json.dumps({"type": "run", "flow_id": FLOW_ID, "input": "hi"}))
                code, reason, before = close_frame(ws)
            finally:
                ws.close()
            results.append((code, reason, [m.get("type") for m in before]))
    finally:
        holder.close()

    expected = (1013, "engine at its limit of 1 WebSocket connections; try again later", [])
    assert results == [expected] * 20, [r for r in results if r != expected]
    # and once the holder's slot is free (the engine has seen it close), runs go through
    wait_for(lambda: ws_round_trip_works(amb), WAIT_S, what="a run once the engine has room")


def test_ws_an_engine_gone_without_a_close_frame_is_1011_never_1005(private_engine,
                                                                    start_ambassador):
    """1005 and 1006 mean "no close frame": they may not be sent. An engine killed under
    an open connection closes the app's with 1011 and a reason."""
    eng = private_engine.start(warm=False)
    amb = start_ambassador({}, eng.url)
    ws = websocket.create_connection(amb.url.replace("http", "ws") + "/ws/run-flow",
                                     timeout=WAIT_S)
    try:
        ws.send(json.dumps({"type": "ping-me-not"}))  # any message: the bridge is up
        first = json.loads(ws.recv())
        assert first["type"] == "error", first
        kill_group(eng)
        code, reason, _ = close_frame(ws)
    finally:
        ws.close()
    assert code == 1011 and "engine" in reason, (code, reason)


# -- recovery follows the engine's readiness ------------------------------------------------------

def circuit_open(resp: requests.Response) -> bool:
    return resp.status_code == 503 and resp.json()["error"]["code"] == "circuit_open"


def test_recovery_follows_the_engines_readiness(private_engine, start_ambassador, fresh_llm_sim):
    """The finding: a half-open trial hit the engine while it booted and the circuit stayed
    open for another open_s — the first success came 7.6 s after the engine was ready. Now
    a trial goes out once the engine's /readyz says ready, so (event order, no clock) the
    first request after /readyz answered 200 succeeds, though open_s is a minute."""
    eng = private_engine.start()
    amb = start_ambassador({
        "upstream": {"timeouts": {"per_try_s": 10, "total_s": 20}},
        "retry": {"max_attempts": 1},
        "breaker": {"consecutive_failures": 2, "min_requests": 100_000, "open_s": 60,
                    "backoff_base_s": 0.01, "probe_interval_s": 0},
    }, eng.url)
    assert amb.run("before").status_code == 200
    kill_group(eng)
    wait_for(lambda: circuit_open(amb.run("down")), WAIT_S, interval_s=0.01,
             what="the breaker opens")
    attempts = amb.metric("flowgate_ambassador_upstream_attempts_total")

    down = [amb.run("still down") for _ in range(3)]

    assert all(circuit_open(r) for r in down), [r.text for r in down]
    assert amb.metric("flowgate_ambassador_upstream_attempts_total") == attempts  # no run sent
    assert amb.metric("flowgate_ambassador_breaker_probes_total", result="not_ready") >= 3

    private_engine.start(eng.port, warm=False)  # returns once its /readyz answered 200
    first = amb.run("after the restart")

    assert first.status_code == 200, first.text
    assert first.json()["output"] == expected_output("after the restart")
    assert amb.metric("flowgate_ambassador_breaker_probes_total", result="ready") == 1
    assert amb.metric("flowgate_ambassador_breaker_transitions_total", to="closed") == 1


# -- the OpenAPI document of a running ambassador ---------------------------------------------

@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test (bound, not listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as reserved:
        reserved.bind(("127.0.0.1", 0))
        yield reserved.getsockname()[1]


@pytest.mark.parametrize(("status", "request_kw"), [
    pytest.param(414, {"params": {"x": "a" * 5000}}, id="request-line-too-long"),
    pytest.param(431, {"headers": {"X-Request-ID": "a" * 9000}}, id="header-too-large"),
])
def test_the_http_servers_own_refusals_are_in_the_document(start_ambassador, dead_port, status,
                                                          request_kw):
    """gunicorn refuses these before the ambassador sees them, with an HTML page: the
    document says so, so that a fuzzer checking answers against it finds what it says."""
    amb = start_ambassador({}, f"http://127.0.0.1:{dead_port}")
    spec = requests.get(amb.url + "/openapi.json", timeout=10).json()

    resp = requests.get(amb.url + "/readyz", timeout=10, **request_kw)

    assert resp.status_code == status
    documented = spec["paths"]["/readyz"]["get"]["responses"][str(status)]["$ref"]
    response = spec["components"]["responses"][documented.rsplit("/", 1)[1]]
    assert resp.headers["Content-Type"].split(";")[0] in response["content"]


def test_a_stalled_body_is_a_408_and_the_sidecar_keeps_answering(start_ambassador, dead_port):
    """A client that sends part of its body and stops holds nothing for long: the sidecar
    answers 408 in the error contract once AMBASSADOR_BODY_TIMEOUT_S has passed, and closes."""
    amb = start_ambassador({}, f"http://127.0.0.1:{dead_port}",
                           env={"AMBASSADOR_BODY_TIMEOUT_S": "1"})
    port = int(amb.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /run-flow HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"flow_id": ')
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # bounded by the socket timeout
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert requests.get(amb.url + "/healthz", timeout=10).status_code == 200


def test_a_hung_redis_costs_requests_nothing_but_its_timeout(engine, start_ambassador,
                                                              fresh_llm_sim, tmp_path):
    """Redis stopped mid-flight (SIGSTOP: connections open, nothing answered) under the
    cache and the rate limit: each call to it fails after redis_timeout_s, the ambassador
    falls back to process memory and every request is answered; Redis resumed, the cache
    uses it again."""
    config = {"flows": {FLOW_ID: {"cache": {"ttl_s": 60}}}, "redis_timeout_s": 0.3,
              "redis_pause_s": 0.5, "ratelimit": {"requests_per_s": 1000, "burst": 1000}}
    with redis_server(tmp_path) as (proc, url):
        amb = start_ambassador(config, engine.url, redis_url=url)
        assert amb.run("before").headers["X-Cache"] == "MISS"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            answers = [amb.run("while hung", timeout=WAIT_S) for _ in range(3)]
        finally:
            os.kill(proc.pid, signal.SIGCONT)

        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert [a.headers["X-Cache"] for a in answers] == ["MISS", "HIT", "HIT"]  # in memory
        assert amb.metric("flowgate_ambassador_redis_failures_total") >= 1
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            def cached_in_redis() -> bool:
                assert amb.run("resumed").status_code == 200
                return any(client.scan_iter(match="flowgate:cache:*resumed*")) or any(
                    True for _ in client.scan_iter(match="flowgate:cache:*"))

            wait_for(cached_in_redis, WAIT_S, interval_s=0.2, what="the cache uses Redis again")
        finally:
            client.close()
