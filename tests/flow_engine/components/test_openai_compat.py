"""OpenAICompatChatModel against the real llm-sim process over HTTP (tokens, usage, request
body, errors, retries, cancellation, keep-alive), plus a scripted raw-socket server for what
llm-sim cannot do (401, broken streams), and the SSE decoder and retry policy on their own."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from support.procs import free_port

from flow_engine.components import BuildContext, default_registry
from flow_engine.components.openai_compat import (
    OpenAICompatChatModel,
    ProviderConnectionError,
    ProviderError,
    ProviderResponseError,
    ProviderStatusError,
    ProviderTimeout,
    RetryPolicy,
    _sse_data,
)
from flow_engine.errors import LLMError, RunTimeout
from flow_engine.flows.compile import compile_flow
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.validate import validate_flow
from flow_engine.runs.runner import RunInput, run
from flowgate.llm_sim import count_prompt_tokens, reply_tokens

MODEL = "flowgate-sim"
QUESTION = "how long do refunds take?"


def model_for(base_url: str, **options: Any) -> OpenAICompatChatModel:
    options.setdefault("max_retries", 0)
    return OpenAICompatChatModel(model=MODEL, base_url=base_url, api_key="k", **options)


class Sleeps:
    """A fake ``sleep`` that records the delays it was asked for (and may act on them)."""

    def __init__(self, then=None) -> None:
        self.delays: list[float] = []
        self.then = then

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.then is not None:
            self.then()


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------
# Against llm-sim


def test_streamed_tokens_arrive_in_order_and_fire_callbacks(fresh_llm_sim):
    expected = reply_tokens([("user", QUESTION)], 24)
    recorder = TokenRecorder()

    chunks = list(model_for(fresh_llm_sim.base_url).stream(QUESTION,
                                                           {"callbacks": [recorder]}))

    texts = [c.content for c in chunks if c.content]
    assert texts == expected
    assert [t for t in recorder.tokens if t] == expected


def test_usage_ends_up_on_the_final_message(fresh_llm_sim):
    messages = [("system", "Be brief."), ("user", QUESTION)]
    prompt_tokens = count_prompt_tokens(messages)

    message = model_for(fresh_llm_sim.base_url, max_tokens=7).invoke(
        [SystemMessage("Be brief."), HumanMessage(QUESTION)])

    assert message.content == "".join(reply_tokens(messages, 7))
    assert message.usage_metadata == {
        "input_tokens": prompt_tokens, "output_tokens": 7, "total_tokens": prompt_tokens + 7,
        "input_token_details": {"audio": 0, "cache_read": 0},
        "output_token_details": {"audio": 0, "reasoning": 0}}
    assert message.response_metadata["finish_reason"] == "length"


def test_a_non_streamed_call_aggregates_the_stream(fresh_llm_sim):
    message = model_for(fresh_llm_sim.base_url).invoke(QUESTION, stream=False)

    assert message.content == "".join(reply_tokens([("user", QUESTION)], 24))
    assert message.usage_metadata["output_tokens"] == 24
    assert fresh_llm_sim.requests()[-1]["body"]["stream"] is True


def test_request_body_and_headers(fresh_llm_sim):
    model = model_for(fresh_llm_sim.base_url + "/", temperature=0.4, max_tokens=30)
    messages = [SystemMessage("sys"), HumanMessage("hi"), AIMessage("hello"),
                ToolMessage("42", tool_call_id="call-1"), HumanMessage("and?")]

    model.invoke(messages)

    [seen] = fresh_llm_sim.requests()
    assert seen["body"] == {
        "model": MODEL, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0.4, "max_tokens": 30,
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"},
                     {"role": "tool", "content": "42", "tool_call_id": "call-1"},
                     {"role": "user", "content": "and?"}]}
    assert seen["headers"]["Authorization"] == "Bearer k"
    assert seen["headers"]["Accept"] == "text/event-stream"


def test_no_key_sends_no_authorization_header(fresh_llm_sim):
    OpenAICompatChatModel(model=MODEL, base_url=fresh_llm_sim.base_url).invoke("x")

    assert "Authorization" not in fresh_llm_sim.requests()[0]["headers"]


def test_two_calls_reuse_one_keep_alive_connection(fresh_llm_sim):
    model = model_for(fresh_llm_sim.base_url)

    model.invoke("one")
    model.invoke("two")

    first, second = fresh_llm_sim.requests()
    assert first["remote_port"] == second["remote_port"]


def test_closing_the_stream_mid_answer_closes_the_upstream_connection(fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=200)  # 4 s if read to the end
    model = model_for(fresh_llm_sim.base_url)
    model.invoke("warm the pool")  # so the next stream runs on a pooled connection
    fresh_llm_sim.reset()

    stream = model.stream("long answer")
    got = [next(stream).content for _ in range(5)]
    stream.close()

    assert "".join(got).startswith("[simulated reply]")
    wait_for(lambda: fresh_llm_sim.stats()["streams_closed_early"] == 1)
    stats = fresh_llm_sim.stats()
    assert stats["chat_completions_completed"] == 0 and stats["tokens_sent"] < 200
    # the half-read connection was not pooled: the next call comes on a new one
    fresh_llm_sim.configure(tokens_per_s=0, reply_tokens=3)
    model.invoke("after")
    cancelled, after = fresh_llm_sim.requests()
    assert cancelled["remote_port"] != after["remote_port"]


@pytest.mark.parametrize(("kind", "status"), [
    pytest.param("500", 500, id="server-error"),
    pytest.param("429", 429, id="rate-limited"),
])
def test_provider_statuses_are_status_errors(fresh_llm_sim, kind, status):
    fresh_llm_sim.configure(error_rate=1.0, error_kinds=kind)

    with pytest.raises(ProviderStatusError) as info:
        model_for(fresh_llm_sim.base_url).invoke("x")

    assert info.value.status_code == status
    assert str(info.value).startswith(f"Error code: {status} - ")
    assert "(simulated)" in str(info.value)


def test_a_read_timeout_is_a_timeout_and_not_retried(fresh_llm_sim):
    fresh_llm_sim.configure(ttft_s=2.0)
    sleeps = Sleeps()

    with pytest.raises(ProviderTimeout):
        model_for(fresh_llm_sim.base_url, timeout=0.3, max_retries=3,
                  retry_sleep=sleeps).invoke("x")

    assert fresh_llm_sim.stats()["chat_completions_completed"] == 0, "it did not wait 2 s"
    assert sleeps.delays == []
    assert fresh_llm_sim.stats()["requests"]["/v1/chat/completions"] == 1


def test_retries_5xx_with_backoff_then_gives_up(fresh_llm_sim):
    fresh_llm_sim.configure(error_rate=1.0, error_kinds="500")
    sleeps = Sleeps()

    with pytest.raises(ProviderStatusError):
        model_for(fresh_llm_sim.base_url, max_retries=2, retry_sleep=sleeps).invoke("x")

    assert fresh_llm_sim.stats()["errors_injected"]["500"] == 3
    assert len(sleeps.delays) == 2
    assert 0.125 <= sleeps.delays[0] <= 0.25 and 0.25 <= sleeps.delays[1] <= 0.5


def test_a_retry_after_a_429_waits_retry_after_and_can_succeed(fresh_llm_sim):
    fresh_llm_sim.configure(error_rate=1.0, error_kinds="429")
    sleeps = Sleeps(then=lambda: fresh_llm_sim.configure(error_rate=0.0))

    message = model_for(fresh_llm_sim.base_url, max_retries=1, retry_sleep=sleeps).invoke(QUESTION)

    assert sleeps.delays == [1.0]  # llm-sim's Retry-After
    assert message.content == "".join(reply_tokens([("user", QUESTION)], 24))
    assert len(fresh_llm_sim.requests()) == 2


def test_engine_maps_provider_failures_to_the_error_contract(fresh_llm_sim):
    fresh_llm_sim.configure(error_rate=1.0, error_kinds="500")
    with pytest.raises(LLMError) as info:
        run(compiled(fresh_llm_sim.base_url), RunInput("x"))
    origin = fresh_llm_sim.url  # http://127.0.0.1:PORT: where, never a path or a key
    assert info.value.message.startswith(
        f"node 'llm' (ChatModel): the LLM provider at {origin} failed (HTTP 500): "
        "Error code: 500 - ")

    fresh_llm_sim.configure(error_rate=0.0)
    with pytest.raises(LLMError) as info:
        run(compiled(fresh_llm_sim.url + "/nope"), RunInput("x"))
    assert "(HTTP 404)" in info.value.message

    fresh_llm_sim.configure(ttft_s=2.0)
    with pytest.raises(RunTimeout) as info:
        run(compiled(fresh_llm_sim.base_url, timeout=0.2), RunInput("x"))
    assert info.value.message == f"node 'llm' (ChatModel): the LLM provider at {origin} timed out"


def test_connection_refused_is_retried_then_an_llm_error():
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    sleeps = Sleeps()

    with pytest.raises(ProviderConnectionError, match="could not connect: Connection refused"):
        model_for(base_url, max_retries=2, retry_sleep=sleeps).invoke("x")
    assert len(sleeps.delays) == 2

    with pytest.raises(LLMError) as info:
        run(compiled(base_url), RunInput("x"))
    assert info.value.message == (
        f"node 'llm' (ChatModel): the LLM provider at {base_url.removesuffix('/v1')} failed "
        "(ProviderConnectionError): could not connect: Connection refused")


def compiled(base_url: str, **params: Any):
    registry = default_registry()
    flow = {"id": "chat", "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "llm", "type": "ChatModel",
         "params": {"provider": "openai", "model": MODEL, "max_retries": 0, **params}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}]}
    definition = validate_flow(flow, registry)
    ctx = BuildContext(openai_base_url=base_url, openai_api_key="k")
    return compile_flow(FlowVersion("chat", 1, definition), registry, ctx)


# ---------------------------------------------------------------------------------------
# A scripted server: answers the n-th request with the n-th raw response


def _chunked(*events: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
TOKEN_A = b'data: {"choices":[{"index":0,"delta":{"content":"A"}}]}\n\n'
TOKEN_B = b'data: {"choices":[{"index":0,"delta":{"content":"B"}}]}\n\n'


def _json_response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class ScriptedServer:
    """Accepts connections and answers each request with the next scripted bytes. After
    a chunked response without its last chunk (a broken stream), or a body with neither a
    length nor chunked encoding, it closes the connection. Counts requests."""

    def __init__(self, responses: list[bytes]) -> None:
        self.responses = list(responses)
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while self.responses:
                    if not self._read_request(conn):
                        break
                    self.requests += 1
                    answer = self.responses.pop(0)
                    conn.sendall(answer)
                    if b"chunked" not in answer.split(b"\r\n\r\n")[0] and b"Content-Length" not in answer:
                        break  # a body that ends when the connection does
                    if answer.startswith(SSE_HEAD) and not answer.endswith(b"0\r\n\r\n"):
                        break  # a broken stream: close the connection

    @staticmethod
    def _read_request(conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = conn.recv(65536)
            if not piece:
                return False
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        while len(body) < length:
            body += conn.recv(65536)
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[type[ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def make(responses: list[bytes]) -> ScriptedServer:
        servers.append(ScriptedServer(responses))
        return servers[-1]

    yield make  # type: ignore[misc]
    for server in servers:
        server.close()


def test_a_401_is_a_status_error_with_the_providers_message(scripted):
    body = b'{"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}}'
    server = scripted([_json_response("401 Unauthorized", body)] * 3)

    with pytest.raises(ProviderStatusError) as info:
        model_for(server.base_url, max_retries=2, retry_sleep=Sleeps()).invoke("x")

    assert info.value.status_code == 401
    assert str(info.value) == "Error code: 401 - Incorrect API key provided."
    assert server.requests == 1  # a 401 is not retried


def test_a_stream_broken_after_a_token_is_not_retried(scripted):
    server = scripted([SSE_HEAD + _chunked(TOKEN_A), SSE_HEAD + _chunked(TOKEN_A, TOKEN_B)])
    sleeps = Sleeps()
    got = []

    with pytest.raises(ProviderConnectionError, match="the connection broke"):
        for chunk in model_for(server.base_url, max_retries=3, retry_sleep=sleeps).stream("x"):
            got.append(chunk.content)

    assert got == ["A"]
    assert server.requests == 1 and sleeps.delays == []


def test_a_stream_broken_before_any_token_is_retried(scripted):
    done = _chunked(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
                    b"data: [DONE]\n\n") + b"0\r\n\r\n"
    server = scripted([SSE_HEAD, SSE_HEAD + _chunked(TOKEN_A, TOKEN_B) + done])
    sleeps = Sleeps()

    message = model_for(server.base_url, max_retries=1, retry_sleep=sleeps).invoke("x")

    assert message.content == "AB"
    assert server.requests == 2 and len(sleeps.delays) == 1


FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'


def test_a_connection_lost_after_done_still_gives_the_answer(scripted):
    server = scripted([SSE_HEAD + _chunked(TOKEN_A, FINISH, b"data: [DONE]\n\n")])  # no last chunk

    message = model_for(server.base_url).invoke("x")

    assert message.content == "A"
    assert message.response_metadata["finish_reason"] == "stop"


def test_a_body_without_chunked_encoding_is_read_as_it_arrives(scripted):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    server = scripted([head + TOKEN_A + TOKEN_B + FINISH + b"data: [DONE]\n\n"])

    assert model_for(server.base_url).invoke("x").content == "AB"


@pytest.mark.parametrize(("answer", "match"), [
    pytest.param(SSE_HEAD + _chunked(b'data: {"choices": [\n\n') + b"0\r\n\r\n",
                 "not a JSON object in the event stream", id="bad-json"),
    pytest.param(SSE_HEAD + _chunked(b'data: {"error": {"message": "overloaded"}}\n\n')
                 + b"0\r\n\r\n", "^overloaded$", id="error-event"),
    pytest.param(SSE_HEAD + _chunked(TOKEN_A) + b"0\r\n\r\n",
                 "ended without", id="ended-without-done"),
    pytest.param(_json_response("200 OK", b'{"choices": []}'),
                 "expected an event stream", id="not-an-event-stream"),
])
def test_malformed_answers_are_response_errors(scripted, answer, match):
    server = scripted([answer])

    with pytest.raises(ProviderResponseError, match=match):
        model_for(server.base_url, max_retries=2, retry_sleep=Sleeps()).invoke("x")
    assert server.requests == 1


# ---------------------------------------------------------------------------------------
# The SSE decoder and the retry policy


@pytest.mark.parametrize(("pieces", "expected"), [
    pytest.param([b"data: a\n\ndata: b\n\n"], [b"a", b"b"], id="two-events"),
    pytest.param([b"da", b"ta: a", b"bc\n", b"\nda", b"ta: d\n\n"], [b"abc", b"d"],
                 id="split-anywhere"),
    pytest.param([b"data: a\r\n\r\n"], [b"a"], id="crlf"),
    pytest.param([b": comment\nevent: x\nid: 3\ndata:a\n\n"], [b"a"], id="other-fields"),
    pytest.param([b"data: a\ndata: b\n\n"], [b"a\nb"], id="multi-line"),
    pytest.param([b"data: a\n\n", b"data: [DONE]"], [b"a", b"[DONE]"], id="no-final-blank"),
    pytest.param([b"\n\n", b"data: a\n\n"], [b"a"], id="empty-events"),
])
def test_sse_data(pieces, expected):
    assert list(_sse_data(pieces)) == expected


def error(retryable=True, retry_after=None):
    return ProviderError("x", retryable=retryable, retry_after=retry_after)


@pytest.mark.parametrize(("policy", "retry", "err", "delay"), [
    pytest.param(RetryPolicy(max_retries=2, jitter=lambda: 0.0), 1, error(), 0.125, id="first"),
    pytest.param(RetryPolicy(max_retries=2, jitter=lambda: 0.999), 2, error(), 0.49975,
                 id="doubles"),
    pytest.param(RetryPolicy(max_retries=9, jitter=lambda: 0.0), 9, error(), 2.0, id="capped"),
    pytest.param(RetryPolicy(max_retries=2), 3, error(), None, id="exhausted"),
    pytest.param(RetryPolicy(max_retries=0), 1, error(), None, id="no-retries"),
    pytest.param(RetryPolicy(max_retries=2), 1, error(retryable=False), None, id="not-retryable"),
    pytest.param(RetryPolicy(max_retries=2), 1, error(retry_after=3.0), 3.0, id="retry-after"),
    pytest.param(RetryPolicy(max_retries=2), 1, error(retry_after=60.0), None,
                 id="retry-after-too-long"),
])
def test_retry_policy_delay(policy, retry, err, delay):
    got = policy.delay(retry, err)

    if delay is None:
        assert got is None
    else:
        assert got == pytest.approx(delay)


@pytest.mark.parametrize("kwargs", [
    pytest.param({"max_retries": -1}, id="negative-retries"),
    pytest.param({"backoff_s": 5.0, "max_backoff_s": 1.0}, id="backoff-above-cap"),
])
def test_retry_policy_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)
