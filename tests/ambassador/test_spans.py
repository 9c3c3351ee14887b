"""The ambassador's spans (ambassador/filters/observe.py, ambassador/upstream.py): a server span
per request with a client span per upstream attempt, the retry and breaker decisions as its
events, the caller's identity and tenant; probes and scrapes make none. The app runs against
the tiny in-test engine over 127.0.0.1 (app_harness.py); spans go to the SDK's in-memory
exporter."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from app_harness import API_KEYS, APP_KEY, INCOMING, INCOMING_SPAN, INCOMING_TRACE, run_flow
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from flowgate.common import gevent_worker
from flowgate.common.otel import Telemetry

KEYS_MODE = {"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS}


@pytest.fixture
def traced_app(make_app) -> Callable[..., tuple[Any, Callable[[], list[ReadableSpan]]]]:
    """``traced_app(**dotted)`` → (test client, finished spans): the app exporting every span
    to memory, as it does over OTLP when the OTEL_* variables are set."""

    def build(config: dict[str, Any] | None = None, **dotted: Any):
        client, amb = make_app(config, **dotted)
        exporter = InMemorySpanExporter()
        amb.telemetry = Telemetry("flowgate-ambassador", exporter, environ={})

        def finished() -> list[ReadableSpan]:
            assert amb.telemetry.flush()
            return list(exporter.get_finished_spans())

        return client, finished

    return build


def server_span(spans: list[ReadableSpan]) -> ReadableSpan:
    [server] = [s for s in spans if s.kind == SpanKind.SERVER]
    return server


def attempts(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.kind == SpanKind.CLIENT
                   and s.parent.span_id == parent.context.span_id),
                  key=lambda s: s.attributes["flowgate.attempt"])


def test_a_retried_request_has_a_span_per_attempt_and_a_retry_event(traced_app,
                                                                     engine) -> None:
    client, finished = traced_app()
    engine.answer(503, {"error": {"code": "overloaded", "message": "busy"}}, {"Retry-After": "0"})

    response = run_flow(client, headers={"traceparent": INCOMING})

    assert response.status_code == 200
    spans = finished()
    server = server_span(spans)
    assert server.name == "POST /run-flow"
    assert (f"{server.context.trace_id:032x}", f"{server.parent.span_id:016x}") == (
        INCOMING_TRACE, INCOMING_SPAN)
    assert server.attributes["flowgate.attempts"] == 2
    first, second = attempts(spans, server)
    assert [a.attributes["flowgate.attempt"] for a in (first, second)] == [1, 2]
    assert first.name == second.name == "POST /api/v1/run/{flow}"
    assert first.attributes["http.response.status_code"] == 503
    assert first.status.status_code == StatusCode.ERROR
    assert second.attributes["http.response.status_code"] == 200
    assert second.status.status_code != StatusCode.ERROR
    [retry] = [e for e in server.events if e.name == "retry"]
    assert retry.attributes["flowgate.retry.attempt"] == 2
    assert retry.attributes["flowgate.retry.reason"]
    assert first.end_time <= retry.timestamp <= second.start_time
    # the engine continues the trace under the attempt that reached it
    sent = [r["headers"]["traceparent"] for r in engine.requests]
    assert sent == [f"00-{INCOMING_TRACE}-{a.context.span_id:016x}-01" for a in (first, second)]


def test_a_request_the_open_breaker_refuses_says_so_on_its_span(traced_app, dead_port) -> None:
    client, finished = traced_app({"upstream.url": f"http://127.0.0.1:{dead_port}",
                                   "breaker.consecutive_failures": 1})
    assert run_flow(client).status_code == 503  # the engine is down: the breaker opens
    before = {s.context.span_id for s in finished()}

    refused = run_flow(client)

    assert refused.get_json()["error"]["code"] == "circuit_open"
    spans = [s for s in finished() if s.context.span_id not in before]
    server = server_span(spans)
    [event] = [e for e in server.events if e.name == "breaker_rejected"]
    assert event.attributes["flowgate.breaker.state"] == "open"
    assert attempts(spans, server) == []  # the engine was not called
    assert server.attributes["http.response.status_code"] == 503
    assert server.status.status_code == StatusCode.ERROR


def test_the_callers_identity_and_tenant_are_on_the_server_span(traced_app, engine) -> None:
    client, finished = traced_app(KEYS_MODE)

    assert run_flow(client, headers={"Authorization": f"Bearer {APP_KEY}"}).status_code == 200
    assert run_flow(client, headers={"Authorization": "Bearer not-a-key-at-all"}
                    ).status_code == 401

    known, stranger = sorted((s for s in finished() if s.kind == SpanKind.SERVER),
                             key=lambda s: s.attributes["http.response.status_code"])
    assert known.attributes["flowgate.identity"] == "orders-app"
    assert known.attributes["flowgate.tenant"] == "shop"
    assert "flowgate.identity" not in stranger.attributes
    assert "flowgate.tenant" not in stranger.attributes
    values = [str(v) for s in finished() for v in s.attributes.values()]
    assert not any(APP_KEY in v or "not-a-key-at-all" in v for v in values)


def test_probes_and_scrapes_make_no_spans(traced_app, engine) -> None:
    client, finished = traced_app()
    for path in ("/healthz", "/readyz", "/readyz?verbose=1", "/metrics"):
        assert client.get(path, headers={"traceparent": INCOMING}).status_code == 200, path
    assert run_flow(client).status_code == 200  # a request that is traced, for contrast
    assert [s.name for s in finished() if s.kind == SpanKind.SERVER] == ["POST /run-flow"]


def test_the_server_span_starts_when_the_request_arrived(traced_app, engine) -> None:
    """A request whose head arrived 5 s ago (the gevent worker notes it; here it is set) and
    waited for a busy worker since: its span shows the wait."""
    client, finished = traced_app()
    token = gevent_worker._ARRIVED.set(time.perf_counter() - 5)
    sent = time.time_ns()
    try:
        assert run_flow(client).status_code == 200
    finally:
        gevent_worker._ARRIVED.reset(token)
    assert server_span(finished()).start_time <= sent - 4_000_000_000
