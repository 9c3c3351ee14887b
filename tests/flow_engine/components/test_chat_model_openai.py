"""ChatModel provider ``openai`` (OpenAICompatChatModel) against the real llm-sim process
over HTTP: answers, streamed tokens, usage, errors, cancellation."""

from __future__ import annotations

import threading
import time

import pytest

from flow_engine.components import BuildContext, default_registry
from flow_engine.errors import FlowInvalid, LLMError, RunCancelled
from flow_engine.flows.compile import compile_flow
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.validate import validate_flow
from flow_engine.runs.runner import CancelToken, RunInput, execute, run, stream
from flowgate.llm_sim import count_prompt_tokens, reply_tokens

SYSTEM = "You answer briefly."


def chat_flow(**model_params):
    return {
        "id": "chat",
        "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "p", "type": "ChatPromptTemplate", "params": {"system": SYSTEM, "human": "{q}"}},
            {"id": "llm", "type": "ChatModel",
             "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0,
                        **model_params}},
            {"id": "out", "type": "ChatOutput"},
        ],
        "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
                  {"source": "llm", "target": "out"}],
    }


def compiled_for(sim, **model_params):
    registry = default_registry()
    definition = validate_flow(chat_flow(**model_params), registry)
    ctx = BuildContext(openai_base_url=sim.base_url, openai_api_key="test-key")
    return compile_flow(FlowVersion("chat", 1, definition), registry, ctx)


def expected_reply(question: str, n: int = 24) -> tuple[str, int]:
    messages = [("system", SYSTEM), ("user", question)]
    return "".join(reply_tokens(messages, n)), count_prompt_tokens(messages)


def test_run_returns_the_simulated_answer_and_counts_usage(fresh_llm_sim):
    text, prompt_tokens = expected_reply("what is flowgate?")
    result = run(compiled_for(fresh_llm_sim), RunInput("what is flowgate?"))
    assert result.output == text
    assert result.usage["input_tokens"] == prompt_tokens
    assert result.usage["output_tokens"] == 24
    assert result.usage["total_tokens"] == prompt_tokens + 24
    stats = fresh_llm_sim.stats()
    assert stats["chat_completions_completed"] == 1


def test_streamed_tokens_arrive_in_order_and_make_up_the_answer(fresh_llm_sim):
    text, _ = expected_reply("stream please")
    events = list(stream(compiled_for(fresh_llm_sim), RunInput("stream please")))
    tokens = [e.data for e in events if e.type == "token"]
    assert len(tokens) == 24
    assert [t["index"] for t in tokens] == list(range(24))
    assert "".join(t["text"] for t in tokens) == text
    assert events[-1].type == "run_finished"
    assert events[-1].data["output"] == text


def test_max_tokens_param_reaches_the_provider(fresh_llm_sim):
    result = run(compiled_for(fresh_llm_sim, max_tokens=5), RunInput("short"))
    assert result.usage["output_tokens"] == 5
    assert result.output == expected_reply("short", 5)[0]


def test_first_token_arrives_long_before_generation_ends(fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=200)  # ~10 s of generation
    events = stream(compiled_for(fresh_llm_sim), RunInput("slow"))
    try:
        first = next(e for e in events if e.type == "token")
        stats = fresh_llm_sim.stats()  # buffering would hold the token until the answer ended
    finally:
        events.close()  # cancels the run
    assert first.data["index"] == 0
    assert stats["chat_completions_completed"] == 0 and stats["tokens_sent"] < 200


@pytest.mark.parametrize(
    ("kind", "status"), [pytest.param("500", 500, id="server-error"),
                         pytest.param("429", 429, id="rate-limited")])
def test_provider_errors_become_llm_errors_naming_the_node(fresh_llm_sim, kind, status):
    fresh_llm_sim.configure(error_rate=1.0, error_kinds=kind)
    with pytest.raises(LLMError) as info:
        run(compiled_for(fresh_llm_sim), RunInput("hi"))
    assert info.value.status == 502
    assert "node 'llm' (ChatModel)" in info.value.message
    assert f"HTTP {status}" in info.value.message
    assert fresh_llm_sim.stats()["errors_injected"][kind] == 1  # max_retries=0: one call


def test_cancel_mid_answer_closes_the_upstream_stream(fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=200)  # 4 s if not cancelled
    cancel = CancelToken()
    tokens = []

    def emit(kind, data):
        if kind == "token":
            tokens.append(data)
            if len(tokens) == 5:
                cancel.cancel("client went away")

    with pytest.raises(RunCancelled):  # a plain run: the openai provider streams anyway
        execute(compiled_for(fresh_llm_sim), RunInput("long answer"), emit=emit, cancel=cancel)
    assert len(tokens) == 5
    # the simulator sees its stream closed before the end (bounded poll)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and fresh_llm_sim.stats()["streams_closed_early"] < 1:
        time.sleep(0.05)
    stats = fresh_llm_sim.stats()
    # at least ours: a stream an earlier test cancelled may close after the counters were reset
    assert stats["streams_closed_early"] >= 1
    assert stats["chat_completions_completed"] == 0
    assert stats["tokens_sent"] < 200


def test_cancel_from_another_thread_stops_a_streaming_run(fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=40, reply_tokens=400)
    cancel, streaming = CancelToken(), threading.Event()
    canceller = threading.Thread(target=lambda: streaming.wait(30) and cancel.cancel("api cancel"))
    canceller.start()
    events = []
    try:
        for event in stream(compiled_for(fresh_llm_sim), RunInput("x"), cancel=cancel):
            events.append(event)
            if event.type == "token":
                streaming.set()  # the other thread cancels once tokens flow
    finally:
        streaming.set()
        canceller.join(30)
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "run_cancelled"
    assert 0 < sum(e.type == "token" for e in events) < 400


def test_api_key_in_a_flow_is_rejected_and_never_sent():
    flow = chat_flow(api_key="sk-live-123")
    with pytest.raises(FlowInvalid) as info:
        validate_flow(flow, default_registry())
    assert [p.path for p in info.value.problems] == ["$.nodes[2].params.api_key"]
    assert "OPENAI_API_KEY" in info.value.problems[0].message


def test_engine_key_is_sent_as_bearer_token(fresh_llm_sim):
    registry = default_registry()
    definition = validate_flow(chat_flow(), registry)
    ctx = BuildContext(openai_base_url=fresh_llm_sim.base_url, openai_api_key="engine-secret")
    compiled = compile_flow(FlowVersion("chat", 1, definition), registry, ctx)

    run(compiled, RunInput("k"))

    [seen] = fresh_llm_sim.requests()
    assert seen["headers"]["Authorization"] == "Bearer engine-secret"
    assert seen["body"]["model"] == "flowgate-sim"
