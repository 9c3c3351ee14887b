"""``WS /api/v1/ws/runs`` against a real `flowgate engine` (gunicorn, one gevent worker) on
a free port, with the real llm-sim behind the `openai` provider, spoken to with the
websocket-client library over a real socket. Every wait is bounded."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import websocket
from support.procs import ServerProcess, free_port
from support.waiting import wait_until

from flowgate.llm_sim import reply_tokens

pytestmark = pytest.mark.integration
KEY = "integration-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WAIT_S = 15
SIM_FLOW = {
    "id": "sim-chat",
    "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "llm", "type": "ChatModel",
         "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
        {"id": "out", "type": "ChatOutput"},
    ],
    "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}],
}
ECHO_FLOW = {
    "id": "echo",
    "nodes": [{"id": "in", "type": "ChatInput"},
              {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
              {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}],
}


def start_engine(tmp_path, sim, **env: str) -> ServerProcess:
    port = free_port()
    proc = ServerProcess(
        [sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)],
        port=port, ready_path="/readyz", name="engine", ready_timeout=30, cwd=tmp_path,
        env={"FLOW_ENGINE_API_KEYS": KEY, "DATABASE_URL": f"sqlite:///{tmp_path / 'engine.db'}",
             "OPENAI_BASE_URL": sim.base_url, "FLOW_ENGINE_WORKERS": "1",
             "FLOW_ENGINE_GRACEFUL_TIMEOUT": "1",  # stopping waits this long, even when idle
             "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), **env}).start()
    try:
        for flow in (SIM_FLOW, ECHO_FLOW):
            created = requests.post(proc.url + "/api/v1/flows", json=flow, headers=AUTH, timeout=10)
            assert created.status_code == 201, created.text
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture(scope="module")
def engine(tmp_path_factory, llm_sim) -> Iterator[ServerProcess]:
    """One engine on default WebSocket settings for the tests that need nothing special."""
    proc = start_engine(tmp_path_factory.mktemp("engine-ws"), llm_sim)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def tuned_engine(tmp_path, fresh_llm_sim) -> Iterator[Callable[..., ServerProcess]]:
    """``tuned_engine(FLOW_ENGINE_WS_...="...")``: an engine of this test's own."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        started.append(start_engine(tmp_path, fresh_llm_sim, **env))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def ws_url(proc: ServerProcess, query: str = "") -> str:
    return f"ws://127.0.0.1:{proc.port}/api/v1/ws/runs{query}"


def connect(proc: ServerProcess, query: str = "", header: list[str] | None = None
            ) -> websocket.WebSocket:
    return websocket.create_connection(ws_url(proc, query), timeout=WAIT_S,
                                       header=[f"x-api-key: {KEY}"] if header is None else header)


def receive(ws: websocket.WebSocket) -> dict[str, Any]:
    return json.loads(ws.recv())


def until_last_event(ws: websocket.WebSocket, on_each: Callable[[dict], None] | None = None
                     ) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT_S
    while not messages or not (messages[-1]["type"] in ("run_finished", "error")
                               and "seq" in messages[-1]):
        assert time.monotonic() < deadline, messages[-3:]
        messages.append(receive(ws))
        if on_each is not None:
            on_each(messages[-1])
    return messages


def until_tokens(ws: websocket.WebSocket, n: int) -> list[dict[str, Any]]:
    messages = [receive(ws)]
    while sum(m["type"] == "token" for m in messages) < n:
        messages.append(receive(ws))
    return messages


def close_frame(ws: websocket.WebSocket) -> tuple[int, str, list[int]]:
    """Read until the server's close frame: (code, reason, opcodes of the frames before it).
    Raw frames: nothing is answered (the server may have hung up right after its close)."""
    seen = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        frame = ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            return int.from_bytes(data[:2], "big"), data[2:].decode(), seen
        seen.append(frame.opcode)
    pytest.fail("no close frame from the server")


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    return wait_until(condition, what, timeout, interval_s=0.05)


def run_status(proc: ServerProcess, run_id: str, status: str) -> dict[str, Any]:
    def record():
        resp = requests.get(f"{proc.url}/api/v1/runs/{run_id}", headers=AUTH, timeout=10)
        return resp.json() if resp.status_code == 200 and resp.json()["status"] == status else None

    return wait_for(record, f"run {run_id} to be {status}")


def metric(proc: ServerProcess, name: str, **labels: str) -> float:
    text = requests.get(proc.url + "/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    assert match, f"{name}{{{wanted}}} not in /metrics"
    return float(match.group(1))


# -- runs -----------------------------------------------------------------------------------


def test_a_run_streams_its_events_in_order_ending_with_the_http_result(engine, fresh_llm_sim):
    ws = connect(engine)
    try:
        ws.send(json.dumps({"type": "run", "flow_id": "sim-chat", "input_value": "hello there",
                            "session_id": "s-9"}))
        events = until_last_event(ws)
    finally:
        ws.close()

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    names = [e["type"] for e in events]
    assert names == ["run_started", "node_started", "node_finished", "node_started",
                     *["token"] * 24, "node_finished", "node_started", "node_finished",
                     "run_finished"]
    finished = events[-1]
    assert finished["output"] == "".join(reply_tokens([("user", "hello there")], 24))
    assert "".join(e["text"] for e in events if e["type"] == "token") == finished["output"]
    plain = requests.post(engine.url + "/api/v1/run/sim-chat", headers=AUTH, timeout=30,
                          json={"input_value": "hello there", "session_id": "s-9"}).json()
    drop = {"run_id", "duration_ms"}
    assert {k: v for k, v in finished.items() if k not in drop | {"type", "seq"}} == {
        k: v for k, v in plain.items() if k not in drop}
    assert run_status(engine, finished["run_id"], "succeeded")["result"]["output"] == plain["output"]


def test_tokens_arrive_while_the_llm_generates(engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=200)  # ~10 s of generation
    ws = connect(engine)
    try:
        ws.send(json.dumps({"type": "run", "flow_id": "sim-chat", "input_value": "stream it"}))
        while (message := receive(ws))["type"] != "token":
            pass
        stats = fresh_llm_sim.stats()  # buffered, the token would come after the answer
        ws.send(json.dumps({"type": "cancel"}))
        last = until_last_event(ws)[-1]
    finally:
        ws.close()

    assert message["index"] == 0
    assert stats["chat_completions_completed"] == 0 and stats["tokens_sent"] < 200
    assert (last["type"], last["code"]) == ("error", "run_cancelled")


def test_a_large_result_arrives_whole(engine):
    """simple-websocket writes a frame with one socket.send; under gevent that writes only
    what fits in the socket's send buffer (4 MB at most here, far less to a slow client far
    away), and the client waited forever for the rest, until the engine wrapped the socket
    (WholeFrames)."""
    text = "x" * 900_000  # run_finished repeats the output: a 5.4 MB message
    ws = connect(engine)
    try:
        ws.send(json.dumps({"type": "run", "flow_id": "echo", "input_value": text}))
        finished = until_last_event(ws)[-1]
        ws.send(json.dumps({"type": "run", "flow_id": "echo", "input_value": "after"}))
        after = until_last_event(ws)[-1]
    finally:
        ws.close()

    assert finished["output"] == "[echo: not an LLM] " + text
    assert after["output"] == "[echo: not an LLM] after"


def test_a_run_with_a_lone_surrogate_streams_to_its_end(engine):
    """``"caf\\ud800"`` is valid JSON; the decoded text cannot be encoded as UTF-8, and a
    text frame must be UTF-8: the engine escapes it (``\\ud800``) instead of failing the
    send mid-run."""
    ws = connect(engine)
    try:
        ws.send('{"type": "run", "flow_id": "echo", "input_value": "caf\\ud800"}')
        events = until_last_event(ws)
    finally:
        ws.close()

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "run_finished"
    assert events[-1]["output"] == "[echo: not an LLM] caf\ud800"


def test_bad_messages_get_error_messages_not_a_closed_socket(engine):
    ws = connect(engine)
    try:
        answers = []
        for message in ("{oops", json.dumps({"type": "nope"}),
                        json.dumps({"type": "run", "flow_id": "missing"}),
                        json.dumps({"type": "run", "flow_id": "sim-chat",
                                    "tweaks": {"llm": {"temperature": 5}}})):
            ws.send(message)
            answers.append(receive(ws))
        ws.send(json.dumps({"type": "run", "flow_id": "echo", "input_value": "fine"}))
        last = until_last_event(ws)[-1]
    finally:
        ws.close()

    assert [(a["type"], a["code"]) for a in answers] == [
        ("error", "bad_request"), ("error", "bad_request"), ("error", "flow_not_found"),
        ("error", "flow_invalid")]
    assert all("Traceback" not in a["message"] for a in answers)
    assert last["output"] == "[echo: not an LLM] fine"


# -- cancel and disconnect ------------------------------------------------------------------


def test_cancel_stops_the_run_and_the_llm_stream(engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=500)  # ~10 s if never cancelled
    ws = connect(engine)
    try:
        ws.send(json.dumps({"type": "run", "flow_id": "sim-chat", "input_value": "long"}))
        run_id = until_tokens(ws, 3)[0]["run_id"]
        ws.send(json.dumps({"type": "cancel"}))
        last = until_last_event(ws)[-1]
    finally:
        ws.close()

    assert (last["type"], last["code"]) == ("error", "run_cancelled")
    wait_for(lambda: fresh_llm_sim.stats()["streams_closed_early"] >= 1,
             "llm-sim to see its stream closed early")
    assert fresh_llm_sim.stats()["tokens_sent"] < 500
    assert run_status(engine, run_id, "cancelled")["error"]["code"] == "run_cancelled"


@pytest.mark.parametrize("how", ["close-frame", "dropped-socket"])
def test_a_client_leaving_mid_run_cancels_it(engine, fresh_llm_sim, how):
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=500)
    disconnects = metric(engine, "flowgate_engine_stream_disconnects_total", transport="ws")
    ws = connect(engine)
    ws.send(json.dumps({"type": "run", "flow_id": "sim-chat", "input_value": "long"}))
    run_id = until_tokens(ws, 3)[0]["run_id"]

    if how == "close-frame":
        ws.close()
    else:
        ws.sock.close()  # no close frame: the TCP connection just ends

    wait_for(lambda: fresh_llm_sim.stats()["streams_closed_early"] >= 1,
             "llm-sim to see its stream closed early")
    run_status(engine, run_id, "cancelled")
    assert metric(engine, "flowgate_engine_stream_disconnects_total",
                  transport="ws") == disconnects + 1
    wait_for(lambda: metric(engine, "flowgate_engine_active_streams", transport="ws") == 0,
             "the connection to be counted as closed")


def test_on_disconnect_continue_runs_to_the_end(engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=40)
    ws = connect(engine)
    ws.send(json.dumps({"type": "run", "flow_id": "sim-chat", "input_value": "go on",
                        "on_disconnect": "continue"}))
    run_id = until_tokens(ws, 3)[0]["run_id"]
    ws.close()

    record = run_status(engine, run_id, "succeeded")
    assert record["result"]["usage"]["output_tokens"] == 40
    assert fresh_llm_sim.stats()["streams_closed_early"] == 0


# -- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "header"), [
    pytest.param("", [], id="no-key"),
    pytest.param("", ["Authorization: Bearer wrong"], id="bad-bearer"),
    pytest.param("?token=wrong", [], id="bad-token"),
])
def test_a_bad_key_refuses_the_handshake_with_401(engine, query, header):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        connect(engine, query, header)

    assert refused.value.status_code == 401
    assert json.loads(refused.value.resp_body)["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(("query", "header"), [
    pytest.param(f"?token={KEY}", [], id="token-query"),
    pytest.param("", [f"Authorization: Bearer {KEY}"], id="bearer"),
])
def test_a_good_key_opens_the_socket(engine, query, header):
    ws = connect(engine, query, header)
    try:
        ws.send(json.dumps({"type": "run", "flow_id": "echo", "input_value": "hi"}))
        assert until_last_event(ws)[-1]["output"] == "[echo: not an LLM] hi"
    finally:
        ws.close()


# -- connection lifetime --------------------------------------------------------------------


def test_the_server_pings_and_a_client_that_answers_stays(tuned_engine):
    # a pong has one interval to arrive: 3 s, so a stall of the client (or of the server's
    # worker) on a loaded machine is not taken for a client that does not answer
    proc = tuned_engine(FLOW_ENGINE_WS_PING_INTERVAL_S="3")
    ws = connect(proc)
    try:
        pings, started = 0, time.monotonic()
        ws.settimeout(10)  # generous bounds: without pings it never ends
        while pings < 2:  # websocket-client answers each ping with a pong as it reads it
            assert time.monotonic() - started < 30, "no pings from the server"
            opcode, _ = ws.recv_data(control_frame=True)
            pings += opcode == websocket.ABNF.OPCODE_PING
        ws.send(json.dumps({"type": "run", "flow_id": "echo", "input_value": "still here"}))
        ws.settimeout(WAIT_S)
        last = until_last_event(ws)[-1]
    finally:
        ws.close()

    assert time.monotonic() - started >= 5.5  # two 3 s intervals: the pongs kept it open
    assert last["output"] == "[echo: not an LLM] still here"


def test_a_client_that_never_answers_pings_is_dropped(tuned_engine):
    proc = tuned_engine(FLOW_ENGINE_WS_PING_INTERVAL_S="1")
    ws = connect(proc)
    try:  # close_frame reads raw frames and answers nothing: no pongs
        code, reason, before = close_frame(ws)
    finally:
        ws.close()

    assert (code, reason) == (1008, "Ping/Pong timeout")
    assert websocket.ABNF.OPCODE_PING in before


def test_an_idle_connection_is_closed_with_1000_and_a_reason(tuned_engine):
    proc = tuned_engine(FLOW_ENGINE_WS_IDLE_TIMEOUT_S="1")
    started = time.monotonic()  # before the server's idle clock starts (at its accept)
    ws = connect(proc)
    try:
        code, reason, _ = close_frame(ws)
    finally:
        ws.close()

    assert (code, reason) == (1000, "idle for 1 s without a run or a message")
    assert time.monotonic() - started >= 0.9  # not before its time (after it: WAIT_S bounds it)


def test_a_message_over_the_body_limit_closes_with_1009(tuned_engine):
    proc = tuned_engine(FLOW_ENGINE_MAX_BODY_BYTES="2000")
    ws = connect(proc)
    try:
        ws.send(json.dumps({"type": "run", "flow_id": "echo", "input_value": "x" * 5000}))
        code, reason, _ = close_frame(ws)
    finally:
        ws.close()

    assert (code, reason) == (1009, "Message is too big")


def test_connections_over_the_cap_are_closed_with_1013(tuned_engine):
    proc = tuned_engine(FLOW_ENGINE_WS_MAX_CONNECTIONS="1")
    first = connect(proc)
    try:
        second = connect(proc)  # the upgrade is accepted, then closed at once
        try:
            code, reason, _ = close_frame(second)
        finally:
            second.close()
        first.send(json.dumps({"type": "run", "flow_id": "echo", "input_value": "first"}))
        assert until_last_event(first)[-1]["type"] == "run_finished"
    finally:
        first.close()

    assert code == 1013
    assert reason == "engine at its limit of 1 WebSocket connections; try again later"
    assert metric(proc, "flowgate_engine_ws_rejected_total", reason="capacity") == 1

    def third_is_served():  # the first one's slot frees once the server has seen it close
        ws = connect(proc)
        try:
            ws.send(json.dumps({"type": "run", "flow_id": "echo", "input_value": "third"}))
            return receive(ws)["type"] == "run_started"
        except websocket.WebSocketException:
            return False
        finally:
            ws.close()

    wait_for(third_is_served, "a connection after the first one closed")
