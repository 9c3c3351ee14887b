"""flow_engine/runs/spans.py: the spans of one run as the runner drives them — nodes, LLM
calls, an Agent's tool calls, a flow a FlowTool runs, a cancelled run. Spans go to the SDK's
in-memory exporter; the LLM is the real llm-sim over HTTP."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from support.keys import KEYS, as_

from flow_engine.app import create_app
from flow_engine.components import default_registry
from flow_engine.components.base import BuildContext
from flow_engine.errors import RunCancelled
from flow_engine.flows.compile import compile_flow
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.validate import validate_flow
from flow_engine.metrics import EngineMetrics
from flow_engine.runs import runner
from flow_engine.runs.runner import CancelToken, RunInput
from flow_engine.runs.spans import RunSpans
from flowgate.common.otel import Telemetry

REGISTRY = default_registry()
CHAT = {"id": "chat", "nodes": [
    {"id": "in", "type": "ChatInput"},
    {"id": "p", "type": "PromptTemplate", "params": {"template": "Q: {question}"}},
    {"id": "llm", "type": "ChatModel",
     "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
    {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "p", "target_input": "question"},
              {"source": "p", "target": "llm"}, {"source": "llm", "target": "out"}]}
AGENT = {"id": "agent-flow", "nodes": [
    {"id": "in", "type": "ChatInput"},
    {"id": "agent", "type": "Agent", "params": {
        "model": "flowgate-sim", "system_prompt": "Use the calculator.", "max_retries": 0,
        "tools": ["calc"]}},
    {"id": "calc", "type": "Calculator"},
    {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "agent", "target_input": "input"},
              {"source": "calc", "target": "agent", "target_input": "tools.calc"},
              {"source": "agent", "target": "out"}]}


def compiled(sim, definition):
    checked = validate_flow(definition, REGISTRY)
    return compile_flow(FlowVersion(checked.id, 3, checked), REGISTRY,
                        BuildContext(openai_base_url=sim.base_url))


def traced_run(flow, question: str, *, cancel: CancelToken | None = None,
               emit=lambda kind, data: None, identity: str | None = None):
    """Run ``flow`` with RunSpans as the executor does; the finished spans by name."""
    exporter = InMemorySpanExporter()
    telemetry = Telemetry("flowgate-engine", exporter, environ={})
    spans = RunSpans(telemetry, None, flow_id=flow.flow_id, version=flow.version, run_id="r1",
                     node_types=flow.node_types, session_id="s1", tenant="orders")
    error = None
    try:
        result = runner.execute(flow, RunInput(question, identity=identity), emit=emit,
                                run_id="r1", cancel=cancel, stream_tokens=True, observer=spans)
        spans.end("succeeded", usage=result.usage)
    except RunCancelled as exc:
        error = exc
        spans.end("cancelled", exc.code, exc.usage)
    telemetry.flush()
    finished = exporter.get_finished_spans()
    return {s.name: s for s in finished}, finished, error


def test_each_node_and_the_llm_call_under_the_run(fresh_llm_sim) -> None:
    by_name, finished, _ = traced_run(compiled(fresh_llm_sim, CHAT), "what is a refund?")
    run = by_name["run chat"]
    assert run.attributes["flowgate.flow.version"] == 3
    assert run.attributes["flowgate.tenant"] == "orders"
    assert run.attributes["flowgate.usage.output_tokens"] > 0
    nodes = [s for s in finished if s.name.startswith("node ")]
    assert [s.attributes["flowgate.node.id"] for s in nodes] == ["in", "p", "llm", "out"]
    assert all(s.parent.span_id == run.context.span_id for s in nodes)
    llm = by_name["chat"]
    assert llm.parent.span_id == by_name["node llm"].context.span_id
    assert llm.attributes["gen_ai.provider.name"] == "openai"
    assert llm.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    request = fresh_llm_sim.requests()[0]["body"]
    assert request["model"] == llm.attributes["gen_ai.request.model"]
    assert llm.attributes["server.address"] == fresh_llm_sim.url.removeprefix("http://")
    [(name, attrs)] = [(e.name, e.attributes) for e in llm.events]
    assert name == "gen_ai.first_token" and attrs["gen_ai.response.time_to_first_token"] > 0
    assert all(s.status.status_code != StatusCode.ERROR for s in finished)


def test_an_agents_model_calls_and_tool_call_are_spans_of_its_node(fresh_llm_sim) -> None:
    _, finished, _ = traced_run(compiled(fresh_llm_sim, AGENT), "What is (12 + 30) * 2?")
    agent = next(s for s in finished if s.name == "node agent")
    calls = [s for s in finished if s.name == "chat"]
    tool = next(s for s in finished if s.name == "execute_tool")
    assert len(calls) == 2  # ask, then answer with the tool's result
    assert all(c.parent.span_id == agent.context.span_id for c in calls)
    assert tool.parent.span_id == agent.context.span_id
    assert tool.attributes["gen_ai.tool.name"] == "calculator"
    assert tool.attributes["gen_ai.tool.call.id"]
    assert calls[0].end_time <= tool.start_time <= tool.end_time <= calls[1].start_time
    # the tool's own node ran (it hands the agent its tool) before the agent did
    calc = next(s for s in finished if s.name == "node calc")
    assert calc.attributes["flowgate.node.skipped"] is False and calc.end_time <= agent.start_time


ORDERS = {**CHAT, "id": "orders", "nodes": [
    {**n, "params": {**n["params"], "model": "orders-model"}} if n["id"] == "llm" else n
    for n in CHAT["nodes"]]}
ASSISTANT = {"id": "assistant", "nodes": [
    {"id": "in", "type": "ChatInput"},
    {"id": "agent", "type": "Agent", "params": {
        "model": "flowgate-sim", "system_prompt": "Ask orders.", "max_retries": 0,
        "tools": ["orders"]}},
    {"id": "orders", "type": "FlowTool", "params": {
        "flow_id": "orders", "name": "orders", "description": "Looks an order up."}},
    {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "agent", "target_input": "input"},
              {"source": "orders", "target": "agent", "target_input": "tools.orders"},
              {"source": "agent", "target": "out"}]}


@pytest.fixture
def assistant(tmp_path, fresh_llm_sim) -> Iterator[Any]:
    """``assistant`` compiled by an engine built as production builds it (SQLite, the real
    flow service and sub-flow runner), its FlowTool running the live ``orders`` flow."""
    app = create_app({"database_url": f"sqlite:///{tmp_path / 'engine.db'}", "api_keys": KEYS,
                      "maintenance_interval_s": 0, "rollout_interval_s": 0,
                      "openai_base_url": fresh_llm_sim.base_url},
                     metrics=EngineMetrics(CollectorRegistry()))
    eng = app.extensions["flowgate"]
    try:
        client = app.test_client()
        for definition in (ORDERS, ASSISTANT):
            resp = client.post("/api/v1/flows", headers=as_("editor"), json=definition)
            assert resp.status_code == 201, resp.get_data(as_text=True)
        flow, version = eng.flows.resolve("assistant", pinned=None, sticky_value=None)
        yield eng.flows.compiled(flow, version)
    finally:
        eng.maintenance.stop()
        eng.runs.executor.close()
        eng.store.close()


def ancestors(span: ReadableSpan, finished: list[ReadableSpan]) -> list[str]:
    by_id = {s.context.span_id: s for s in finished}
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


def test_a_flow_a_tool_runs_is_traced_under_the_tool_call(assistant, caplog) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    with caplog.at_level(logging.INFO, logger="flow_engine.components.subflows"):
        by_name, finished, _ = traced_run(assistant, "Where is order 42?", identity="app-7",
                                          emit=lambda kind, data: events.append((kind, data)))
    tool = by_name["execute_tool"]
    sub = by_name["run orders"]
    assert sub.parent.span_id == tool.context.span_id
    assert sub.attributes["flowgate.parent_flow.id"] == "assistant"
    assert sub.attributes["flowgate.run.id"] == "r1"
    sub_nodes = [s for s in finished if s.parent and s.parent.span_id == sub.context.span_id]
    assert [s.attributes["flowgate.node.id"] for s in sub_nodes] == ["in", "p", "llm", "out"]
    [sub_chat] = [s for s in finished if s.name == "chat"
                  and s.attributes["gen_ai.request.model"] == "orders-model"]
    assert ancestors(sub_chat, finished)[:4] == [
        "node llm", "run orders", "execute_tool", "node agent"]
    assert sub_chat.attributes["gen_ai.usage.input_tokens"] > 0
    assert sub_chat.attributes["gen_ai.usage.output_tokens"] > 0
    # every LLM call of the run is a span: their tokens add up to the run's usage
    chats = [s for s in finished if s.name == "chat"]
    run = by_name["run assistant"]
    assert len(chats) == run.attributes["flowgate.usage.llm_calls"] == 3
    for side in ("input", "output"):
        assert sum(c.attributes[f"gen_ai.usage.{side}_tokens"] for c in chats) \
            == run.attributes[f"flowgate.usage.{side}_tokens"]
    # only the spans go down to the sub-flow: its tokens are not streamed as the run's
    assert {d["node"] for kind, d in events if kind == "token"} == {"agent"}
    [record] = [r for r in caplog.records if r.getMessage() == "subflow"]
    assert (record.flow_id, record.identity) == ("orders", "app-7")
    assert all(s.status.status_code != StatusCode.ERROR for s in finished)


def test_a_flow_a_tool_runs_that_fails_ends_its_spans_as_failed(assistant,
                                                               fresh_llm_sim) -> None:
    fresh_llm_sim.configure(model_error_rates={"orders-model": 1.0}, error_kinds=["500"])
    by_name, finished, error = traced_run(assistant, "Where is order 42?")
    assert error is None  # the model heard the tool's failure and answered
    sub = by_name["run orders"]
    assert sub.status.status_code == StatusCode.ERROR
    assert sub.attributes["flowgate.run.status"] == "failed"
    assert by_name["node llm"].status.status_code == StatusCode.ERROR
    assert by_name["execute_tool"].status.status_code == StatusCode.ERROR
    assert by_name["run assistant"].status.status_code != StatusCode.ERROR
    assert all(s.end_time is not None for s in finished)


def test_a_cancelled_run_ends_every_open_span_as_failed(fresh_llm_sim) -> None:
    cancel = CancelToken()

    def emit(kind, data):
        if kind == "token" and data["index"] == 2:
            cancel.cancel("enough")

    by_name, finished, error = traced_run(compiled(fresh_llm_sim, CHAT), "tell me a story",
                                          cancel=cancel, emit=emit)
    assert isinstance(error, RunCancelled)
    assert by_name["run chat"].attributes["flowgate.run.status"] == "cancelled"
    for name in ("run chat", "node llm", "chat"):
        assert by_name[name].status.status_code == StatusCode.ERROR, name
    assert "node out" not in by_name  # never reached, and not a skipped branch either
    assert all(s.end_time is not None for s in finished)


@pytest.mark.parametrize("hostile", ["x" * 10_000, "<script>", "\u202e\x00"])
def test_what_a_caller_typed_is_never_put_on_a_span(fresh_llm_sim, hostile) -> None:
    _, finished, _ = traced_run(compiled(fresh_llm_sim, CHAT), hostile)
    values = [str(v) for s in finished for v in s.attributes.values()]
    values += [str(v) for s in finished for e in s.events for v in e.attributes.values()]
    assert not any(hostile in v for v in values)
