"""``WS /api/v1/ws/runs`` (flow_engine/api/ws.py): the message protocol, run through the
real app, RunService and store with the echo model (or the llm-sim for slow runs). Only the
WebSocket is a fake: :class:`FakeSocket` takes the place of ``simple_websocket.Server``,
feeding the client's messages and recording what the server sends."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from support.fake_ws import WAIT_S, FakeClock, FakeServers, FakeSocket, install_fake_server
from support.waiting import wait_until

from flow_engine.api.ws import ConnectionLimit, RunSocket, WholeFrames, event_message
from flow_engine.runs.runner import RunEvent

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade"}
WS_PATH = "/api/v1/ws/runs"


class Session:
    """A RunSocket serving a FakeSocket in a thread, as the view serves a real one."""

    def __init__(self, app: Flask, ws: FakeSocket, clock: FakeClock | None = None) -> None:
        eng = app.extensions["flowgate"]
        self.ws = ws
        kwargs = {"clock": clock} if clock is not None else {}
        handler = RunSocket(ws, eng.runs, eng.settings, eng.metrics, trace_id="t" * 32, **kwargs)
        self.thread = threading.Thread(target=handler.serve, daemon=True)
        self.thread.start()

    def run(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        self.ws.feed({"type": "run", **message})
        return self.ws.until_last_event()

    def leave(self) -> None:
        self.ws.disconnect()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the handler did not return after the client left"


@pytest.fixture
def connect(app: Flask) -> Iterator[Callable[..., Session]]:
    """``connect(app=None, clock=None, first=None)``: a served connection, with ``first``
    already waiting in it when the server starts; all are closed afterwards."""
    sessions: list[Session] = []

    def make(on: Flask | None = None, clock: FakeClock | None = None,
             first: dict[str, Any] | None = None) -> Session:
        ws = FakeSocket(clock)
        if first is not None:
            ws.feed(first)
        session = Session(on or app, ws, clock)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        if session.thread.is_alive():
            session.leave()


@pytest.fixture
def slow_app(make_app, fresh_llm_sim, auth, defs) -> Flask:
    """An app whose flow ``slow`` streams from the llm-sim (tune it with configure())."""
    app = make_app(openai_base_url=fresh_llm_sim.base_url)
    resp = app.test_client().post("/api/v1/flows", json=defs.openai(id="slow"), headers=auth)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return app


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    return wait_until(condition, what, timeout)


def run_record(app: Flask, auth: dict[str, str], run_id: str, status: str) -> dict[str, Any]:
    """The run's record once it has ``status`` (streamed runs are recorded as they end)."""
    client = app.test_client()

    def record():
        resp = client.get(f"/api/v1/runs/{run_id}", headers=auth)
        return resp.get_json() if resp.status_code == 200 and resp.get_json()[
            "status"] == status else None

    return wait_for(record, f"run {run_id} to be {status}")


def sample(app: Flask, name: str, **labels: str) -> float | None:
    return app.extensions["flowgate"].metrics.registry.get_sample_value(name, labels)


def until_tokens(ws: FakeSocket, n: int) -> list[dict[str, Any]]:
    messages = [ws.next_message()]
    while sum(m["type"] == "token" for m in messages) < n:
        messages.append(ws.next_message())
    return messages


# -- runs -----------------------------------------------------------------------------------


def test_a_run_sends_numbered_events_ending_with_the_http_result(
        app, client, auth, defs, create_flow, run_flow, connect, metric):
    create_flow(defs.echo("Q: {question}", id="f"))
    session = connect()

    events = session.run({"flow_id": "f", "input_value": "stream me please", "session_id": "s-1"})

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0] == {"type": "run_started", "seq": 1, "run_id": events[0]["run_id"],
                         "flow_id": "f", "version": 1, "session_id": "s-1"}
    nodes = [(e["node"], e["node_type"]) for e in events if e["type"] == "node_started"]
    assert nodes == [("in", "ChatInput"), ("p", "PromptTemplate"), ("llm", "ChatModel"),
                     ("out", "ChatOutput")]
    tokens = [e for e in events if e["type"] == "token"]
    assert tokens and [t["index"] for t in tokens] == list(range(len(tokens)))
    finished = events[-1]
    assert finished["type"] == "run_finished"
    assert "".join(t["text"] for t in tokens) == finished["output"]
    plain = run_flow("f", {"input_value": "stream me please", "session_id": "s-1"}).get_json()
    drop = {"run_id", "duration_ms"}
    assert {k: v for k, v in finished.items() if k not in drop | {"type", "seq"}} == {
        k: v for k, v in plain.items() if k not in drop}
    record = run_record(app, auth, finished["run_id"], "succeeded")
    assert record["result"]["output"] == finished["output"]
    assert metric("flowgate_engine_stream_events_total", transport="ws") == len(events)
    assert metric("flowgate_engine_active_streams", transport="ws") == 1
    session.leave()
    assert metric("flowgate_engine_active_streams", transport="ws") == 0
    assert metric("flowgate_engine_stream_disconnects_total", transport="ws") == 0


def test_runs_follow_one_another_on_one_connection(defs, create_flow, connect):
    """The next run may start the moment the last event of the previous one arrives."""
    create_flow(defs.echo("{question}", id="f"))
    session = connect()

    outputs = [session.run({"flow_id": "f", "input_value": f"turn {i}"})[-1] for i in range(5)]

    assert [o["type"] for o in outputs] == ["run_finished"] * 5
    assert [o["output"] for o in outputs] == [f"[echo: not an LLM] turn {i}" for i in range(5)]


def test_a_failing_run_ends_with_its_error_event(defs, create_flow, connect):
    create_flow(defs.json_parser(id="j"))

    events = connect().run({"flow_id": "j", "input_value": "not json"})

    assert events[0]["type"] == "run_started"
    assert events[-1]["type"] == "error"
    assert events[-1]["seq"] == len(events)
    assert events[-1]["node"] == "parse"
    assert "Traceback" not in json.dumps(events[-1])


def test_an_idempotency_key_replays_the_first_run(defs, create_flow, connect):
    create_flow(defs.echo(id="f"))
    session = connect()
    body = {"flow_id": "f", "input_value": "once", "idempotency_key": "order-42"}

    first = session.run(body)
    again = session.run(body)
    session.ws.feed({"type": "run", **body, "input_value": "different"})
    conflict = session.ws.next_message()

    assert again == first
    assert conflict["code"] == "conflict" and "Idempotency-Key" in conflict["message"]


# -- refused messages -----------------------------------------------------------------------


@pytest.mark.parametrize(("message", "code", "words"), [
    pytest.param(b"\x00binary", "bad_request", "not binary", id="binary"),
    pytest.param("{not json", "bad_request", "malformed JSON", id="not-json"),
    pytest.param("[1, 2]", "bad_request", "JSON object", id="not-an-object"),
    pytest.param({"type": "launch"}, "bad_request", "unknown message type 'launch'", id="unknown-type"),
    pytest.param({"flow_id": "f"}, "bad_request", "unknown message type None", id="no-type"),
    pytest.param({"type": "run"}, "bad_request", "flow_id", id="run-without-flow"),
    pytest.param({"type": "run", "flow_id": "f", "input_value": 7}, "bad_request", "input_value",
                 id="run-bad-input"),
    pytest.param({"type": "run", "flow_id": "f", "version": 0}, "bad_request", "version",
                 id="run-bad-version"),
    pytest.param({"type": "run", "flow_id": "f", "on_disconnect": "explode"}, "bad_request",
                 "on_disconnect", id="run-bad-on-disconnect"),
    pytest.param({"type": "run", "flow_id": "f", "idempotency_key": "has space"}, "bad_request",
                 "idempotency_key", id="run-bad-key"),
    pytest.param({"type": "run", "flow_id": "nope"}, "flow_not_found", "nope", id="unknown-flow"),
    pytest.param({"type": "run", "flow_id": "f", "version": 9}, "not_found", "version",
                 id="unknown-version"),
    pytest.param({"type": "run", "flow_id": "f", "tweaks": {"llm": {"temperature": 9}}},
                 "flow_invalid", "temperature", id="invalid-tweaks"),
    pytest.param({"type": "watch"}, "bad_request", "run_id", id="watch-without-run"),
    pytest.param({"type": "watch", "run_id": "r", "last_event_id": -1}, "bad_request",
                 "last_event_id", id="watch-negative-id"),
    pytest.param({"type": "watch", "run_id": "no-such-run"}, "run_not_found", "no-such-run",
                 id="watch-unknown-run"),
    pytest.param({"type": "cancel"}, "conflict", "no run in progress", id="cancel-nothing"),
])
def test_a_refused_message_gets_an_error_and_the_connection_goes_on(
        defs, create_flow, connect, message, code, words):
    create_flow(defs.echo(id="f"))
    session = connect()

    session.ws.feed(message)
    error = session.ws.next_message()

    assert error["type"] == "error"
    assert error["code"] == code, error
    assert words in error["message"]
    assert "seq" not in error  # a refusal, not a run's error event
    assert error["trace_id"] == "t" * 32
    assert "Traceback" not in json.dumps(error)
    if code == "flow_invalid":
        assert error["problems"] and error["problems"][0]["path"].startswith("$.")
    assert session.run({"flow_id": "f", "input_value": "still here"})[-1]["type"] == "run_finished"


def test_an_unexpected_failure_is_an_internal_error_without_details(app, defs, create_flow,
                                                                    connect, monkeypatch):
    create_flow(defs.echo(id="f"))
    runs = app.extensions["flowgate"].runs

    def explode(*args, **kwargs):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(runs, "prepare", explode)
    session = connect()
    session.ws.feed({"type": "run", "flow_id": "f"})
    error = session.ws.next_message()

    assert (error["type"], error["code"]) == ("error", "internal")
    assert "secret" not in json.dumps(error)


# -- one run at a time, cancel, disconnect ----------------------------------------------------


def test_a_second_run_while_one_runs_is_busy_and_the_first_goes_on(slow_app, fresh_llm_sim,
                                                                   connect):
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=500)  # ~10 s: it is still running
    session = connect(slow_app)
    session.ws.feed({"type": "run", "flow_id": "slow", "input_value": "first"})
    started = session.ws.next_message()

    session.ws.feed({"type": "run", "flow_id": "slow", "input_value": "second"})
    session.ws.feed({"type": "watch", "run_id": started["run_id"]})
    rest = [session.ws.next_message()]
    while sum(m["type"] == "busy" or m.get("code") == "busy" for m in rest) < 2:
        rest.append(session.ws.next_message())
    rest += until_tokens(session.ws, 1)  # the first run goes on after both refusals
    session.ws.feed({"type": "cancel"})
    rest += session.ws.until_last_event()

    busy = [m for m in rest if m["type"] == "error" and "seq" not in m]
    assert [b["code"] for b in busy] == ["busy", "busy"]
    assert busy[0]["run_id"] == started["run_id"]
    assert {m["run_id"] for m in rest if m["type"] in ("run_started", "run_finished")} <= {
        started["run_id"]}
    assert (rest[-1]["type"], rest[-1]["code"]) == ("error", "run_cancelled")
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1
    # the cancelled run's LLM stream is closed before the next test counts closed streams
    wait_for(lambda: fresh_llm_sim.stats()["streams_closed_early"] == 1,
             "the LLM stream to be closed early")


def test_cancel_ends_the_run_with_a_run_cancelled_error(slow_app, fresh_llm_sim, auth, connect):
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=500)  # ~10 s if never cancelled
    session = connect(slow_app)
    session.ws.feed({"type": "run", "flow_id": "slow", "input_value": "long one"})
    before = until_tokens(session.ws, 3)

    session.ws.feed({"type": "cancel"})
    after = session.ws.until_last_event()

    last = after[-1]
    assert (last["type"], last["code"]) == ("error", "run_cancelled")
    assert "cancelled by the WebSocket client" in last["message"]
    assert last["seq"] == before[-1]["seq"] + len(after)
    run_record(slow_app, auth, before[0]["run_id"], "cancelled")
    wait_for(lambda: fresh_llm_sim.stats()["streams_closed_early"] == 1,
             "the LLM stream to be closed early")


def test_a_client_leaving_mid_run_cancels_it(slow_app, fresh_llm_sim, auth, connect):
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=500)
    session = connect(slow_app)
    session.ws.feed({"type": "run", "flow_id": "slow", "input_value": "long one"})
    run_id = until_tokens(session.ws, 3)[0]["run_id"]

    session.leave()

    record = run_record(slow_app, auth, run_id, "cancelled")
    assert record["error"]["code"] == "run_cancelled"
    assert "the WebSocket client went away" in record["error"]["message"]
    wait_for(lambda: fresh_llm_sim.stats()["streams_closed_early"] == 1,
             "the LLM stream to be closed early")
    assert sample(slow_app, "flowgate_engine_stream_disconnects_total", transport="ws") == 1
    assert sample(slow_app, "flowgate_engine_active_streams", transport="ws") == 0


def test_on_disconnect_continue_lets_the_run_finish(slow_app, fresh_llm_sim, auth, connect):
    fresh_llm_sim.configure(tokens_per_s=100, reply_tokens=40)
    session = connect(slow_app)
    session.ws.feed({"type": "run", "flow_id": "slow", "input_value": "keep going",
                     "on_disconnect": "continue"})
    run_id = until_tokens(session.ws, 3)[0]["run_id"]

    session.leave()

    record = run_record(slow_app, auth, run_id, "succeeded")
    assert record["result"]["usage"]["output_tokens"] == 40
    assert fresh_llm_sim.stats()["streams_closed_early"] == 0


# -- watch ----------------------------------------------------------------------------------


def test_watch_replays_after_last_event_id_then_follows_live(slow_app, fresh_llm_sim, connect):
    fresh_llm_sim.configure(tokens_per_s=100, reply_tokens=40)
    runner, watcher = connect(slow_app), connect(slow_app)
    runner.ws.feed({"type": "run", "flow_id": "slow", "input_value": "watch me"})
    head = until_tokens(runner.ws, 2)

    watcher.ws.feed({"type": "watch", "run_id": head[0]["run_id"], "last_event_id": 2})
    watched = watcher.ws.until_last_event()
    ran = head + runner.ws.until_last_event()

    assert watched == ran[2:]
    watcher.ws.feed({"type": "watch", "run_id": head[0]["run_id"]})  # a finished run: replayed
    assert watcher.ws.until_last_event() == ran


def test_cancel_while_watching_cancels_the_watched_run(slow_app, fresh_llm_sim, auth, connect):
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=500)
    runner, watcher = connect(slow_app), connect(slow_app)
    runner.ws.feed({"type": "run", "flow_id": "slow", "input_value": "long one",
                    "on_disconnect": "continue"})
    run_id = until_tokens(runner.ws, 2)[0]["run_id"]
    watcher.ws.feed({"type": "watch", "run_id": run_id})
    until_tokens(watcher.ws, 3)

    watcher.ws.feed({"type": "cancel"})

    assert watcher.ws.until_last_event()[-1]["code"] == "run_cancelled"
    assert runner.ws.until_last_event()[-1]["code"] == "run_cancelled"


# -- idle timeout ---------------------------------------------------------------------------


def test_an_idle_connection_is_closed_with_a_reason(make_app, connect):
    clock = FakeClock()
    session = connect(make_app(ws_idle_timeout_s=300), clock)

    assert session.ws.closed.wait(WAIT_S)
    session.thread.join(WAIT_S)

    assert session.ws.close_code == 1000
    assert session.ws.close_reason == "idle for 300 s without a run or a message"
    assert clock.now >= 1300


def test_messages_and_runs_keep_a_connection_open(slow_app, fresh_llm_sim, connect):
    """With a fake clock every silent moment is a whole idle timeout: only a run in
    progress keeps the connection open through them; the countdown restarts at its end."""
    fresh_llm_sim.configure(ttft_s=0.5, tokens_per_s=50, reply_tokens=20)
    clock = FakeClock()
    started_at = clock.now
    # the run is there from the start: fed after, a test thread late by the socket's wait
    # would find the connection closed as idle already
    session = connect(slow_app, clock, first={"type": "run", "flow_id": "slow",
                                              "input_value": "slow one"})

    events = session.ws.until_last_event()
    assert session.ws.closed.wait(WAIT_S)

    assert events[-1]["type"] == "run_finished"
    assert clock.now - started_at > 3 * 300  # many idle periods passed during the run
    assert session.ws.close_code == 1000


def test_idle_timeout_zero_never_closes(make_app, connect):
    session = connect(make_app(ws_idle_timeout_s=0), FakeClock())
    time.sleep(0.3)
    assert session.thread.is_alive() and session.ws.close_code is None


# -- the route: handshake, auth, options, capacity ------------------------------------------


@pytest.fixture
def fake_server(monkeypatch) -> FakeServers:
    return install_fake_server(monkeypatch)


def _handshake(client, query: str = "", headers: dict[str, str] | None = None):
    return client.get(WS_PATH + query, headers={**UPGRADE, **(headers or {})})


@pytest.mark.parametrize(("query", "headers"), [
    pytest.param("", {}, id="no-key"),
    pytest.param("", {"Authorization": "Bearer wrong"}, id="bad-bearer"),
    pytest.param("?token=wrong", {}, id="bad-token"),
    pytest.param("?token=", {}, id="empty-token"),
])
def test_a_handshake_without_a_good_key_is_refused_with_401(client, fake_server, query, headers):
    resp = _handshake(client, query, headers)

    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "unauthorized"
    assert fake_server.built == []  # no WebSocket was accepted


@pytest.mark.parametrize(("query", "headers"), [
    pytest.param("", {"Authorization": "Bearer test-key"}, id="bearer"),
    pytest.param("", {"x-api-key": "second-key"}, id="x-api-key"),
    pytest.param("?token=test-key", {}, id="token-query"),
])
def test_a_handshake_with_a_good_key_is_accepted(client, fake_server, query, headers):
    ws = FakeSocket()
    fake_server.pending.append(ws)
    ws.disconnect()

    _handshake(client, query, headers)

    assert [s for s, _ in fake_server.built] == [ws]


@pytest.mark.parametrize(("origin", "allowed", "accepted"), [
    pytest.param(None, "", True, id="no-origin-not-a-browser"),
    pytest.param("http://localhost", "", True, id="same-origin"),
    pytest.param("http://evil.example", "", False, id="another-site"),
    pytest.param("http://localhost:8001", "", False, id="another-port"),
    pytest.param("https://localhost", "", False, id="another-scheme"),
    pytest.param("null", "", False, id="opaque-origin"),
    pytest.param("https://console.example", "https://console.example", True, id="listed"),
    pytest.param("http://evil.example", "*", True, id="any-when-configured"),
])
def test_a_browser_page_of_another_origin_cannot_open_the_socket(make_app, fake_server, origin,
                                                                 allowed, accepted):
    client = make_app(ws_allowed_origins=allowed).test_client()
    ws = FakeSocket()
    ws.disconnect()
    fake_server.pending.append(ws)
    headers = {"x-api-key": "test-key"} | ({"Origin": origin} if origin else {})

    resp = _handshake(client, headers=headers)

    if accepted:
        assert [s for s, _ in fake_server.built] == [ws]
    else:
        assert resp.status_code == 403
        assert "FLOW_ENGINE_WS_ALLOWED_ORIGINS" in resp.get_json()["error"]["message"]
        assert fake_server.built == []


def test_the_token_query_parameter_is_only_for_websocket_handshakes(client, auth):
    assert client.get("/api/v1/flows?token=test-key").status_code == 401
    assert client.get(WS_PATH + "?token=test-key").status_code == 401  # not an upgrade
    plain = client.get(WS_PATH, headers=auth)
    assert plain.status_code == 400
    assert plain.get_json()["error"]["code"] == "bad_request"


def test_heartbeat_and_message_limit_come_from_settings(make_app, fake_server):
    for interval, expected in ((7.5, 7.5), (0, None)):
        app = make_app(ws_ping_interval_s=interval, max_body_bytes=1234)
        ws = FakeSocket()
        ws.disconnect()
        fake_server.pending.append(ws)
        _handshake(app.test_client(), headers={"x-api-key": "test-key"})
        assert fake_server.built[-1][1] == {"ping_interval": expected, "max_message_size": 1234}


def test_connections_over_the_limit_are_closed_with_1013(make_app, fake_server, metric):
    app = make_app(ws_max_connections=1)
    first, second, third = FakeSocket(), FakeSocket(), FakeSocket()
    fake_server.pending.extend([first, second, third])
    headers = {"x-api-key": "test-key"}
    holder = threading.Thread(target=_handshake, args=(app.test_client(), "", headers),
                              daemon=True)
    holder.start()
    wait_for(lambda: len(fake_server.built) == 1, "the first connection")

    _handshake(app.test_client(), "", headers)
    first.disconnect()
    holder.join(WAIT_S)
    third.disconnect()
    _handshake(app.test_client(), "", headers)

    assert (second.close_code, second.close_reason) == (
        1013, "engine at its limit of 1 WebSocket connections; try again later")
    assert first.close_code is None and third.close_code is None  # served until they left
    assert sample(app, "flowgate_engine_ws_rejected_total", reason="capacity") == 1
    assert sample(app, "flowgate_engine_active_streams", transport="ws") == 0


def test_connection_limit_counts_open_connections():
    limit = ConnectionLimit(2)
    assert [limit.acquire(), limit.acquire(), limit.acquire()] == [True, True, False]
    limit.release()
    assert limit.acquire() is True


# -- framing --------------------------------------------------------------------------------


def test_node_events_name_the_node_type_node_type():
    message = event_message(RunEvent(4, "node_started", {"node": "llm", "node_type": "ChatModel"}))
    assert message == {"type": "node_started", "seq": 4, "node": "llm", "node_type": "ChatModel"}
    assert event_message(RunEvent(0, "run_finished", {"output": "x"}))["seq"] is None


class ShortWritingSocket:
    """Like a non-blocking socket under gevent: ``send`` takes at most 1000 bytes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False

    def send(self, data: bytes, *flags: int) -> int:
        self.received += data[:1000]
        return min(len(data), 1000)

    def sendall(self, data: bytes, *flags: int) -> None:
        while data:
            data = data[self.send(data):]

    def close(self) -> None:
        self.closed = True


def test_whole_frames_writes_every_byte_and_passes_the_rest_through():
    raw = ShortWritingSocket()
    sock = WholeFrames(raw)

    assert sock.send(b"x" * 25_000) == 25_000
    sock.close()

    assert bytes(raw.received) == b"x" * 25_000
    assert raw.closed
