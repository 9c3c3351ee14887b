"""Text holding a lone surrogate: ``"caf\\ud800"`` is valid JSON and decodes to a string
UTF-8 cannot encode. Runs whose input or output holds one stream, are recorded and answered
like any other (the surrogate escaped as ``\\ud800`` in JSON, never as invalid UTF-8 bytes),
on both store backends; a flow name holding one is a 422, not a 500.

Bodies are sent as raw JSON text: ``json.dumps`` of a Python string would escape the
surrogate just the same, but the test should not depend on the client's encoder."""

from __future__ import annotations

import json
import threading

import pytest
from support.fake_ws import WAIT_S, FakeSocket

from flow_engine.api.ws import RunSocket

LONE = "caf\ud800"
RAW_INPUT = '{"input_value": "caf\\ud800", "session_id": "s\\ud800"}'
JSON = {"Content-Type": "application/json"}


def post_raw(client, auth, path: str, text: str):
    return client.post(path, data=text.encode(), headers={**auth, **JSON})


def test_a_streamed_run_with_a_lone_surrogate_ends_with_its_result(client, auth, defs,
                                                                   create_flow, echo_prefix):
    create_flow(defs.echo("{question}", id="f"))

    resp = post_raw(client, auth, "/api/v1/run/f?stream=true", RAW_INPUT)

    raw = resp.get_data()  # the whole stream: valid UTF-8, every event there
    assert resp.status_code == 200
    text = raw.decode("utf-8")  # strict: would raise on surrogatepass bytes
    events = [block.split("\n") for block in text.strip().split("\n\n")]
    names = [lines[-2].removeprefix("event: ") for lines in events]
    assert names[0] == "run_started" and names[-1] == "run_finished"
    finished = json.loads(events[-1][-1].removeprefix("data: "))
    assert finished["output"] == echo_prefix + LONE
    assert "\\ud800" in events[-1][-1], "escaped in the JSON, not written as bytes"


def test_the_record_of_a_run_with_a_lone_surrogate_is_written_and_read(app, client, auth, defs,
                                                                        create_flow, echo_prefix):
    create_flow(defs.echo("{question}", id="f"))

    resp = post_raw(client, auth, "/api/v1/run/f", RAW_INPUT)
    app.extensions["flowgate"].runs.executor.flush()  # read from the store, not from memory

    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["output"] == echo_prefix + LONE
    record = client.get(f"/api/v1/runs/{resp.headers['X-Run-ID']}", headers=auth)
    assert record.status_code == 200
    body = record.get_json()
    assert body["status"] == "succeeded"
    assert body["output"] == echo_prefix + LONE  # a JSON column keeps the escape
    assert body["session_id"] == "s\ufffd"  # a text column holds characters: U+FFFD


def test_chat_history_with_a_lone_surrogate_is_stored(client, auth, defs, create_flow):
    create_flow(defs.chat_memory(id="chat"))

    for _ in range(2):
        resp = post_raw(client, auth, "/api/v1/run/chat", RAW_INPUT)
        assert resp.status_code == 200, resp.get_data(as_text=True)

    second = resp.get_json()["outputs"][0]["outputs"][0]["results"]["message"]["text"]
    assert second.endswith(LONE)


@pytest.mark.parametrize("field", ["name", "description"])
def test_a_flow_name_with_a_lone_surrogate_is_a_422_at_its_path(client, auth, defs, field):
    definition = json.dumps(defs.echo(id="f", **{field: "x"})).replace('"x"', '"caf\\ud800"')

    resp = post_raw(client, auth, "/api/v1/flows", definition)

    assert resp.status_code == 422, resp.get_data(as_text=True)
    problems = resp.get_json()["error"]["problems"]
    assert [p["path"] for p in problems] == [f"$.{field}"]
    assert "lone surrogate" in problems[0]["message"]


def test_a_websocket_run_of_a_flow_id_with_a_lone_surrogate_is_flow_not_found(app):
    eng = app.extensions["flowgate"]
    ws = FakeSocket()
    handler = RunSocket(ws, eng.runs, eng.settings, eng.metrics, trace_id="t" * 32)
    thread = threading.Thread(target=handler.serve, daemon=True)
    thread.start()
    try:
        ws.feed('{"type": "run", "flow_id": "caf\\ud800", "input_value": "hi"}')
        answer = ws.next_message()
    finally:
        ws.disconnect()
        thread.join(WAIT_S)

    assert (answer["type"], answer["code"]) == ("error", "flow_not_found")
