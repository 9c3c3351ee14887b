"""The ambassador app (create_app) against a tiny in-test engine on 127.0.0.1 (http.server in
a thread) or a dead port: /run-flow validation in the error contract, what goes upstream and
what never does, response headers, probes, metrics, 404s and the access log."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from app_harness import (
    API_KEYS,
    APP_KEY,
    ENGINE_ANSWER,
    INCOMING,
    INCOMING_SPAN,
    INCOMING_TRACE,
    OTHER_KEY,
    SERVICE_KEY,
    W3C,
    assert_error_contract,
    run_flow,
)
from prometheus_client.parser import text_string_to_metric_families

from flowgate.common.jsonlog import JsonFormatter

# -- /run-flow validation -------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "status", "code", "words"), [
    pytest.param({"data": '{"flow_id": "faq"}', "content_type": "text/plain"}, 415,
                 "unsupported_media_type", "application/json", id="text-plain"),
    pytest.param({"data": '{"flow_id": "faq"}'}, 415, "unsupported_media_type", "Content-Type",
                 id="no-content-type"),
    pytest.param({"data": '{"flow_id": ', "content_type": "application/json"}, 400, "bad_request",
                 "JSON", id="malformed-json"),
    pytest.param({"data": b'\xff\xfe', "content_type": "application/json"}, 400, "bad_request",
                 "JSON", id="not-utf8"),
    pytest.param({"json": ["faq"]}, 400, "bad_request", "object", id="not-an-object"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "temperature": 1}}, 400, "bad_request",
                 "temperature", id="unknown-field"),
    pytest.param({"json": {"input": "x"}}, 400, "bad_request", "flow_id", id="missing-flow-id"),
    pytest.param({"json": {"flow_id": 7, "input": "x"}}, 400, "bad_request", "flow_id",
                 id="flow-id-not-a-string"),
    pytest.param({"json": {"flow_id": "../admin", "input": "x"}}, 400, "bad_request", "flow_id",
                 id="flow-id-with-a-path"),
    pytest.param({"json": {"flow_id": "faq", "input": 42}}, 400, "bad_request", "input",
                 id="input-not-a-string"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "tweaks": ["a"]}}, 400, "bad_request",
                 "tweaks", id="tweaks-not-an-object"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "version": "2"}}, 400, "bad_request",
                 "version", id="version-a-string"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "version": 0}}, 400, "bad_request",
                 "version", id="version-zero"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "version": True}}, 400, "bad_request",
                 "version", id="version-a-bool"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "version": 2**31}}, 400,
                 "bad_request", "version", id="version-beyond-a-32-bit-integer"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "output_type": {}}}, 400,
                 "bad_request", "output_type", id="output-type-an-object"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "input_type": "voice"}}, 400,
                 "bad_request", "input_type", id="input-type-unknown"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "on_disconnect": 0}}, 400,
                 "bad_request", "on_disconnect", id="on-disconnect-a-number"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "stream": "yes"}}, 400, "bad_request",
                 "stream", id="stream-a-string"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "session_id": ""}}, 400, "bad_request",
                 "session_id", id="empty-session-id"),
    pytest.param({"json": {"flow_id": "faq", "input": "x", "session_id": "s" * 201}}, 400,
                 "bad_request", "session_id", id="session-id-too-long"),
    pytest.param({"json": {"flow_id": "faq", "input": "x" * 2000}}, 413, "payload_too_large", "",
                 id="body-over-max-body-bytes"),
])
def test_run_flow_validation_errors(make_app, engine, kwargs, status, code, words) -> None:
    client, _ = make_app(max_body_bytes=1024)
    response = client.post("/run-flow", **kwargs)
    error = assert_error_contract(response, status, code)
    assert words in error["message"]
    assert engine.requests == []


def test_validation_error_keeps_the_callers_trace(make_app) -> None:
    client, _ = make_app()
    response = client.post("/run-flow", data="{", content_type="application/json",
                           headers={"traceparent": INCOMING, "X-Request-ID": "req-7"})
    error = assert_error_contract(response, 400, "bad_request")
    assert error["trace_id"] == INCOMING_TRACE
    assert response.headers["traceparent"] == INCOMING
    assert response.headers["X-Request-ID"] == "req-7"


# -- what goes upstream ---------------------------------------------------------------------------

def test_upstream_request(make_app, engine) -> None:
    client, _ = make_app({"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS})
    body = {"flow_id": "faq", "input": "hello", "session_id": "s1",
            "tweaks": {"llm": {"temperature": 0}}, "version": 2}
    response = run_flow(client, body, headers={"Authorization": f"Bearer {APP_KEY}",
                                               "traceparent": INCOMING, "X-Request-ID": "req-42"})
    assert response.status_code == 200 and response.get_json() == ENGINE_ANSWER
    [sent] = engine.requests
    assert (sent["method"], sent["path"]) == ("POST", "/api/v1/run/faq")
    assert sent["body"] == {"input_value": "hello", "session_id": "s1",
                            "tweaks": {"llm": {"temperature": 0}}, "version": 2}
    headers = sent["headers"]
    assert headers["authorization"] == f"Bearer {SERVICE_KEY}"
    assert not any(APP_KEY in value for value in headers.values())
    match = W3C.match(headers["traceparent"])
    assert match and match[1] == INCOMING_TRACE and match[2] != INCOMING_SPAN
    assert headers["x-request-id"] == "req-42"
    assert headers["x-flowgate-identity"] == "orders-app"
    assert headers["x-flowgate-tenant"] == "shop"
    assert headers["idempotency-key"]


def test_x_api_key_never_goes_upstream(make_app, engine) -> None:
    client, _ = make_app({"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS})
    assert run_flow(client, headers={"x-api-key": OTHER_KEY}).status_code == 200
    headers = engine.requests[0]["headers"]
    assert "x-api-key" not in headers
    assert not any(OTHER_KEY in value for value in headers.values())
    assert headers["authorization"] == f"Bearer {SERVICE_KEY}"
    assert headers["x-flowgate-identity"] == "other-app"
    assert "x-flowgate-tenant" not in headers


def test_without_a_service_key_the_callers_token_is_not_forwarded(make_app, engine,
                                                                  monkeypatch) -> None:
    monkeypatch.delenv("AMBASSADOR_UPSTREAM_KEY")
    client, _ = make_app()
    assert run_flow(client, headers={"Authorization": "Bearer caller-token-1"}).status_code == 200
    assert "authorization" not in engine.requests[0]["headers"]


def test_an_integral_number_is_an_integer_version(make_app, engine) -> None:
    """JSON (and JSON Schema) make no difference between 2 and 2.0; the engine gets 2."""
    client, _ = make_app()
    response = run_flow(client, {"flow_id": "faq", "input": "x", "version": 2.0})
    assert response.status_code == 200, response.get_data(as_text=True)
    sent = engine.requests[0]["body"]["version"]
    assert sent == 2 and isinstance(sent, int)
    fraction = run_flow(client, {"flow_id": "faq", "input": "x", "version": 2.5})
    assert "version" in assert_error_contract(fraction, 400, "bad_request")["message"]
    assert len(engine.requests) == 1


@pytest.mark.parametrize("key", ["", "order 77", "k" * 201])
def test_an_idempotency_key_the_engine_would_not_take_is_a_400_here(make_app, engine,
                                                                    key) -> None:
    """An empty key was dropped on the way upstream while the retry filter counted on it:
    a run that timed out was retried without a key, and ran twice."""
    client, _ = make_app()
    response = run_flow(client, headers={"Idempotency-Key": key})
    assert "Idempotency-Key" in assert_error_contract(response, 400, "bad_request")["message"]
    assert engine.requests == []


def test_callers_idempotency_key_is_forwarded(make_app, engine) -> None:
    client, _ = make_app()
    run_flow(client, headers={"Idempotency-Key": "order-77"})
    assert engine.requests[0]["headers"]["idempotency-key"] == "order-77"


def test_a_new_trace_when_the_caller_sends_none(make_app, engine) -> None:
    client, _ = make_app()
    response = run_flow(client)
    trace_id = response.headers["X-Trace-ID"]
    mine = W3C.match(response.headers["traceparent"])
    upstream = W3C.match(engine.requests[0]["headers"]["traceparent"])
    assert mine and upstream and mine[1] == upstream[1] == trace_id
    assert upstream[2] != mine[2]
    assert engine.requests[0]["headers"]["x-request-id"] == response.headers["X-Request-ID"]


# -- response headers -----------------------------------------------------------------------------

def test_response_headers(make_app) -> None:
    client, _ = make_app()
    response = run_flow(client, headers={"traceparent": INCOMING, "X-Request-ID": "req-1"})
    assert response.status_code == 200
    assert response.headers["X-Trace-ID"] == INCOMING_TRACE
    assert response.headers["traceparent"] == INCOMING
    assert response.headers["X-Request-ID"] == "req-1"
    assert response.headers["X-Cache"] == "BYPASS"  # faq is not opted in
    assert response.headers["X-Upstream-Attempts"] == "1"
    assert float(response.headers["X-Ambassador-Overhead-Ms"]) >= 0
    assert response.headers["X-Run-ID"] == "run-1"  # engine headers that callers use pass


def test_cache_miss_then_hit(make_app, engine) -> None:
    client, _ = make_app({"flows.faq.cache": {"ttl_s": 60}})
    first, second = run_flow(client), run_flow(client)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.get_json() == ENGINE_ANSWER and len(engine.requests) == 1
    assert second.headers["X-Trace-ID"] != first.headers["X-Trace-ID"]


def test_the_memory_cache_is_bounded_by_bytes_and_says_what_it_holds(make_app, engine) -> None:
    """cache.max_bytes bounds the in-process cache whatever max_entries allows: 1 KiB holds
    one answer here, so the second evicts the first; the gauges say what is held."""
    client, amb = make_app({"flows.faq.cache": {"ttl_s": 60}, "cache.max_bytes": 1024,
                            "cache.max_entries": 1000})
    ask = [run_flow(client, {"flow_id": "faq", "input": text}) for text in ("a", "b", "a")]
    assert [r.headers["X-Cache"] for r in ask] == ["MISS", "MISS", "MISS"]
    assert len(engine.requests) == 3
    held = amb.metrics.cache_memory_bytes._value.get()
    assert 0 < held <= 1024
    assert amb.metrics.cache_memory_entries._value.get() == 1


SSE = (b'event: token\ndata: {"node": "llm", "index": 0, "text": "hi"}\n\n'
       b'event: run_finished\ndata: {"output": "hi"}\n\n')


@pytest.mark.parametrize(("body", "headers"), [
    pytest.param({"flow_id": "faq", "input": "x", "stream": True}, {}, id="stream-true"),
    pytest.param({"flow_id": "faq", "input": "x"}, {"Accept": "text/event-stream"}, id="accept-sse"),
])
def test_stream_passes_through(make_app, engine, body, headers) -> None:
    client, _ = make_app({"flows.faq.cache": {"ttl_s": 60}})
    engine.script.append((200, {"Content-Type": "text/event-stream"}, SSE))
    response = client.post("/run-flow", json=body, headers=headers)
    assert response.status_code == 200
    assert response.get_data() == SSE
    assert response.mimetype == "text/event-stream"
    assert response.headers["X-Cache"] == "BYPASS"  # streams are never cached
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Trace-ID"]
    [sent] = engine.requests
    assert sent["path"] == "/api/v1/run/faq?stream=true"
    assert sent["headers"]["accept"] == "text/event-stream"


def test_engine_503_is_retried_with_the_same_idempotency_key(make_app, engine) -> None:
    client, _ = make_app()
    engine.answer(503, {"error": {"code": "overloaded", "message": "busy"}}, {"Retry-After": "0"})
    response = run_flow(client)
    assert response.status_code == 200
    assert response.headers["X-Upstream-Attempts"] == "2"
    keys = {r["headers"]["idempotency-key"] for r in engine.requests}
    assert len(engine.requests) == 2 and len(keys) == 1


def test_engine_errors_pass_through_in_the_contract(make_app, engine) -> None:
    client, _ = make_app()
    engine.answer(404, {"error": {"code": "not_found", "message": "no flow 'faq'", "trace_id": "t"}})
    response = run_flow(client)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
    assert response.headers["X-Upstream-Attempts"] == "1"


def test_auth_refusal_through_the_app(make_app, engine) -> None:
    client, _ = make_app({"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS})
    response = run_flow(client, headers={"Authorization": "Bearer not-a-key-at-all"})
    assert_error_contract(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert engine.requests == []


# -- engine down, probes ------------------------------------------------------------------------

def test_engine_down(make_app, dead_port) -> None:
    # A refused connection is answered at once, never waited for: with a connect timeout of
    # 20 s, an attempt that waited for it would take longer than the generous bound below.
    client, amb = make_app({"upstream.url": f"http://127.0.0.1:{dead_port}",
                            "upstream.timeouts.connect_s": 20,
                            "breaker.consecutive_failures": 1})
    started = time.perf_counter()
    response = run_flow(client)
    assert time.perf_counter() - started < 10
    assert_error_contract(response, 503, "upstream_unavailable")
    assert response.headers["Retry-After"]
    assert response.headers["X-Upstream-Attempts"] == "3"  # connect errors are retried
    again = run_flow(client)  # the breaker opened
    assert_error_contract(again, 503, "circuit_open")
    assert int(again.headers["Retry-After"]) >= 1
    assert amb.breaker.state == "open"


def test_readyz_is_ready_even_when_the_engine_is_down(make_app, dead_port) -> None:
    client, _ = make_app({"upstream.url": f"http://127.0.0.1:{dead_port}",
                          "breaker.consecutive_failures": 1})
    assert client.get("/readyz").status_code == 200
    run_flow(client)
    response = client.get("/readyz")
    assert response.status_code == 200 and response.get_json()["status"] == "ready"
    assert "upstream" not in response.get_json()
    verbose = client.get("/readyz?verbose=1")
    assert verbose.status_code == 200
    upstream = verbose.get_json()["upstream"]
    assert upstream["breaker"] == "open"
    assert upstream["last_error"]["kind"] == "connect_error"
    assert upstream["last_error"]["at"] <= time.time()


def test_readyz_verbose_when_healthy(make_app) -> None:
    client, _ = make_app()
    run_flow(client)
    upstream = client.get("/readyz?verbose=1").get_json()["upstream"]
    assert upstream["breaker"] == "closed" and upstream["last_error"] is None
    assert upstream["last_ok"] is not None


def test_healthz(make_app, engine) -> None:
    client, _ = make_app()
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}
    assert W3C.match(response.headers["traceparent"])
    assert engine.requests == []


def test_metrics(make_app) -> None:
    client, _ = make_app()
    run_flow(client)
    response = client.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.get_data(as_text=True))}
    for name in ("flowgate_ambassador_requests", "flowgate_ambassador_request_duration_seconds",
                 "flowgate_ambassador_upstream_duration_seconds", "flowgate_ambassador_overhead_seconds",
                 "flowgate_ambassador_upstream_attempts", "flowgate_ambassador_retries",
                 "flowgate_ambassador_breaker_state", "flowgate_ambassador_cache",
                 "flowgate_ambassador_ratelimited", "flowgate_ambassador_auth_failures",
                 "flowgate_ambassador_upstream_up", "flowgate_ambassador_config_reload_errors"):
        assert name in families, name
    requests = {tuple(sorted(s.labels.items())): s.value
                for s in families["flowgate_ambassador_requests"].samples if s.name.endswith("_total")}
    assert requests[(("cache", "bypass"), ("flow", "faq"), ("route", "/run-flow"),
                     ("status", "200"))] == 1
    states = {s.labels["state"]: s.value for s in families["flowgate_ambassador_breaker_state"].samples}
    assert states == {"closed": 1, "open": 0, "half_open": 0}
    latency = {(s.labels["route"], s.labels["flow"]): s.value
               for s in families["flowgate_ambassador_request_duration_seconds"].samples
               if s.name.endswith("_count")}
    assert latency == {("/run-flow", "faq"): 1}  # by flow: the dashboard's $flow filters it


def test_redis_down_still_serves(make_app, engine, dead_port) -> None:
    """Redis down: rate limits and the cache go on locally (the second answer is a HIT from
    the in-memory fallback), and Redis is called once, then left alone for redis_pause_s —
    counted, not timed."""
    client, _ = make_app({"redis_url": f"redis://127.0.0.1:{dead_port}/0",
                          "redis_pause_s": 3600,
                          "ratelimit": {"requests_per_s": 100, "burst": 100},
                          "flows.faq.cache": {"ttl_s": 60}})
    first, second = run_flow(client), run_flow(client)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert len(engine.requests) == 1
    text = client.get("/metrics").get_data(as_text=True)
    assert re.search(r"^flowgate_ambassador_ratelimit_errors_total 2\.0$", text, re.M), text
    assert re.search(r'^flowgate_ambassador_cache_errors_total\{op="get"\} 2\.0$', text, re.M)
    assert re.search(r'^flowgate_ambassador_cache_fallback_total\{op="get"\} 2\.0$', text, re.M)
    assert re.search(r'^flowgate_ambassador_cache_fallback_total\{op="set"\} 1\.0$', text, re.M)
    assert re.search(r"^flowgate_ambassador_redis_failures_total 1\.0$", text, re.M)
    held = re.search(r"^flowgate_ambassador_cache_memory_bytes (\S+)$", text, re.M)
    assert held and float(held[1]) > len(first.data)
    assert re.search(r"^flowgate_ambassador_cache_memory_entries 1\.0$", text, re.M)


# -- unknown routes -----------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "status", "code"), [
    pytest.param("GET", "/nope", 404, "not_found", id="unknown-route"),
    pytest.param("POST", "/api/v1/run/faq", 404, "not_found", id="engine-path-not-exposed"),
    pytest.param("GET", "/run-flow", 405, "method_not_allowed", id="wrong-method"),
])
def test_unknown_routes_answer_json(make_app, engine, method, path, status, code) -> None:
    client, _ = make_app()
    response = client.open(path, method=method, headers={"traceparent": INCOMING})
    error = assert_error_contract(response, status, code)
    assert error["trace_id"] == INCOMING_TRACE
    assert engine.requests == []


def test_an_engine_path_sent_to_the_sidecar_says_where_to_go(make_app, engine) -> None:
    client, _ = make_app()
    for path in ("/api/v1/flows", "/api/v1/run/faq"):
        message = assert_error_contract(client.post(path, json={}), 404, "not_found")["message"]
        assert "this is the ambassador sidecar" in message and "POST /run-flow" in message
    assert "sidecar" not in assert_error_contract(client.get("/nope"), 404, "not_found")["message"]
    assert engine.requests == []


# -- access log -----------------------------------------------------------------------------------

class JsonLines(logging.Handler):
    """Formats each record when it is emitted (the trace context is still current then)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines() -> Iterator[JsonLines]:
    handler = JsonLines()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def access_entries(lines: JsonLines) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, lines.lines) if e["logger"] == "ambassador.access"]


def test_access_log_line(make_app, log_lines) -> None:
    client, _ = make_app({"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS,
                          "flows.faq.cache": {"ttl_s": 60}})
    response = run_flow(client, headers={"Authorization": f"Bearer {APP_KEY}",
                                         "traceparent": INCOMING})
    [entry] = access_entries(log_lines)
    assert entry["trace_id"] == INCOMING_TRACE == response.headers["X-Trace-ID"]
    assert entry["flow_id"] == "faq"
    assert entry["status"] == 200
    assert entry["attempts"] == 1
    assert entry["cache"] == "miss"
    assert entry["route"] == "/run-flow"


@pytest.mark.parametrize(("headers", "secret"), [
    pytest.param({"Authorization": f"Bearer {APP_KEY}"}, APP_KEY, id="bearer-accepted"),
    pytest.param({"x-api-key": OTHER_KEY}, OTHER_KEY, id="x-api-key-accepted"),
    pytest.param({"Authorization": "Bearer wrong-key-abcdef"}, "wrong-key-abcdef", id="bearer-refused"),
])
def test_logs_never_hold_credentials(make_app, log_lines, headers, secret) -> None:
    client, _ = make_app({"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS})
    run_flow(client, headers=headers)
    assert access_entries(log_lines), log_lines.lines
    text = "\n".join(log_lines.lines)
    assert secret not in text and SERVICE_KEY not in text


# -- config reload through the app ----------------------------------------------------------------

def test_hot_reload_keeps_the_explicit_overrides(make_app, engine, tmp_path: Path) -> None:
    cfg = tmp_path / "ambassador.yaml"
    cfg.write_text("retry: {max_attempts: 2}\n")
    os.utime(cfg, (1_000_000, 1_000_000))
    _client, amb = make_app(path=str(cfg))
    cfg.write_text("retry: {max_attempts: 3}\n")
    os.utime(cfg, (2_000_000, 2_000_000))
    amb.holder._next_check = float("-inf")  # the next check is due now (no real wait)
    assert amb.holder.maybe_reload() is True  # what the next request would do
    assert amb.settings.retry.max_attempts == 3
    assert amb.settings.upstream.url == engine.url


def test_hot_reload_cannot_turn_auth_off_when_started_on_a_public_address(
        make_app, engine, tmp_path: Path, monkeypatch) -> None:
    """``flowgate ambassador --host 0.0.0.0`` (no --force) sets AMBASSADOR_REFUSE_NO_AUTH:
    a reload to ``inbound_auth: none`` is refused like the start would be."""
    from ambassador.config import REFUSE_NO_AUTH_ENV

    monkeypatch.setenv(REFUSE_NO_AUTH_ENV, "1")
    cfg = tmp_path / "ambassador.yaml"
    cfg.write_text(f"inbound_auth: {{mode: api_keys, api_keys: [{{key: {APP_KEY}, identity: a}}]}}\n")
    os.utime(cfg, (1_000_000, 1_000_000))
    client, amb = make_app(path=str(cfg))
    cfg.write_text("inbound_auth: {mode: none}\n")
    os.utime(cfg, (2_000_000, 2_000_000))
    amb.holder._next_check = float("-inf")
    assert run_flow(client).status_code == 401  # this request triggered the reload check
    assert amb.settings.inbound_auth.mode == "api_keys"
    assert "non-loopback" in amb.holder.last_error
    assert client.get("/readyz?verbose=1").get_json()["config"]["last_reload_failed"] is True
    verbose = client.get("/readyz?verbose=1", headers={"x-api-key": APP_KEY}).get_json()
    assert "non-loopback" in verbose["config"]["last_reload_error"]


# -- GET /runs/<id>/events as a hostile caller ------------------------------------------------

@pytest.mark.parametrize(("path", "headers", "words"), [
    pytest.param("/runs/r1%0A/events", {}, "run id", id="run-id-trailing-newline"),
    pytest.param("/runs/r1/events?last_event_id=%C2%B2", {}, "last_event_id",
                 id="query-superscript-two"),
    pytest.param("/runs/r1/events?last_event_id=%D9%A3", {}, "last_event_id",
                 id="query-arabic-indic-three"),
    pytest.param("/runs/r1/events", {"Last-Event-ID": "\u00b2"}, "last-event-id",
                 id="header-superscript-two"),
    pytest.param("/runs/r1/events", {"Last-Event-ID": "12abc"}, "last-event-id",
                 id="header-letters"),
    pytest.param("/runs/r1/events", {"X-Request-ID": "r\u00e9q"}, "x-request-id",
                 id="request-id-latin-1"),
])
def test_run_events_refuse_bad_input_before_the_engine(make_app, engine, path, headers,
                                                       words) -> None:
    client, amb = make_app({"breaker.consecutive_failures": 1})
    error = assert_error_contract(client.get(path, headers=headers), 400, "bad_request")
    assert words in error["message"].lower()
    assert engine.requests == []
    assert amb.breaker.state == "closed"


def test_run_events_look_the_run_up_as_the_caller(make_app, engine) -> None:
    keys = [{"key": APP_KEY, "identity": "orders-app", "tenant": "shop", "flows": ["faq"]}]
    client, _ = make_app({"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": keys})
    engine.answer(200, {"run_id": "r1", "flow_id": "faq", "status": "succeeded"})
    response = client.get("/runs/r1/events", headers={"x-api-key": APP_KEY,
                                                      "Last-Event-ID": "4"})
    assert response.status_code == 200
    probe, events = engine.requests
    assert probe["path"] == "/api/v1/runs/r1"
    for sent in (probe, events):
        assert sent["headers"]["x-flowgate-identity"] == "orders-app"
        assert sent["headers"]["x-flowgate-tenant"] == "shop"
    assert events["headers"]["last-event-id"] == "4"


# -- /readyz?verbose=1 shows where things are only to those the inbound auth knows ------------

KEYS_MODE = {"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS}


@pytest.mark.parametrize(("config", "headers", "remote", "shown"), [
    pytest.param({}, {}, "127.0.0.1", True, id="none-loopback"),
    pytest.param({}, {}, "127.9.9.9", True, id="none-loopback-range"),
    pytest.param({}, {}, "::1", True, id="none-ipv6-loopback"),
    pytest.param({}, {}, "::ffff:127.0.0.1", True, id="none-ipv4-mapped-loopback"),
    pytest.param({}, {}, "10.1.2.3", False, id="none-remote"),
    pytest.param({}, {}, "", False, id="none-no-address"),
    pytest.param(KEYS_MODE, {}, "127.0.0.1", False, id="keys-no-credentials-even-on-loopback"),
    pytest.param(KEYS_MODE, {"x-api-key": "not-a-key-123"}, "127.0.0.1", False, id="keys-wrong-key"),
    pytest.param(KEYS_MODE, {"x-api-key": APP_KEY}, "10.1.2.3", True, id="keys-valid-key"),
    pytest.param(KEYS_MODE, {"Authorization": f"Bearer {OTHER_KEY}"}, "10.1.2.3", True,
                 id="keys-valid-bearer"),
    pytest.param({"filters": ["trace", "retry", "timeout"], **KEYS_MODE}, {"x-api-key": APP_KEY},
                 "10.1.2.3", False, id="keys-configured-but-auth-filter-off"),
])
def test_readyz_verbose_hides_locations_from_strangers(make_app, engine, tmp_path: Path, config,
                                                      headers, remote, shown) -> None:
    cfg = tmp_path / "ambassador.yaml"
    cfg.write_text("retry: {max_attempts: 2}\n")
    client, amb = make_app(config, path=str(cfg))
    amb.holder.last_error = "retry.max_attempts: bad (in /etc/secret/place.yaml)"
    response = client.get("/readyz?verbose=1", headers=headers, environ_base={"REMOTE_ADDR": remote})
    assert response.status_code == 200
    body, text = response.get_json(), response.get_data(as_text=True)
    assert body["upstream"]["breaker"] == "closed" and "last_ok" in body["upstream"]
    assert body["config"]["last_reload_failed"] is True
    for secret in (engine.url, str(cfg), "/etc/secret/place.yaml"):
        assert (secret in text) is shown, (secret, text)
    if shown:
        assert body["upstream"]["url"] == engine.url and body["config"]["path"] == str(cfg)
    assert amb.metrics.auth_failures.labels("invalid_key")._value.get() == 0
    assert amb.metrics.auth_failures.labels("missing")._value.get() == 0
