"""The Agent node: its tool-calling loop against the real llm-sim over HTTP (llm-sim's tool
rule: flowgate/llm_sim.py), compiled and run by the engine's own compiler and runner."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from flow_engine.components import default_registry
from flow_engine.components.agent import AgentIterationLimit, AgentRunnable
from flow_engine.components.base import BuildContext, Limits
from flow_engine.components.tools import Calculator
from flow_engine.egress import ProviderOrigins
from flow_engine.errors import FlowInvalid, RunCancelled, RunFailed
from flow_engine.flows.compile import compile_flow
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.validate import apply_tweaks, validate_flow
from flow_engine.runs import runner
from flow_engine.runs.recorder import RunRecorder
from flow_engine.runs.runner import CancelToken, RunInput
from flowgate.llm_sim import count_prompt_tokens

REGISTRY = default_registry()
SYSTEM = "You are exact. Use the calculator for arithmetic."
QUESTION = "What is (12 + 30) * 2?"


def agent_flow(tools: tuple[str, ...] = ("calc",), **params: Any) -> dict[str, Any]:
    nodes = [{"id": "in", "type": "ChatInput"},
             {"id": "agent", "type": "Agent", "params": {
                 "model": "flowgate-sim", "system_prompt": SYSTEM, "max_retries": 0,
                 "tools": list(tools), **params}},
             {"id": "out", "type": "ChatOutput"}]
    edges = [{"source": "in", "target": "agent", "target_input": "input"},
             {"source": "agent", "target": "out"}]
    for slot in tools:
        nodes.append({"id": slot, "type": "Calculator"})
        edges.append({"source": slot, "target": "agent", "target_input": f"tools.{slot}"})
    return {"id": "agent-flow", "nodes": nodes, "edges": edges}


def compiled(sim: Any, definition: dict[str, Any]):
    checked = validate_flow(definition, REGISTRY)
    return compile_flow(FlowVersion(checked.id, 1, checked), REGISTRY,
                        BuildContext(openai_base_url=sim.base_url))


def prompt_tokens(body: dict[str, Any]) -> int:
    return count_prompt_tokens([(m["role"], m.get("content") or "") for m in body["messages"]])


def test_the_agent_answers_through_a_calculator_call(fresh_llm_sim) -> None:
    result = runner.run(compiled(fresh_llm_sim, agent_flow()), RunInput(QUESTION))

    assert result.output.startswith('[simulated reply] calculator: "84"')
    first, second = (r["body"] for r in fresh_llm_sim.requests())
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator"]
    assert first["messages"] == [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": QUESTION}]
    call = second["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "calculator",
                                "arguments": '{"expression": "(12 + 30) * 2"}'}
    assert second["messages"][3] == {"role": "tool", "content": "84",
                                     "tool_call_id": call["id"]}
    # usage: every model call, summed — in the run and on the agent's own answer
    assert result.usage["llm_calls"] == 2
    assert result.usage["input_tokens"] == prompt_tokens(first) + prompt_tokens(second)


def test_usage_on_the_agents_answer_is_the_sum_of_its_calls(fresh_llm_sim) -> None:
    events: list[runner.RunEvent] = list(runner.stream(compiled(fresh_llm_sim, agent_flow()),
                                                       RunInput(QUESTION)))

    finished = next(e for e in events if e.type == "node_finished" and e.data["node"] == "agent")
    usage = finished.data["output"]["usage"]
    run_usage = events[-1].data["usage"]
    assert {k: usage[k] for k in ("input_tokens", "output_tokens", "total_tokens")} == {
        k: run_usage[k] for k in ("input_tokens", "output_tokens", "total_tokens")}
    tokens = "".join(e.data["text"] for e in events if e.type == "token")
    assert tokens == events[-1].data["output"]  # the tool-call step streams no text
    assert {e.data["node"] for e in events if e.type == "token"} == {"agent"}


class ToolCalls(BaseCallbackHandler):
    def __init__(self) -> None:
        self.agent_run = None
        self.started: list[dict[str, Any]] = []
        self.ended: list[Any] = []

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, **kw):
        if kw.get("name") == "agent":
            self.agent_run = run_id

    def on_tool_start(self, serialized, input_str, *, run_id, parent_run_id=None, **kw):
        self.started.append({"tool": serialized["name"], "parent": parent_run_id,
                             "inputs": kw.get("inputs"), "call_id": kw.get("tool_call_id")})

    def on_tool_end(self, output, **kw):
        self.ended.append(output)


def test_tool_runs_are_child_runs_of_the_agent_node(fresh_llm_sim) -> None:
    """The runner turns these callbacks into tool_call / tool_result events
    (runs/recorder.py); here: they fire, under the node's run, with the call's id and arguments."""
    calls = ToolCalls()
    graph = compiled(fresh_llm_sim, agent_flow()).runnable

    graph.invoke({"input_value": QUESTION, "input_type": "chat"}, {"callbacks": [calls]})

    [started] = calls.started
    assert started["parent"] == calls.agent_run
    assert (started["tool"], started["inputs"]) == ("calculator", {"expression": "(12 + 30) * 2"})
    [ended] = calls.ended
    assert (ended.content, ended.status, ended.tool_call_id) == ("84", "success", started["call_id"])


def test_a_bad_expression_is_the_tools_answer_and_the_model_hears_it(fresh_llm_sim) -> None:
    calls = ToolCalls()
    graph = compiled(fresh_llm_sim, agent_flow()).runnable

    out = graph.invoke({"input_value": "compute 1/0 for me", "input_type": "chat"},
                       {"callbacks": [calls]})

    assert calls.ended[0].status == "error"
    assert fresh_llm_sim.requests()[1]["body"]["messages"][3]["content"] == (
        "cannot compute '1/0': division by zero")
    assert out["out"].startswith("[simulated reply] calculator: \"cannot compute '1/0':")


def test_max_iterations_stops_the_loop_with_a_clear_error(fresh_llm_sim) -> None:
    events: list[tuple[str, dict]] = []

    with pytest.raises(AgentIterationLimit) as raised:
        runner.execute(compiled(fresh_llm_sim, agent_flow(max_iterations=1)), RunInput(QUESTION),
                       emit=lambda kind, data: events.append((kind, data)))

    error = raised.value
    assert (error.status, error.code) == (502, "agent_iteration_limit")
    assert "agent 'agent' made 1 model calls (max_iterations)" in error.message
    assert events[-1] == ("error", {**error.to_dict(), "node": "agent"})
    assert len(fresh_llm_sim.requests()) == 1


class CancelWhen(BaseCallbackHandler):
    """Cancels the run's token when something happens (the runner's recorder then stops
    the run at its next step or token)."""

    def __init__(self, cancel: CancelToken, on: str) -> None:
        self.cancel, self.on = cancel, on

    def on_tool_end(self, output, **kw):
        if self.on == "tool":
            self.cancel.cancel("cancelled after the tool")

    def on_llm_new_token(self, token, **kw):
        if self.on == "token" and token:
            self.cancel.cancel("cancelled mid-answer")


@pytest.mark.parametrize(("on", "model_calls", "tokens"), [
    pytest.param("tool", 1, 0, id="between-steps"),
    pytest.param("token", 2, 1, id="between-tokens"),
])
def test_a_cancelled_run_stops_between_steps_and_between_tokens(fresh_llm_sim, on, model_calls,
                                                                tokens) -> None:
    compiled_flow = compiled(fresh_llm_sim, agent_flow())
    cancel, emitted = CancelToken(), []
    recorder = RunRecorder(lambda kind, data: emitted.append(kind),
                           dict(compiled_flow.node_types), cancel)

    with pytest.raises(RunCancelled):
        compiled_flow.runnable.invoke(
            {"input_value": QUESTION, "input_type": "chat"},
            {"callbacks": [recorder, CancelWhen(cancel, on)],
             "configurable": {"flowgate_stream_tokens": True}})

    assert len(fresh_llm_sim.requests()) == model_calls
    assert emitted.count("token") == tokens


def test_with_the_echo_provider_the_agent_never_calls_a_tool(fresh_llm_sim) -> None:
    result = runner.run(compiled(fresh_llm_sim, agent_flow(provider="echo")), RunInput("6*7?"))

    assert result.output == "[echo: not an LLM] 6*7?"
    assert fresh_llm_sim.requests() == []


def test_history_and_a_system_prompt_input_reach_the_model(fresh_llm_sim) -> None:
    flow = agent_flow(tools=())
    flow["nodes"] += [{"id": "sys", "type": "TextInput", "params": {"input_value": "Be terse."}},
                      {"id": "hist", "type": "PromptTemplate",
                       "params": {"template": "Human: hi\nAI: hello"}}]
    flow["edges"] += [{"source": "sys", "target": "agent", "target_input": "system_prompt"},
                      {"source": "hist", "target": "agent", "target_input": "history"}]

    runner.run(compiled(fresh_llm_sim, flow), RunInput("and now?"))

    [seen] = fresh_llm_sim.requests()
    assert seen["body"]["messages"][0] == {
        "role": "system",
        "content": "Be terse.\n\nEarlier messages of this conversation:\nHuman: hi\nAI: hello"}
    assert "tools" not in seen["body"]


def test_two_tools_with_one_name_fail_the_run_clearly(fresh_llm_sim) -> None:
    with pytest.raises(RunFailed, match="two tools are named 'calculator'"):
        runner.run(compiled(fresh_llm_sim, agent_flow(tools=("a", "b"))), RunInput(QUESTION))


def test_something_else_in_a_tool_slot_fails_the_run_clearly(fresh_llm_sim) -> None:
    flow = agent_flow(tools=("x",))
    flow["nodes"] = [n for n in flow["nodes"] if n["id"] != "x"]
    flow["edges"][-1]["source"] = "in"

    with pytest.raises(RunFailed, match=r"input 'tools\.x' got str, not a tool"):
        runner.run(compiled(fresh_llm_sim, flow), RunInput(QUESTION))


def test_a_call_of_an_unknown_tool_is_answered_with_an_error() -> None:
    agent = AgentRunnable(node_id="a", model=None, system_prompt="", max_iterations=1,
                          slots=(), offers_tools=True)
    tool = Calculator().make_tool("c", Calculator().with_defaults({}), BuildContext())
    from langchain_core.callbacks import CallbackManager

    manager = CallbackManager([]).on_chain_start(None, {}, name="a")
    answer = agent._run_tool({"calculator": tool}, {"name": "search", "args": {}, "id": "c1"}, 0,
                             {}, manager)

    assert (answer.status, answer.tool_call_id) == ("error", "c1")
    assert answer.content == "there is no tool named 'search' (tools: calculator)"


# -- validation ------------------------------------------------------------------------------


def problems(definition: dict[str, Any], limits: Limits | None = None) -> list[str]:
    with pytest.raises(FlowInvalid) as raised:
        validate_flow(definition, REGISTRY, limits or Limits())
    return [str(p) for p in raised.value.problems]


@pytest.mark.parametrize(("change", "expected"), [
    pytest.param({"api_key": "sk-1"}, "$.nodes[1].params.api_key: 'api_key' must not be in a flow",
                 id="key"),
    pytest.param({"max_iterations": 0}, "$.nodes[1].params.max_iterations: 0 is less than",
                 id="iterations"),
    pytest.param({"tools": ["bad slot"]}, "$.nodes[1].params.tools[0]: 'bad slot' does not match",
                 id="slot-name"),
    pytest.param({"temprature": 1}, "did you mean 'temperature'?", id="typo"),
    pytest.param({"provider": "anthropic"}, "$.nodes[1].params.provider: 'anthropic' is not one of",
                 id="provider"),
])
def test_agent_params_are_checked(change: dict[str, Any], expected: str) -> None:
    flow = agent_flow()
    flow["nodes"][1]["params"].update(change)
    assert any(expected in p for p in problems(flow)), problems(flow)


def test_tool_slots_and_edges_must_match() -> None:
    undeclared = agent_flow()
    undeclared["edges"].append({"source": "calc", "target": "agent", "target_input": "tools.nope"})
    unconnected = agent_flow(tools=("calc", "other"))
    unconnected["edges"] = [e for e in unconnected["edges"] if e["source"] != "other"]

    assert any("node 'agent' (Agent) has no input 'tools.nope'" in p for p in problems(undeclared))
    assert any("required input 'tools.other' of node 'agent' (Agent) is not connected" in p
               for p in problems(unconnected))


def test_the_agent_obeys_provider_egress() -> None:
    egress = ProviderOrigins.from_settings("https://api.openai.com/v1", "sk-engine")
    flow = agent_flow(base_url="https://attacker.example/v1")

    [problem] = problems(flow, Limits(egress=egress))

    assert problem.startswith("$.nodes[1].params.base_url: base_url origin "
                              "https://attacker.example:443 is not an allowed provider origin")
    with pytest.raises(ValueError, match="not an allowed provider origin"):  # the build backstop
        definition = validate_flow(flow, REGISTRY)
        compile_flow(FlowVersion("f", 1, definition), REGISTRY, BuildContext(egress=egress))


@pytest.mark.parametrize("param", ["provider", "base_url"])
def test_where_an_agent_sends_requests_is_never_tweakable(param: str) -> None:
    flow = {**agent_flow(), "tweakable": {"agent": [param]}}
    assert any(f"'{param}' of a Agent can never be tweaked" in p for p in problems(flow))
    with pytest.raises(FlowInvalid, match="cannot be changed per run"):
        apply_tweaks(agent_flow(), {"agent": {param: "https://attacker.example/v1"}}, REGISTRY)
