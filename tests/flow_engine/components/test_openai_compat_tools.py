"""Tool calling in the engine's own OpenAI-compatible client, against the real llm-sim over
HTTP (its rule: flowgate/llm_sim.py), plus a scripted server for malformed tool deltas."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from support.procs import free_port

from flow_engine.components.openai_compat import OpenAICompatChatModel, ProviderResponseError
from flowgate.llm_sim import plan_tool_call

MODEL = "flowgate-sim"


@tool
def calculator(expression: str) -> str:
    """Computes an arithmetic expression."""
    return "never called here"


@tool
def orders(input: str) -> str:
    """Looks an order up."""
    return "never called here"


def model_for(base_url: str, **options: Any) -> OpenAICompatChatModel:
    return OpenAICompatChatModel(model=MODEL, base_url=base_url, api_key="k", max_retries=0,
                                 **options)


def test_bound_tools_and_tool_choice_are_sent(fresh_llm_sim) -> None:
    model_for(fresh_llm_sim.base_url).bind_tools([calculator, orders],
                                                 tool_choice="orders").invoke("hi")

    [seen] = fresh_llm_sim.requests()
    body = seen["body"]
    assert [t["function"]["name"] for t in body["tools"]] == ["calculator", "orders"]
    assert body["tools"][0]["function"]["parameters"]["properties"] == {
        "expression": {"type": "string"}}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "orders"}}
    assert body["stream"] is True  # tools do not change how the answer comes


def test_a_streamed_tool_call_becomes_the_messages_tool_calls(fresh_llm_sim) -> None:
    question = "What is (12 + 30) * 2?"
    expected = plan_tool_call([{"role": "user", "content": question}],
                              [{"name": "calculator", "parameters": {"properties": {
                                  "expression": {"type": "string"}}}}], "auto")

    reply = model_for(fresh_llm_sim.base_url).bind_tools([calculator]).invoke(question)

    assert reply.content == ""
    assert reply.tool_calls == [{"name": "calculator", "args": {"expression": "(12 + 30) * 2"},
                                 "id": expected.id, "type": "tool_call"}]
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    assert reply.usage_metadata["output_tokens"] >= 1


def test_calls_and_results_go_back_in_openais_shape_and_the_answer_quotes_them(fresh_llm_sim) -> None:
    model = model_for(fresh_llm_sim.base_url).bind_tools([calculator, orders])
    messages: list[Any] = [SystemMessage("Be exact."),
                           HumanMessage("ask orders about 42, then the calculator: 6*7")]
    for result in ("order 42 shipped", "42"):
        asked = model.invoke(messages)
        messages += [asked, ToolMessage(result, tool_call_id=asked.tool_calls[0]["id"])]

    answer = model.invoke(messages)

    assert answer.tool_calls == []
    assert answer.content.startswith('[simulated reply] orders: "order 42 shipped" calculator: "42"')
    last = fresh_llm_sim.requests()[-1]["body"]["messages"]
    assert last[2] == {"role": "assistant", "content": None, "tool_calls": [{
        "id": messages[2].tool_calls[0]["id"], "type": "function", "function": {
            "name": "orders", "arguments": json.dumps(messages[2].tool_calls[0]["args"])}}]}
    assert last[3] == {"role": "tool", "content": "order 42 shipped",
                       "tool_call_id": messages[2].tool_calls[0]["id"]}


def test_an_answer_without_tools_is_plain_text_as_before(fresh_llm_sim) -> None:
    plain = model_for(fresh_llm_sim.base_url).invoke("hello")
    with_tools = model_for(fresh_llm_sim.base_url).bind_tools(
        [calculator], tool_choice="none").invoke("hello")

    assert plain.tool_calls == [] and with_tools.tool_calls == []
    assert plain.content == with_tools.content != ""
    assert "tools" not in fresh_llm_sim.requests()[0]["body"]


def test_an_ai_message_with_text_and_calls_keeps_its_text() -> None:
    from flow_engine.components.openai_compat import _to_openai

    message = AIMessage("Let me compute.", tool_calls=[
        {"name": "calculator", "args": {"expression": "1+1"}, "id": "c1", "type": "tool_call"}])

    assert _to_openai(message) == {"role": "assistant", "content": "Let me compute.", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}]}
    assert _to_openai(AIMessage("plain")) == {"role": "assistant", "content": "plain"}


# -- malformed tool deltas, from a scripted server ------------------------------------------


@pytest.fixture
def scripted() -> Iterator[Any]:
    """A one-shot HTTP server answering with a given event stream."""
    port = free_port()
    server = socket.create_server(("127.0.0.1", port))
    box: dict[str, bytes] = {}

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                rest += conn.recv(65536)
            body = box["events"]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)

    def answer(events: list[Any]) -> str:
        box["events"] = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{port}/v1"

    yield answer
    server.close()


@pytest.mark.parametrize("tool_calls", [
    pytest.param("not a list", id="not-a-list"),
    pytest.param(["not an object"], id="entry-not-an-object"),
    pytest.param([{"index": 0, "function": "calculator"}], id="function-not-an-object"),
])
def test_malformed_tool_deltas_are_provider_errors(scripted, tool_calls: Any) -> None:
    base = scripted([{"choices": [{"index": 0, "delta": {"tool_calls": tool_calls}}]},
                     {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}])

    with pytest.raises(ProviderResponseError, match="tool_calls"):
        model_for(base).bind_tools([calculator]).invoke("hi")
