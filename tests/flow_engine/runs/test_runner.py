"""The runner: event order and content, results, cancellation between nodes and tokens."""

from __future__ import annotations

import pytest

from flow_engine.components import default_registry
from flow_engine.errors import RunCancelled, RunFailed
from flow_engine.flows.compile import compile_flow
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.validate import validate_flow
from flow_engine.runs.runner import CancelToken, RunInput, execute, run, stream

DOCS = ["Refunds take 5 business days.", "Shipping is free over 50 EUR.", "Open 9 to 17."]
RAG = {
    "id": "rag",
    "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "ctx", "type": "BM25Retriever", "params": {"documents": DOCS, "k": 1}},
        {"id": "p", "type": "PromptTemplate", "params": {"template": "C: {context} Q: {question}"}},
        {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
        {"id": "out", "type": "ChatOutput"},
    ],
    "edges": [
        {"source": "in", "target": "ctx", "target_input": "query"},
        {"source": "in", "target": "p", "target_input": "question"},
        {"source": "ctx", "target": "p", "target_input": "context"},
        {"source": "p", "target": "llm"},
        {"source": "llm", "target": "out"},
    ],
}
NODE_ORDER = ["in", "ctx", "p", "llm", "out"]
QUESTION = "when do refunds arrive"
EXPECTED = "[echo: not an LLM] C: Refunds take 5 business days. Q: when do refunds arrive"


def compiled(flow=RAG, version=1):
    registry = default_registry()
    return compile_flow(FlowVersion(flow["id"], version, validate_flow(flow, registry)), registry)


def test_run_returns_the_flow_output_with_usage_and_node_timings():
    result = run(compiled(), RunInput(QUESTION, session_id="s1"), run_id="r1")
    assert result.output == EXPECTED
    assert (result.run_id, result.flow_id, result.version, result.session_id) == ("r1", "rag", 1, "s1")
    words_in = len(f"C: {DOCS[0]} Q: {QUESTION}".split())
    assert result.usage == {"input_tokens": words_in, "output_tokens": len(EXPECTED.split()),
                            "total_tokens": words_in + len(EXPECTED.split()), "llm_calls": 1}
    assert list(result.nodes) == NODE_ORDER
    assert all(ms >= 0 for ms in result.nodes.values())
    # LangFlow's nesting, which LangFlow API clients read
    entry = result.outputs[0]["outputs"][0]
    assert result.outputs[0]["inputs"] == {"input_value": QUESTION}
    assert entry["component_id"] == "out"
    assert entry["results"]["message"]["text"] == EXPECTED
    assert entry["messages"][0]["session_id"] == "s1"


def test_stream_yields_events_in_order_with_contiguous_sequence_numbers():
    events = list(stream(compiled(), RunInput(QUESTION), run_id="r2"))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "run_started"
    assert events[0].data == {"run_id": "r2", "flow_id": "rag", "version": 1, "session_id": None}
    assert events[-1].type == "run_finished"

    lifecycle = [(e.type, e.data["node"]) for e in events if e.type.startswith("node_")]
    assert lifecycle == [(kind, n) for n in NODE_ORDER for kind in ("node_started", "node_finished")]

    tokens = [e.data for e in events if e.type == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert {t["node"] for t in tokens} == {"llm"}
    assert "".join(t["text"] for t in tokens) == EXPECTED
    # tokens come between the LLM node's start and finish
    kinds = [(e.type, e.data.get("node")) for e in events]
    first_token = kinds.index(("token", "llm"))
    assert kinds.index(("node_started", "llm")) < first_token
    assert kinds.index(("node_finished", "llm")) > first_token + len(tokens) - 1

    finished = {e.data["node"]: e.data for e in events if e.type == "node_finished"}
    assert finished["ctx"]["output"][0]["page_content"] == DOCS[0]
    assert finished["p"]["output"] == f"C: {DOCS[0]} Q: {QUESTION}"
    assert finished["llm"]["output"]["content"] == EXPECTED
    assert events[-1].data["output"] == EXPECTED
    assert events[-1].data["run_id"] == "r2"


def test_plain_runs_do_not_stream_cheap_models():
    kinds = []
    execute(compiled(), RunInput(QUESTION), emit=lambda kind, data: kinds.append(kind))
    assert "token" not in kinds
    assert kinds[-1] == "run_finished"


def test_stream_and_run_agree_on_the_result():
    streamed = list(stream(compiled(), RunInput(QUESTION), run_id="same"))[-1].data
    direct = run(compiled(), RunInput(QUESTION), run_id="same").as_dict()
    for volatile in ("duration_ms",):
        streamed.pop(volatile), direct.pop(volatile)
    assert streamed == direct


def test_cancel_between_nodes_stops_before_the_next_node():
    cancel = CancelToken()
    seen = []

    def emit(kind, data):
        seen.append((kind, data.get("node")))
        if kind == "node_finished" and data["node"] == "ctx":
            cancel.cancel("test")

    with pytest.raises(RunCancelled):
        execute(compiled(), RunInput(QUESTION), emit=emit, cancel=cancel)
    started = [n for k, n in seen if k == "node_started"]
    assert started == ["in", "ctx"]
    assert seen[-1][0] == "error"


def test_cancel_between_tokens_stops_the_model_mid_answer():
    cancel = CancelToken()
    tokens = []

    def emit(kind, data):
        if kind == "token":
            tokens.append(data["text"])
            if len(tokens) == 3:
                cancel.cancel("enough")

    with pytest.raises(RunCancelled, match="enough"):
        execute(compiled(), RunInput(QUESTION), emit=emit, cancel=cancel, stream_tokens=True)
    assert len(tokens) == 3 < len(EXPECTED.split())


def test_cancelled_stream_ends_with_an_error_event():
    cancel = CancelToken()

    def press_stop(kind, data):  # the sink runs in the run's thread: no race with the run
        if kind == "node_finished" and data["node"] == "in":
            cancel.cancel("user pressed stop")

    events = list(stream(compiled(), RunInput(QUESTION), cancel=cancel, sink=press_stop))
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "run_cancelled"
    assert "user pressed stop" in events[-1].data["message"]
    assert not any(e.type == "run_finished" for e in events)


def test_closing_the_stream_early_cancels_the_run():
    cancel = CancelToken()
    events = stream(compiled(), RunInput(QUESTION), cancel=cancel)
    assert next(events).type == "run_started"
    events.close()
    assert cancel.cancelled
    assert "went away" in cancel.reason


def test_a_failing_node_is_named_in_the_error():
    flow = {
        "id": "bad-json",
        "nodes": [
            {"id": "in", "type": "TextInput"},
            {"id": "parse", "type": "JsonOutputParser"},
            {"id": "out", "type": "TextOutput"},
        ],
        "edges": [{"source": "in", "target": "parse"}, {"source": "parse", "target": "out"}],
    }
    events = list(stream(compiled(flow), RunInput("no json here", input_type="text")))
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "run_failed"
    assert events[-1].data["node"] == "parse"
    assert "node 'parse' (JsonOutputParser)" in events[-1].data["message"]
    with pytest.raises(RunFailed) as info:
        run(compiled(flow), RunInput("no json here", input_type="text"))
    assert info.value.status == 502
    assert "Traceback" not in info.value.message


def test_sink_sees_every_event_the_consumer_sees():
    logged = []
    events = list(stream(compiled(), RunInput(QUESTION), sink=lambda k, d: logged.append(k)))
    assert logged == [e.type for e in events]


def test_an_input_type_no_input_node_reads_is_a_warning_in_the_result():
    """input_type "text" on a flow that starts with a ChatInput: the input went nowhere, and
    the answer says so instead of answering as if asked nothing."""
    dropped = run(compiled(), RunInput(QUESTION, input_type="text"))
    assert dropped.as_dict()["warnings"] == [
        "input_type 'text' is read by no input node of this flow: input_value was not used; "
        "send input_type 'chat'"]
    for read in ("chat", "any"):
        assert "warnings" not in run(compiled(), RunInput(QUESTION, input_type=read)).as_dict()
    assert "warnings" not in run(compiled(), RunInput(None, input_type="text")).as_dict()
