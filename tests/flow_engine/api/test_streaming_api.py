"""Streamed runs: ``?stream=true`` or ``Accept: text/event-stream`` answer with Server-Sent
Events (DESIGN.md "Run events"), parsed here with sseclient-py chunk by chunk."""

from __future__ import annotations

import pytest

BODY = {"input_value": "stream me please", "session_id": "s-1"}
NODES = [("in", "ChatInput"), ("p", "PromptTemplate"), ("llm", "ChatModel"), ("out", "ChatOutput")]


@pytest.mark.parametrize(("query", "headers"), [
    pytest.param("?stream=true", {}, id="query-flag"),
    pytest.param("", {"Accept": "text/event-stream"}, id="accept-header"),
])
def test_streamed_run_sends_numbered_events_ending_with_the_result(
        client, auth, defs, create_flow, run_flow, sse_events, event_data, query, headers):
    create_flow(defs.echo("Q: {question}", id="f"))

    resp = run_flow("f", BODY, query=query, headers=headers)

    assert resp.status_code == 200
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    events = sse_events(resp)
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    names = [e.event for e in events]
    tokens = [event_data(e) for e in events if e.event == "token"]
    assert tokens, "the echo model streams one token per word"
    expected = ["run_started"]
    for node, _ in NODES:
        expected += ["node_started"] + ["token"] * (len(tokens) if node == "llm" else 0)
        expected += ["node_finished"]
    assert names == [*expected, "run_finished"]

    started, finished = event_data(events[0]), event_data(events[-1])
    assert started == {"run_id": resp.headers["X-Run-ID"], "flow_id": "f", "version": 1,
                       "session_id": "s-1"}
    node_events = [event_data(e) for e in events if e.event.startswith("node_")]
    assert [(d["node"], d["node_type"]) for d in node_events[::2]] == NODES
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert {t["node"] for t in tokens} == {"llm"}
    assert "".join(t["text"] for t in tokens) == finished["output"]
    assert finished["run_id"] == started["run_id"]

    plain = run_flow("f", BODY).get_json()
    drop = {"run_id", "duration_ms"}
    assert {k: v for k, v in finished.items() if k not in drop} == {
        k: v for k, v in plain.items() if k not in drop}
    record = client.get(f"/api/v1/runs/{started['run_id']}", headers=auth).get_json()
    assert (record["status"], record["result"]) == ("succeeded", finished)


@pytest.mark.parametrize(("query", "headers", "streamed"), [
    pytest.param("?stream=false", {"Accept": "text/event-stream"}, False, id="flag-wins-over-accept"),
    pytest.param("?stream=1", {"Accept": "application/json"}, True, id="flag-1"),
    pytest.param("", {"Accept": "application/json"}, False, id="accept-json"),
    pytest.param("", {}, False, id="default-json"),
])
def test_stream_negotiation(defs, create_flow, run_flow, query, headers, streamed):
    create_flow(defs.echo(id="f"))

    resp = run_flow("f", BODY, query=query, headers=headers)

    assert resp.status_code == 200
    assert resp.mimetype == ("text/event-stream" if streamed else "application/json")


def test_a_failing_stream_ends_with_an_error_event(client, auth, defs, create_flow, run_flow,
                                                   sse_events, event_data):
    create_flow(defs.json_parser(id="j"))

    resp = run_flow("j", {"input_value": "not json"}, query="?stream=true")

    assert resp.status_code == 200  # the status went out before the run failed
    events = sse_events(resp)
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert events[0].event == "run_started"
    assert events[-1].event == "error"
    assert "run_finished" not in [e.event for e in events]
    error = event_data(events[-1])
    assert (error["code"], error["node"]) == ("run_failed", "parse")
    assert "Traceback" not in error["message"]
    record = client.get(f"/api/v1/runs/{resp.headers['X-Run-ID']}", headers=auth).get_json()
    assert record["status"] == "failed"
    assert record["error"]["code"] == "run_failed"


def test_stream_errors_before_the_run_starts_are_plain_json(run_flow):
    resp = run_flow("nope", BODY, query="?stream=true")

    assert resp.status_code == 404
    assert resp.mimetype == "application/json"
    assert resp.get_json()["error"]["code"] == "flow_not_found"


def test_a_quiet_run_sends_keep_alive_comments(fresh_llm_sim, make_app, auth, defs, sse_events,
                                              event_data):
    fresh_llm_sim.configure(ttft_s=0.5)  # the LLM is silent for half a second
    client = make_app(openai_base_url=fresh_llm_sim.base_url, sse_keepalive_s=0.1).test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=auth).status_code == 201

    resp = client.post("/api/v1/run/llm?stream=true", json=BODY, headers=auth)

    raw = resp.get_data()
    assert raw.count(b": keep-alive\n\n") >= 2
    assert raw.index(b": keep-alive") < raw.index(b"event: token")
    events = sse_events(resp)  # comments are not events
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert events[-1].event == "run_finished"
    assert "simulated reply" in event_data(events[-1])["output"]
