"""Chat memory over HTTP: a flow with a ChatHistory node sees the earlier turns of the same
``session_id`` (and of no other session); without a session nothing is remembered.

The echo model answers with the *last* message only (the human one), so what the model was
sent — the system message holding ``{history}`` — is read from the streamed
``node_finished`` events of the history and prompt nodes.
"""

from __future__ import annotations

import pytest

EMPTY = "(no earlier messages)"


@pytest.fixture
def chat(client, auth, defs, create_flow, sse_events, event_data):
    """``chat(body)`` streams a run of the chat flow and returns (result, node outputs)."""
    create_flow(defs.chat_memory(id="chat"))

    def run(body: dict) -> tuple[dict, dict[str, object]]:
        resp = client.post("/api/v1/run/chat?stream=true", json=body, headers=auth)
        assert resp.status_code == 200
        events = sse_events(resp)
        assert events[-1].event == "run_finished", events[-1].data
        nodes = {d["node"]: d["output"] for d in map(event_data, events)
                 if "node" in d and "output" in d}
        return event_data(events[-1]), nodes

    return run


def test_the_same_session_sees_the_earlier_turn(chat, echo_prefix):
    first, first_nodes = chat({"input_value": "my name is Ada", "session_id": "s-1"})
    assert first_nodes["hist"] == EMPTY
    assert first["output"] == echo_prefix + "my name is Ada"

    second, nodes = chat({"input_value": "what is my name?", "session_id": "s-1"})

    assert nodes["hist"] == f"Human: my name is Ada\nAI: {first['output']}"
    prompt = nodes["p"]
    assert "Human: my name is Ada" in prompt
    assert f"AI: {first['output']}" in prompt
    assert prompt.rstrip().endswith("what is my name?")
    assert second["output"] == echo_prefix + "what is my name?"


def test_another_session_does_not_see_it(chat):
    chat({"input_value": "my name is Ada", "session_id": "s-1"})

    _, nodes = chat({"input_value": "what is my name?", "session_id": "s-2"})

    assert nodes["hist"] == EMPTY
    assert "Ada" not in nodes["p"]


def test_turns_accumulate_in_order(chat):
    for text in ("one", "two", "three"):
        chat({"input_value": text, "session_id": "s-1"})

    _, nodes = chat({"input_value": "four", "session_id": "s-1"})

    humans = [line for line in nodes["hist"].splitlines() if line.startswith("Human: ")]
    assert humans == ["Human: one", "Human: two", "Human: three"]


def test_without_a_session_nothing_is_remembered(chat):
    chat({"input_value": "my name is Ada"})

    _, nodes = chat({"input_value": "what is my name?"})
    _, later = chat({"input_value": "and now?", "session_id": "s-1"})

    assert nodes["hist"] == EMPTY
    assert "Ada" not in nodes["p"]
    assert later["hist"] == EMPTY


def test_non_streamed_runs_remember_too(client, auth, chat):
    first = client.post("/api/v1/run/chat", json={"input_value": "plain turn", "session_id": "s-1"},
                        headers=auth)
    assert first.status_code == 200

    _, nodes = chat({"input_value": "next", "session_id": "s-1"})

    assert nodes["hist"] == f"Human: plain turn\nAI: {first.get_json()['output']}"
