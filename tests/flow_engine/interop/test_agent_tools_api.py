"""An Agent with a Calculator and a FlowTool, run through the engine's API on the real
llm-sim: it answers through two tool calls, the called flow runs its live version inside
the run (its tenant, session and trace; cycles refused), and the events say so."""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import pytest
import sseclient
from support.keys import KEYS, as_, tenant
from support.prom import metric_value

from flow_engine.auth import parse_key, principal_for
from flow_engine.store.base import ChatMessage

QUESTION = "Ask orders about order 42, then use the calculator for 6*7"
ORDERS = {"id": "orders", "nodes": [
    {"id": "in", "type": "ChatInput"},
    {"id": "hist", "type": "ChatHistory", "params": {"empty_text": "(none)"}},
    {"id": "p", "type": "ChatPromptTemplate", "params": {
        "system": "You look orders up. Earlier: {history}", "human": "{q}"}},
    {"id": "llm", "type": "ChatModel", "params": {"model": "flowgate-sim"}},
    {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "p", "target_input": "q"},
              {"source": "hist", "target": "p", "target_input": "history"},
              {"source": "p", "target": "llm"}, {"source": "llm", "target": "out"}]}


def assistant(flow_tool: str = "orders", flow_id: str = "assistant") -> dict[str, Any]:
    return {"id": flow_id, "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "calc", "type": "Calculator"},
        {"id": "orders", "type": "FlowTool", "params": {
            "flow_id": flow_tool, "name": "orders", "description": "Looks an order up."}},
        {"id": "agent", "type": "Agent", "params": {
            "model": "flowgate-sim", "tools": ["calc", "orders"], "system_prompt": "Help."}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "agent", "target_input": "input"},
                  {"source": "calc", "target": "agent", "target_input": "tools.calc"},
                  {"source": "orders", "target": "agent", "target_input": "tools.orders"},
                  {"source": "agent", "target": "out"}]}


def create(client: Any, definition: dict[str, Any]) -> None:
    resp = client.post("/api/v1/flows", headers=as_("editor"), json=definition)
    assert resp.status_code == 201, resp.get_data(as_text=True)


def run(client: Any, flow_id: str, text: str, headers: dict[str, str] | None = None,
        **body: Any) -> Any:
    resp = client.post(f"/api/v1/run/{flow_id}", headers=headers or as_("runner"),
                       json={"input_value": text, **body})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp


def tool_messages(sim: Any) -> list[str]:
    return [m["content"] for r in sim.requests() for m in r["body"]["messages"]
            if m["role"] == "tool"]


def test_the_agent_answers_through_a_flow_and_the_calculator(engine_client, fresh_llm_sim) -> None:
    create(engine_client, ORDERS)
    create(engine_client, assistant())

    out = run(engine_client, "assistant", QUESTION).get_json()

    requests = [r["body"] for r in fresh_llm_sim.requests()]
    assert len(requests) == 4  # the agent asks twice and answers; the orders flow once
    agent_first, orders_flow, agent_second, agent_last = requests
    assert orders_flow["messages"] == [
        {"role": "system", "content": "You look orders up. Earlier: (none)"},
        {"role": "user", "content": QUESTION}]  # the argument the model gave the tool
    [orders_answer, product] = tool_messages(fresh_llm_sim)[-2:]
    assert orders_answer.startswith('[simulated reply] you said: "Ask orders about order 42,')
    assert product == "42"
    assert out["output"].startswith('[simulated reply] orders: "[simulated reply] you said: '
                                    '"Ask orders about order..." calculator: "42"')
    assert [t["function"]["name"] for t in agent_first["tools"]] == ["calculator", "orders"]
    assert agent_second["messages"][-1]["role"] == "tool"
    assert agent_last["messages"][-1] == {"role": "tool", "content": "42",
                                          "tool_call_id": agent_last["messages"][-2][
                                              "tool_calls"][0]["id"]}


def test_the_called_flow_runs_its_live_version(engine_client, fresh_llm_sim) -> None:
    create(engine_client, ORDERS)
    create(engine_client, assistant())
    v2 = json.loads(json.dumps(ORDERS).replace("You look orders up.", "Version two."))
    assert engine_client.put("/api/v1/flows/orders", headers=as_("editor"),
                             json=v2).status_code == 201

    run(engine_client, "assistant", QUESTION)
    before = fresh_llm_sim.requests()[1]["body"]["messages"][0]["content"]
    engine_client.post("/api/v1/flows/orders/publish", headers=as_("publisher"), json={"version": 2})
    fresh_llm_sim.reset()
    run(engine_client, "assistant", QUESTION)
    after = fresh_llm_sim.requests()[1]["body"]["messages"][0]["content"]

    assert (before, after) == ("You look orders up. Earlier: (none)", "Version two. Earlier: (none)")


def test_a_flow_never_calls_a_flow_running_above_it(engine_client, fresh_llm_sim) -> None:
    create(engine_client, assistant(flow_tool="assistant"))

    out = run(engine_client, "assistant", "ask orders").get_json()

    refusals = [t for t in tool_messages(fresh_llm_sim) if "already running above it" in t]
    assert refusals and refusals[0].startswith(
        "a flow may not call a flow that is already running above it: ")
    assert refusals[0].endswith("assistant → assistant")
    assert out["output"].startswith("[simulated reply] orders:")


def test_an_unknown_flow_is_the_tools_answer(engine_client, fresh_llm_sim) -> None:
    create(engine_client, assistant(flow_tool="no-such-flow"))

    run(engine_client, "assistant", "ask orders")

    assert tool_messages(fresh_llm_sim) == ["there is no flow 'no-such-flow'"]


def test_tool_events_stream_between_the_agents_tokens(engine_client, fresh_llm_sim) -> None:
    create(engine_client, ORDERS)
    create(engine_client, assistant())

    resp = engine_client.post("/api/v1/run/assistant?stream=true", headers=as_("runner"),
                              json={"input_value": QUESTION})
    events = [(e.event, json.loads(e.data)) for e in sseclient.SSEClient(resp.iter_encoded()).events()]

    tools = [(kind, data["tool"], data.get("status")) for kind, data in events
             if kind in ("tool_call", "tool_result")]
    assert tools == [("tool_call", "orders", None), ("tool_result", "orders", "success"),
                     ("tool_call", "calculator", None), ("tool_result", "calculator", "success")]
    assert all(data["node"] == "agent" for kind, data in events if kind.startswith("tool_"))
    kinds = [kind for kind, _ in events]
    assert kinds.index("tool_result") < kinds.index("token") < kinds.index("run_finished")
    usage = events[-1][1]["usage"]
    assert usage["llm_calls"] == 4  # the orders flow's call counts in the run's usage


@pytest.mark.parametrize(("caller", "sees"), [("t1", True), ("t2", False)])
def test_the_called_flow_runs_for_the_callers_tenant_and_session(
        engine_client, make_engine, fresh_llm_sim, caller: str, sees: bool) -> None:
    create(engine_client, ORDERS)
    create(engine_client, assistant())
    store = engine_client.application.extensions["flowgate"].store
    t1 = principal_for(parse_key(KEYS.split(",")[-1]), None, "t1").tenant  # as the engine names it
    store.append_chat(t1, "s1", "orders", [ChatMessage("human", "my order is 42"),
                                           ChatMessage("ai", "noted")])

    run(engine_client, "assistant", QUESTION, headers=tenant(caller), session_id="s1")

    system = fresh_llm_sim.requests()[1]["body"]["messages"][0]["content"]
    assert ("Human: my order is 42" in system) is sees


def test_the_called_flow_carries_the_callers_trace(engine_client, caplog) -> None:
    create(engine_client, ORDERS)
    create(engine_client, assistant())

    with caplog.at_level(logging.INFO, logger="flow_engine.components.subflows"):
        resp = run(engine_client, "assistant", QUESTION)

    [record] = [r for r in caplog.records if r.getMessage() == "subflow"]
    assert record.trace_id == resp.headers["X-Trace-ID"]
    assert (record.flow_id, record.parent_flow_id, record.depth) == ("orders", "assistant", 2)


def test_the_called_flow_is_logged_with_the_callers_identity(engine_client, caplog) -> None:
    """Whose call a sub-flow serves is in its log record: the tenant and the end user the
    ambassador forwarded (x-flowgate-identity), as the caller's own run has them."""
    create(engine_client, ORDERS)
    create(engine_client, assistant())

    with caplog.at_level(logging.INFO, logger="flow_engine.components.subflows"):
        run(engine_client, "assistant", QUESTION, headers=tenant("t1", identity="user-7"))

    [record] = [r for r in caplog.records if r.getMessage() == "subflow"]
    assert (record.identity, record.tenant) == ("user-7", principal_for(
        parse_key(KEYS.split(",")[-1]), "user-7", "t1").tenant)


def orders_with(*models: str) -> dict[str, Any]:
    """The orders flow, its answer made by a chain of these models."""
    nodes = [n for n in ORDERS["nodes"] if n["type"] != "ChatModel"]
    nodes += [{"id": f"llm{i}", "type": "ChatModel", "params": {"model": m}}
              for i, m in enumerate(models)]
    edges = [e for e in ORDERS["edges"] if "llm" not in (e["source"], e["target"])]
    chain = ["p", *(f"llm{i}" for i in range(len(models))), "out"]
    edges += [{"source": a, "target": b} for a, b in itertools.pairwise(chain)]
    return {**ORDERS, "nodes": nodes, "edges": edges}


def llm_calls(client: Any, model: str, outcome: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    return metric_value(text, "flowgate_engine_llm_calls_total", model=model, outcome=outcome)


def test_the_called_flows_llm_calls_are_in_the_per_model_figures(engine_client,
                                                                 fresh_llm_sim) -> None:
    create(engine_client, orders_with("orders-model"))
    create(engine_client, assistant())

    out = run(engine_client, "assistant", QUESTION).get_json()

    assert llm_calls(engine_client, "orders-model", "ok") == 1
    assert llm_calls(engine_client, "flowgate-sim", "ok") == 3
    assert out["usage"]["llm_calls"] == 4


def test_a_called_flow_that_fails_after_an_llm_call_still_has_its_calls_counted(
        engine_client, fresh_llm_sim) -> None:
    """The sub-flow's first model answers, its second fails: the tool answers the error and
    the agent goes on. What the first call cost is the run's (the tenant's budget is charged
    it), and both calls are in the per-model figures — the failure is what an SRE looks for."""
    create(engine_client, orders_with("orders-model", "broken-model"))
    create(engine_client, assistant())
    fresh_llm_sim.configure(model_error_rates={"broken-model": 1.0}, error_kinds=["500"])

    out = run(engine_client, "assistant", QUESTION).get_json()

    assert tool_messages(fresh_llm_sim)[0].startswith("flow 'orders' failed")
    assert llm_calls(engine_client, "orders-model", "ok") == 1
    # (a model no call has succeeded with is counted as "other": metrics.ModelLabels)
    assert llm_calls(engine_client, "other", "error") >= 1
    assert out["usage"]["llm_calls"] == 4  # the agent's three, the sub-flow's one that answered
    orders_call = next(r for r in fresh_llm_sim.requests() if r["body"]["model"] == "orders-model")
    assert orders_call["body"]["messages"][-1]["content"] == QUESTION  # it did reach the model
