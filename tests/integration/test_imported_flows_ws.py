"""An imported LangFlow flow over the engine's WebSocket (``WS /api/v1/ws/runs``): a real
`flowgate engine` (gunicorn, one gevent worker) on a free port, the real llm-sim behind it,
examples/langflow/agent-calculator.json imported through ``POST /api/v1/flows/import`` and
run beside its hand-written Flowgate equivalent. Both answer the same, through the same
Calculator call, and the tool events name the Agent node that made them."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from support.keys import KEYS, SECRETS, as_
from support.procs import ServerProcess, free_port

pytestmark = pytest.mark.integration
WAIT_S = 30
EXPORT = Path(__file__).resolve().parents[2] / "examples" / "langflow" / "agent-calculator.json"
QUESTION = "What is (12 + 30) * 2?"
IMPORTED_AGENT = "Agent-4g3nt"  # the Agent's node id in the export, kept by the import
HAND_WRITTEN = {
    "id": "hand-agent", "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "calc", "type": "Calculator"},
        {"id": "history", "type": "ChatHistory", "params": {"empty_text": ""}},
        {"id": "agent", "type": "Agent", "params": {
            "model": "flowgate-sim", "tools": ["calc"], "max_iterations": 5,
            "system_prompt": "You are exact. Use the calculator for arithmetic."}},
        {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "agent", "target_input": "input"},
              {"source": "calc", "target": "agent", "target_input": "tools.calc"},
              {"source": "history", "target": "agent", "target_input": "history"},
              {"source": "agent", "target": "out"}]}


@pytest.fixture(scope="module")
def engine(tmp_path_factory, llm_sim) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("engine-imported-ws")
    port = free_port()
    proc = ServerProcess(
        [sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)],
        port=port, ready_path="/readyz", name="engine", ready_timeout=30, cwd=tmp,
        env={"FLOW_ENGINE_API_KEYS": KEYS, "DATABASE_URL": f"sqlite:///{tmp / 'engine.db'}",
             "OPENAI_BASE_URL": llm_sim.base_url, "FLOW_ENGINE_WORKERS": "1",
             "FLOW_ENGINE_GRACEFUL_TIMEOUT": "1",
             "PROMETHEUS_MULTIPROC_DIR": str(tmp / "metrics")}).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def flows(engine) -> dict[str, str]:
    """The imported flow's id and the hand-written one's, each live at version 1."""
    export = json.loads(EXPORT.read_text(encoding="utf-8"))
    imported = requests.post(engine.url + "/api/v1/flows/import", headers=as_("editor"),
                             json={"format": "langflow", "flow": export}, timeout=30)
    assert imported.status_code == 201, imported.text
    assert imported.json()["live"] is True
    hand = requests.post(engine.url + "/api/v1/flows", headers=as_("editor"), json=HAND_WRITTEN,
                         timeout=30)
    assert hand.status_code == 201, hand.text
    return {"imported": imported.json()["flow"]["id"], "hand": HAND_WRITTEN["id"]}


def over_ws(engine: ServerProcess, flow_id: str, text: str) -> list[dict[str, Any]]:
    """Every event of one run over the WebSocket, up to its last (runner's key)."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{engine.port}/api/v1/ws/runs",
                                     timeout=WAIT_S,
                                     header=[f"x-api-key: {SECRETS['runner']}"])
    try:
        ws.send(json.dumps({"type": "run", "flow_id": flow_id, "input_value": text}))
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + WAIT_S
        while not events or not (events[-1]["type"] in ("run_finished", "error")
                                 and "seq" in events[-1]):
            assert time.monotonic() < deadline, events[-3:]
            events.append(json.loads(ws.recv()))
        return events
    finally:
        ws.close()


def tool_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] in ("tool_call", "tool_result")]


def test_an_imported_agent_answers_over_the_websocket_as_the_hand_written_one(
        engine, flows, fresh_llm_sim) -> None:
    imported = over_ws(engine, flows["imported"], QUESTION)
    hand = over_ws(engine, flows["hand"], QUESTION)
    plain = requests.post(f"{engine.url}/api/v1/run/{flows['imported']}", headers=as_("runner"),
                          json={"input_value": QUESTION}, timeout=30)

    assert imported[-1]["type"] == "run_finished", imported[-1]
    assert hand[-1]["type"] == "run_finished", hand[-1]
    answer = imported[-1]["output"]
    assert answer.startswith('[simulated reply] calculator: "84"')
    assert answer == hand[-1]["output"] == plain.json()["output"]
    assert imported[-1]["usage"] == hand[-1]["usage"]
    assert imported[-1]["usage"]["llm_calls"] == 2
    tokens = "".join(e["text"] for e in imported if e["type"] == "token")
    assert tokens == answer


@pytest.mark.parametrize(("which", "agent"), [("imported", IMPORTED_AGENT), ("hand", "agent")])
def test_the_tool_events_carry_the_agents_node_id(engine, flows, fresh_llm_sim, which: str,
                                                  agent: str) -> None:
    events = over_ws(engine, flows[which], QUESTION)

    call, result = tool_events(events)
    assert (call["type"], call["node"], call["tool"], call["args"]) == (
        "tool_call", agent, "calculator", {"expression": "(12 + 30) * 2"})
    assert (result["type"], result["node"], result["tool"], result["status"],
            result["output"]) == ("tool_result", agent, "calculator", "success", "84")
    assert result["call_id"] == call["call_id"]
    kinds = [e["type"] for e in events]
    assert kinds.index("tool_result") < kinds.index("token") < kinds.index("run_finished")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
