"""The LLM simulator, tested as a real gunicorn process over real sockets with real clients."""

from __future__ import annotations

import array
import base64
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import requests
from langchain_openai import ChatOpenAI
from support.waiting import wait_until

from flowgate.llm_sim import (
    SimSettings,
    count_prompt_tokens,
    find_expression,
    plan_tool_call,
    reply_tokens,
    tool_result_tokens,
)

pytestmark = pytest.mark.integration

MODEL = "flowgate-sim"
QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]


def _client(sim: Any, **kwargs: Any) -> openai.OpenAI:
    # max_retries=0: the client would otherwise silently retry our injected 429/500s.
    return openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=30, **kwargs)


def _text(sim: Any, messages: list[dict[str, Any]] = MESSAGES, **kwargs: Any) -> str:
    resp = _client(sim).chat.completions.create(model=MODEL, messages=messages, **kwargs)
    return resp.choices[0].message.content


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _stats_settle(sim: Any, **expected: int) -> dict[str, Any]:
    """Poll /sim/stats until the given counters have the given values (streams end async)."""
    box: dict[str, Any] = {}

    def check() -> bool:
        box["s"] = sim.stats()
        return all(box["s"][k] == v for k, v in expected.items())

    try:
        _wait_for(check)
    except AssertionError:
        pytest.fail(f"stats never reached {expected}: {box['s']}")
    return box["s"]


@pytest.fixture(autouse=True)
def _no_streams_left_over(llm_sim: Any) -> None:
    """The session's simulator is shared: a stream an earlier test module closed early ends
    on the server a moment later, and would count in this module's stats. Wait until no
    stream is open, then zero the counters (fresh_llm_sim zeroes them again)."""
    _wait_for(lambda: llm_sim.stats()["active_streams"] == 0)
    llm_sim.reset()


# --- pure unit tests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"ttft_s": -0.1}, "ttft_s", id="negative-ttft"),
        pytest.param({"tokens_per_s": "fast"}, "tokens_per_s", id="tps-not-number"),
        pytest.param({"error_rate": 1.01}, "error_rate", id="error-rate-above-1"),
        pytest.param({"error_rate": True}, "error_rate", id="error-rate-bool"),
        pytest.param({"reply_tokens": 0}, "reply_tokens", id="zero-reply-tokens"),
        pytest.param({"reply_tokens": 2.5}, "reply_tokens", id="fractional-reply-tokens"),
        pytest.param({"error_kinds": ("500", "503")}, "error_kinds", id="unknown-error-kind"),
        pytest.param({"error_kinds": ()}, "error_kinds", id="no-error-kinds"),
        pytest.param({"embedding_dim": 0}, "embedding_dim", id="zero-dim"),
        pytest.param({"hang_s": float("nan")}, "hang_s", id="nan-hang"),
        pytest.param({"seed": "7"}, "seed", id="seed-not-int"),
        pytest.param({"model_error_rates": {"m": 2}}, "model_error_rates", id="model-rate-above-1"),
        pytest.param({"model_error_rates": {"": 0.5}}, "model_error_rates", id="model-name-empty"),
        pytest.param({"model_error_rates": [0.5]}, "model_error_rates", id="model-rates-list"),
    ],
)
def test_sim_settings_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimSettings(**kwargs)


def test_sim_settings_normalises_error_kinds_and_rejects_unknown_fields() -> None:
    assert SimSettings(error_kinds="500, timeout").error_kinds == ("500", "timeout")
    assert SimSettings(error_kinds=["429", "429"]).error_kinds == ("429",)
    with pytest.raises(ValueError, match="unknown setting"):
        SimSettings().updated({"ttft": 1})
    assert SimSettings().updated({"ttft_s": 2}).ttft_s == 2


def test_reply_is_deterministic_and_truncation_is_a_prefix() -> None:
    msgs = [("user", "one two three four five six seven eight nine ten")]
    full = reply_tokens(msgs, 24)
    assert full == reply_tokens(msgs, 24)
    assert reply_tokens(msgs, 5) == full[:5]
    assert "".join(full).startswith('[simulated reply] you said: "one two')
    assert ' eight..."' in "".join(full)  # long messages are quoted in part
    assert reply_tokens(msgs, 24, seed=1)[:12] == full[:12]  # the seed salts the filler only
    assert reply_tokens(msgs, 24, seed=1) != full
    assert count_prompt_tokens(msgs) == 10 + 4 + 3


# --- chat completions over the wire -----------------------------------------------------------


def test_non_streamed_completion_with_openai_client(fresh_llm_sim: Any) -> None:
    client = _client(fresh_llm_sim)
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert first.object == "chat.completion"
    assert first.id.startswith("chatcmpl-") and first.id != again.id
    assert first.model == MODEL
    choice = first.choices[0]
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "stop")
    text = choice.message.content
    assert text.startswith(f'[simulated reply] you said: "{QUESTION}"')
    assert text == again.choices[0].message.content
    assert first.usage.completion_tokens == len(text.split()) == 24
    assert first.usage.prompt_tokens == (2 + 4) + (6 + 4) + 3
    assert first.usage.total_tokens == first.usage.prompt_tokens + 24

    other = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Something else entirely"}])
    assert other.choices[0].message.content != text
    assert other.usage.prompt_tokens == 3 + 4 + 3


@pytest.mark.parametrize("include_usage", [pytest.param(True, id="usage"),
                                           pytest.param(False, id="no-usage")])
def test_streamed_completion_with_openai_client(fresh_llm_sim: Any, include_usage: bool) -> None:
    expected = _text(fresh_llm_sim)
    stream = _client(fresh_llm_sim).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True,
        stream_options={"include_usage": include_usage})
    chunks = list(stream)

    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    tokens = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert len(tokens) == 24
    assert tokens[0] == "[simulated" and all(t.startswith(" ") for t in tokens[1:])
    assert "".join(tokens) == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["stop"] and finishes[-1] == "stop"
    if include_usage:
        assert chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == 24
        assert chunks[-1].usage.prompt_tokens == (2 + 4) + (6 + 4) + 3
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert all(c.choices and c.usage is None for c in chunks)
    _stats_settle(fresh_llm_sim, chat_completions_started=2, chat_completions_completed=2,
                  tokens_sent=48, streams_closed_early=0, active_streams=0)


def test_langchain_chat_openai_invoke_and_stream(fresh_llm_sim: Any) -> None:
    prompt = "Tell me about Flowgate"
    expected = _text(fresh_llm_sim, [{"role": "user", "content": prompt}])
    llm = ChatOpenAI(model=MODEL, base_url=fresh_llm_sim.base_url, api_key="x",
                     streaming=True, stream_usage=True, max_retries=0)

    message = llm.invoke(prompt)
    assert message.content == expected
    assert message.usage_metadata["output_tokens"] == 24
    assert message.usage_metadata["input_tokens"] == 4 + 4 + 3

    pieces = [chunk.content for chunk in llm.stream(prompt)]
    assert "".join(pieces) == expected
    assert len([p for p in pieces if p]) == 24
    _stats_settle(fresh_llm_sim, chat_completions_completed=3, active_streams=0)


@pytest.mark.parametrize(
    ("limit", "stream", "n", "finish"),
    [
        pytest.param({"max_tokens": 5}, False, 5, "length", id="max_tokens"),
        pytest.param({"max_completion_tokens": 3}, False, 3, "length", id="max_completion"),
        pytest.param({"max_tokens": 5}, True, 5, "length", id="max_tokens-streamed"),
        pytest.param({"max_tokens": 100}, False, 24, "stop", id="limit-above-reply"),
    ],
)
def test_max_tokens_truncates_reply(
    fresh_llm_sim: Any, limit: dict[str, int], stream: bool, n: int, finish: str
) -> None:
    full = _text(fresh_llm_sim).split(" ")
    client = _client(fresh_llm_sim)
    if stream:
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, **limit))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        got_finish = chunks[-1].choices[0].finish_reason
    else:
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, **limit)
        text, got_finish = resp.choices[0].message.content, resp.choices[0].finish_reason
        assert resp.usage.completion_tokens == n
    assert text == " ".join(full[:n])
    assert got_finish == finish


def test_reply_tokens_setting_applies_at_runtime(fresh_llm_sim: Any) -> None:
    assert fresh_llm_sim.configure(reply_tokens=7)["reply_tokens"] == 7
    resp = _client(fresh_llm_sim).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert resp.usage.completion_tokens == 7 and resp.choices[0].finish_reason == "stop"


def test_ttft_and_tokens_per_second_are_honoured(fresh_llm_sim: Any) -> None:
    """Streaming is told by the sim's state, not by the test's clock (a stalled client reads
    a burst); the pace by lower bounds from the start, which a stall can only raise."""
    ttft, tps, n = 3.0, 40.0, 100  # the margins a stalled test thread has: 3 s, then 2.5 s
    fresh_llm_sim.configure(ttft_s=ttft, tokens_per_s=tps, reply_tokens=n)
    client = _client(fresh_llm_sim)

    start = time.monotonic()
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    sent_at_headers = fresh_llm_sim.stats()["tokens_sent"]
    arrivals, sent_at_first = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if sent_at_first is None:
                sent_at_first = fresh_llm_sim.stats()["tokens_sent"]
            arrivals.append(time.monotonic() - start)

    assert len(arrivals) == n
    # Headers come before the first token, as with OpenAI: create() returns early.
    assert sent_at_headers == 0
    # The first token reached us long before the last one was generated.
    assert sent_at_first < n, sent_at_first
    assert arrivals[0] >= ttft - 0.05
    assert arrivals[-1] >= ttft + 0.8 * (n - 1) / tps

    start = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert time.monotonic() - start >= ttft + 0.8 * (n - 1) / tps


def test_slow_requests_are_served_concurrently(fresh_llm_sim: Any) -> None:
    # One gevent worker: its waits must be cooperative (monkey-patched), or one waiting
    # request would keep the other 19 from being read. Told by state: all 20 wait at once.
    fresh_llm_sim.configure(hold=True)

    def call(_: int) -> int:
        return requests.post(f"{fresh_llm_sim.base_url}/chat/completions", timeout=60,
                             json={"model": MODEL, "messages": MESSAGES}).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = pool.map(call, range(20))
        try:
            wait_until(lambda: fresh_llm_sim.stats()["held"] == 20,
                       what="20 requests held at once")
        finally:
            fresh_llm_sim.configure(hold=False)
        assert list(answers) == [200] * 20


def test_client_closing_stream_early_is_counted(fresh_llm_sim: Any) -> None:
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=500)  # 10 s if read to the end
    client = _client(fresh_llm_sim)
    streams = [client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
               for _ in range(2)]
    for stream in streams:
        for _, _chunk in zip(range(3), stream, strict=False):
            pass
    # Both streams are served concurrently by the one gevent worker.
    _stats_settle(fresh_llm_sim, active_streams=2)
    for stream in streams:
        stream.close()

    stats = _stats_settle(fresh_llm_sim, streams_closed_early=2, active_streams=0)
    assert stats["chat_completions_started"] == 2
    assert stats["chat_completions_completed"] == 0
    assert 4 <= stats["tokens_sent"] < 500
    # the request log says which calls were cut off (a drill tells retries from duplicates)
    assert [r["closed_early"] for r in fresh_llm_sim.requests()] == [True, True]


def test_a_stream_read_to_its_end_is_not_marked_closed_early(fresh_llm_sim: Any) -> None:
    client = _client(fresh_llm_sim)
    for _chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
        pass
    client.chat.completions.create(model=MODEL, messages=MESSAGES)

    _stats_settle(fresh_llm_sim, chat_completions_completed=2, active_streams=0)
    assert [r["closed_early"] for r in fresh_llm_sim.requests()] == [False, False]


# --- injected failures ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [pytest.param(False, id="plain"),
                                    pytest.param(True, id="streamed")])
@pytest.mark.parametrize(
    ("kind", "exc", "error_type"),
    [
        pytest.param("500", openai.InternalServerError, "server_error", id="500"),
        pytest.param("429", openai.RateLimitError, "requests", id="429"),
    ],
)
def test_injected_errors(fresh_llm_sim: Any, kind: str, exc: type[openai.APIStatusError],
                         error_type: str, stream: bool) -> None:
    fresh_llm_sim.configure(error_rate=1, error_kinds=[kind])
    with pytest.raises(exc) as info:
        _client(fresh_llm_sim).chat.completions.create(model=MODEL, messages=MESSAGES,
                                                       stream=stream)
    assert info.value.status_code == int(kind)
    assert info.value.body["type"] == error_type
    if kind == "429":
        assert info.value.response.headers["retry-after"] == "1"
    stats = fresh_llm_sim.stats()
    assert stats["errors_injected"][kind] == 1
    assert stats["chat_completions_started"] == 0


def test_injected_timeout_hangs_then_504(fresh_llm_sim: Any) -> None:
    fresh_llm_sim.configure(error_rate=1, error_kinds=["timeout"], hang_s=0.5)
    start = time.monotonic()
    resp = requests.post(f"{fresh_llm_sim.base_url}/chat/completions",
                         json={"model": MODEL, "messages": MESSAGES}, timeout=10)
    assert time.monotonic() - start >= 0.45
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "timeout"
    assert fresh_llm_sim.stats()["errors_injected"]["timeout"] == 1


def test_model_error_rates_fail_only_the_model_named(fresh_llm_sim: Any) -> None:
    fresh_llm_sim.configure(model_error_rates={"canary-model": 1.0}, error_kinds=["500"])

    def status(model: str) -> int:
        return requests.post(f"{fresh_llm_sim.base_url}/chat/completions", timeout=10,
                             json={"model": model, "messages": MESSAGES}).status_code

    assert [status("canary-model") for _ in range(5)] == [500] * 5
    assert [status(MODEL) for _ in range(5)] == [200] * 5
    assert fresh_llm_sim.stats()["errors_injected"]["500"] == 5


def test_error_injection_is_random_but_seeded(fresh_llm_sim: Any) -> None:
    def statuses() -> list[int]:
        fresh_llm_sim.configure(error_rate=0.5, error_kinds=["500", "429"], seed=7)
        return [requests.post(f"{fresh_llm_sim.base_url}/chat/completions", timeout=10,
                              json={"model": MODEL, "messages": MESSAGES}).status_code
                for _ in range(40)]

    first = statuses()
    assert {200, 500, 429} == set(first)
    assert statuses() == first


# --- other endpoints --------------------------------------------------------------------------


def test_embeddings_are_deterministic_unit_vectors(fresh_llm_sim: Any) -> None:
    # The openai client asks for base64 unless told otherwise; the sim must honour both.
    resp = _client(fresh_llm_sim).embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta", "alpha"])
    vectors = [d.embedding for d in resp.data]
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert all(len(v) == 64 for v in vectors)
    assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-5) for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert resp.usage.prompt_tokens == 3

    url = f"{fresh_llm_sim.base_url}/embeddings"
    floats = requests.post(url, json={"model": "m", "input": "alpha", "encoding_format": "float"},
                           timeout=10).json()["data"][0]["embedding"]
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(floats, vectors[0], strict=True))
    packed = requests.post(url, json={"model": "m", "input": "alpha", "encoding_format": "base64"},
                           timeout=10).json()["data"][0]["embedding"]
    assert list(array.array("f", base64.b64decode(packed))) == vectors[0]  # float32, LE

    small = requests.post(url, json={"model": "m", "input": "alpha", "dimensions": 8},
                          timeout=10).json()["data"][0]["embedding"]
    assert len(small) == 8 and math.isclose(math.hypot(*small), 1.0)
    fresh_llm_sim.configure(embedding_dim=32)
    configured = requests.post(url, json={"model": "m", "input": "alpha"}, timeout=10).json()
    assert len(configured["data"][0]["embedding"]) == 32


def test_models_list_and_retrieve(fresh_llm_sim: Any) -> None:
    client = _client(fresh_llm_sim)
    assert MODEL in [m.id for m in client.models.list()]
    assert client.models.retrieve("gpt-anything").id == "gpt-anything"


def test_counters_by_endpoint_and_reset(fresh_llm_sim: Any) -> None:
    client = _client(fresh_llm_sim)
    client.models.list()
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    client.embeddings.create(model="m", input="x")
    stats = fresh_llm_sim.stats()
    assert stats["requests"] == {"/v1/models": 1, "/v1/chat/completions": 1, "/v1/embeddings": 1}
    assert stats["tokens_sent"] == 24
    zeroed = fresh_llm_sim.reset()
    assert zeroed["requests"] == {} and zeroed["tokens_sent"] == 0


CHAT, EMB = "/chat/completions", "/embeddings"
OK_CHAT = {"model": MODEL, "messages": MESSAGES}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(CHAT, b"{not json", id="bad-json"),
        pytest.param(CHAT, [1, 2], id="not-an-object"),
        pytest.param(CHAT, {"model": MODEL}, id="missing-messages"),
        pytest.param(CHAT, {"model": MODEL, "messages": []}, id="empty-messages"),
        pytest.param(CHAT, {"model": MODEL, "messages": "hi"}, id="messages-not-list"),
        pytest.param(CHAT, {"model": MODEL, "messages": [{"content": "x"}]}, id="no-role"),
        pytest.param(CHAT, {"model": MODEL, "messages": ["hi"]}, id="message-not-object"),
        pytest.param(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 42}]},
                     id="content-int"),
        pytest.param(CHAT, {"messages": MESSAGES}, id="missing-model"),
        pytest.param(CHAT, {**OK_CHAT, "max_tokens": "5"}, id="max-tokens-str"),
        pytest.param(CHAT, {**OK_CHAT, "max_tokens": 0}, id="max-tokens-zero"),
        pytest.param(CHAT, {**OK_CHAT, "stream": "yes"}, id="stream-not-bool"),
        pytest.param(CHAT, {**OK_CHAT, "stream_options": []}, id="stream-options-list"),
        pytest.param(CHAT, {**OK_CHAT, "n": 2}, id="n-2"),
        pytest.param(EMB, {"model": "m", "input": ""}, id="emb-empty-string"),
        pytest.param(EMB, {"model": "m", "input": []}, id="emb-empty-list"),
        pytest.param(EMB, {"model": "m", "input": 42}, id="emb-int"),
        pytest.param(EMB, {"model": "m", "input": ["a", None]}, id="emb-null-item"),
        pytest.param(EMB, {"model": "m", "input": "a", "encoding_format": "hex"}, id="emb-fmt"),
    ],
)
def test_malformed_requests_get_400_in_openai_format(
    fresh_llm_sim: Any, path: str, body: Any
) -> None:
    url = fresh_llm_sim.base_url + path
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    resp = requests.post(url, timeout=10, headers={"Content-Type": "application/json"}, **kwargs)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert fresh_llm_sim.stats()["bad_requests"] == 1


def test_unknown_path_is_404_in_openai_format(fresh_llm_sim: Any) -> None:
    resp = requests.post(f"{fresh_llm_sim.base_url}/completions/legacy", json={}, timeout=10)
    assert resp.status_code == 404
    assert "/v1/completions/legacy" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"error_rate": 1.5}, id="error-rate"),
        pytest.param({"ttft_s": -1}, id="negative-ttft"),
        pytest.param({"tokens_per_s": "fast"}, id="tps-str"),
        pytest.param({"error_kinds": ["503"]}, id="error-kind"),
        pytest.param({"error_kinds": []}, id="no-error-kinds"),
        pytest.param({"reply_tokens": 0}, id="reply-tokens"),
        pytest.param({"bogus": 1}, id="unknown-field"),
        pytest.param([1], id="not-an-object"),
    ],
)
def test_sim_config_rejects_bad_values(fresh_llm_sim: Any, body: Any) -> None:
    before = requests.get(f"{fresh_llm_sim.url}/sim/config", timeout=10).json()
    resp = requests.post(f"{fresh_llm_sim.url}/sim/config", json=body, timeout=10)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"]
    assert requests.get(f"{fresh_llm_sim.url}/sim/config", timeout=10).json() == before


def test_chat_requests_are_recorded_with_headers_and_client_port(fresh_llm_sim: Any) -> None:
    url = fresh_llm_sim.base_url + "/chat/completions"
    with requests.Session() as session:  # one keep-alive connection
        for question in ("first", "second"):
            body = {"model": MODEL, "messages": [{"role": "user", "content": question}]}
            session.post(url, json=body, headers={"Authorization": "Bearer k1"}, timeout=10)
    requests.post(url, json={**OK_CHAT, "temperature": 0.5}, timeout=10,
                  headers={"Connection": "close"})
    requests.post(url, json={"model": MODEL}, timeout=10)  # a 400 is not recorded

    seen = fresh_llm_sim.requests()

    assert [r["body"]["messages"][0]["content"] for r in seen] == ["first", "second", "Be brief."]
    assert seen[0]["headers"]["Authorization"] == "Bearer k1"
    assert "Authorization" not in seen[2]["headers"]
    assert seen[2]["body"]["temperature"] == 0.5
    assert seen[0]["remote_port"] == seen[1]["remote_port"] != seen[2]["remote_port"]
    fresh_llm_sim.reset()
    assert fresh_llm_sim.requests() == []


# --- embeddings that carry meaning -------------------------------------------------------------


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embeddings_put_texts_that_share_words_close_together(fresh_llm_sim: Any) -> None:
    texts = ["How long do refunds take?",
             "Refunds are issued within 5 business days of receiving the returned item.",
             "Shipping is free for orders over 50 EUR.",
             "refunding an order"]
    resp = _client(fresh_llm_sim).embeddings.create(model="text-embedding-3-small", input=texts,
                                                    dimensions=256)
    q, refunds, shipping, refunding = (d.embedding for d in resp.data)
    assert all(len(v) == 256 and math.isclose(math.hypot(*v), 1.0, abs_tol=1e-5)
               for v in (q, refunds, shipping, refunding))
    assert _cos(q, refunds) > _cos(q, shipping) + 0.1  # a shared word: closer
    assert _cos(q, refunding) > _cos(q, shipping)  # shared character trigrams: refund*
    again = _client(fresh_llm_sim).embeddings.create(model="m", input=texts[0], dimensions=256)
    assert again.data[0].embedding == q  # deterministic
    assert fresh_llm_sim.stats()["embedding_inputs"] == 5


def test_embed_is_pure_and_never_a_zero_vector() -> None:
    from flowgate.llm_sim import embed

    for text in ("the", "!!!", "a b c", "Ünïcödé wörds", "x" * 10_000):
        vec = embed(text, 16)
        assert math.isclose(math.hypot(*vec), 1.0, abs_tol=1e-9), text
    assert embed("Refund policy", 64) == embed("refund POLICY", 64)  # case does not matter
    assert embed("refund", 64) != embed("shipping", 64)


def test_embeddings_latency_and_injected_errors(fresh_llm_sim: Any) -> None:
    url = f"{fresh_llm_sim.base_url}/embeddings"
    fresh_llm_sim.configure(embedding_error_rate=1, error_kinds=["429"])
    limited = requests.post(url, json={"model": "m", "input": "x"}, timeout=10)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    chat = _client(fresh_llm_sim).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert chat.choices[0].message.content  # chat completions keep their own error rate
    fresh_llm_sim.configure(embedding_error_rate=0, embedding_latency_s=0.3)
    start = time.monotonic()
    assert requests.post(url, json={"model": "m", "input": "x"}, timeout=10).status_code == 200
    assert time.monotonic() - start >= 0.25
    assert fresh_llm_sim.stats()["errors_injected"]["429"] == 1


@pytest.mark.parametrize("kwargs", [pytest.param({"embedding_error_rate": 2}, id="rate"),
                                    pytest.param({"embedding_latency_s": -1}, id="latency")])
def test_embedding_settings_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SimSettings(**kwargs)


def test_embedding_requests_are_recorded_and_reset(fresh_llm_sim: Any) -> None:
    _client(fresh_llm_sim).embeddings.create(model="m", input=["a", "b"], dimensions=8)
    seen = requests.get(f"{fresh_llm_sim.url}/sim/embedding-requests", timeout=10).json()
    assert [(r["model"], r["inputs"], r["dimensions"]) for r in seen] == [("m", 2, 8)]
    assert seen[0]["headers"]["Authorization"] == "Bearer x"
    assert fresh_llm_sim.requests() == []  # chat completions are recorded apart
    fresh_llm_sim.reset()
    assert requests.get(f"{fresh_llm_sim.url}/sim/embedding-requests", timeout=10).json() == []


# --- tool calling ------------------------------------------------------------------------------

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Computes arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}
ORDERS = {"type": "function", "function": {
    "name": "orders", "description": "Looks orders up.",
    "parameters": {"type": "object", "properties": {"input": {"type": "string"},
                                                    "order": {"type": "integer"}}}}}
TOOLS = [CALCULATOR, ORDERS]


def _call(message: Any) -> dict[str, Any]:
    """An assistant message's tool call in the request shape (what a client sends back)."""
    [call] = message.tool_calls
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": call.function.arguments}}


@pytest.mark.parametrize(("text", "expression"), [
    pytest.param("What is (12 + 30) * 2?", "(12 + 30) * 2", id="parentheses"),
    pytest.param("compute 2^10 or 3*4*5 please", "3*4*5", id="longest-run"),
    pytest.param("12 × 7 ÷ 3", "12 × 7 ÷ 3", id="unicode-operators"),
    pytest.param("order 42 has 3 items", None, id="no-operator"),
    pytest.param("call me at 555-1234", "555-1234", id="looks-like-arithmetic"),
])
def test_the_arithmetic_expression_is_found_in_the_message(text: str, expression: str | None) -> None:
    assert find_expression(text) == expression


def _raw(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be exact."}, {"role": "user", "content": text}]


def _fns(*tools: dict[str, Any]) -> list[dict[str, Any]]:
    return [t["function"] for t in tools]


def test_the_tools_the_message_names_are_called_in_its_order_each_once() -> None:
    raw = _raw("Ask ORDERS about order 42, then use the calculator for 6*7")
    first = plan_tool_call(raw, _fns(*TOOLS), "auto")
    assert (first.name, json.loads(first.arguments)) == ("orders", {
        "input": "Ask ORDERS about order 42, then use the calculator for 6*7", "order": 42})
    raw += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": first.id, "type": "function", "function": {"name": "orders", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": first.id, "content": "order 42 shipped"}]
    second = plan_tool_call(raw, _fns(*TOOLS), "auto")
    assert (second.name, json.loads(second.arguments)) == ("calculator", {"expression": "6*7"})
    raw += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": second.id, "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": second.id, "content": "42"}]
    assert plan_tool_call(raw, _fns(*TOOLS), "auto") is None  # every named tool answered
    assert "".join(tool_result_tokens(raw, 24)).startswith(
        '[simulated reply] orders: "order 42 shipped" calculator: "42"')
    assert first.id != second.id and first.id == plan_tool_call(
        _raw("Ask ORDERS about order 42, then use the calculator for 6*7"), _fns(*TOOLS), "auto").id


@pytest.mark.parametrize(("choice", "called"), [
    pytest.param("auto", "calculator", id="none-named-first-tool"),
    pytest.param("required", "calculator", id="required"),
    pytest.param("orders", "orders", id="forced"),
    pytest.param("none", None, id="none"),
])
def test_tool_choice(choice: str, called: str | None) -> None:
    call = plan_tool_call(_raw("hello there"), _fns(*TOOLS), choice)
    assert (call.name if call else None) == called
    assert plan_tool_call(_raw("use the calculator: 1+1"), [], "auto") is None  # no tools


def test_a_tool_call_and_its_answer_with_the_openai_client(fresh_llm_sim: Any) -> None:
    client = _client(fresh_llm_sim)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is (12 + 30) * 2?"}]

    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)

    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "calculator", {"expression": "(12 + 30) * 2"})
    assert first.usage.completion_tokens >= 1

    messages += [{"role": "assistant", "content": None, "tool_calls": [_call(choice.message)]},
                 {"role": "tool", "tool_call_id": call.id, "content": "84"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)

    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content.startswith('[simulated reply] calculator: "84"')
    assert fresh_llm_sim.stats()["tool_calls_sent"] == 1


def test_a_streamed_tool_call_is_the_same_call_in_pieces(fresh_llm_sim: Any) -> None:
    client = _client(fresh_llm_sim)
    messages = [{"role": "user", "content": "use orders for order 7"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                                 stream=True, stream_options={"include_usage": True}))

    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert len(deltas) > 2  # the id and name first, then the arguments in pieces
    assert deltas[0].id and deltas[0].function.name == "orders"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    arguments = "".join(d.function.arguments for d in deltas)
    [expected] = whole.choices[0].message.tool_calls
    assert (deltas[0].id, arguments) == (expected.id, expected.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_langchain_chat_openai_runs_the_tool_loop(fresh_llm_sim: Any) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = ChatOpenAI(model=MODEL, base_url=fresh_llm_sim.base_url, api_key="x", max_retries=0)
    bound = llm.bind_tools([CALCULATOR])
    messages: list[Any] = [HumanMessage("How much is 6*7?")]

    asked = bound.invoke(messages)
    messages += [asked, ToolMessage("42", tool_call_id=asked.tool_calls[0]["id"])]
    answer = bound.invoke(messages)

    assert asked.tool_calls[0]["args"] == {"expression": "6*7"}
    assert answer.content.startswith('[simulated reply] calculator: "42"')


@pytest.mark.parametrize("messages", [
    pytest.param([{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "calculator", "arguments": "{}"}}]},
                  {"role": "user", "content": "well?"}], id="call-not-answered"),
    pytest.param([{"role": "user", "content": "hi"},
                  {"role": "tool", "tool_call_id": "call_9", "content": "42"}], id="orphan-result"),
    pytest.param([{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "42"}],
                 id="malformed-call"),
])
def test_the_tool_protocol_is_checked_as_openai_checks_it(fresh_llm_sim: Any,
                                                          messages: list[dict[str, Any]]) -> None:
    with pytest.raises(openai.BadRequestError):
        _client(fresh_llm_sim).chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert fresh_llm_sim.stats()["bad_requests"] == 1


@pytest.mark.parametrize("extra", [
    pytest.param({"tools": []}, id="empty"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "has space"}}]}, id="name"),
    pytest.param({"tools": [{"type": "code_interpreter"}]}, id="not-a-function"),
    pytest.param({"tools": TOOLS, "tool_choice": {"type": "function",
                                                  "function": {"name": "nope"}}}, id="choice"),
])
def test_malformed_tools_get_400(fresh_llm_sim: Any, extra: dict[str, Any]) -> None:
    resp = requests.post(f"{fresh_llm_sim.base_url}/chat/completions", timeout=10,
                         json={**OK_CHAT, **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith("tool")
