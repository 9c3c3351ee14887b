"""POST /run-flow as a hostile caller uses it: ids with a trailing newline, headers that are
not ASCII, JSON nested deep enough to crash a serializer, and floods of made-up flow ids —
each refused with a 400 before the engine, never a 500, never counted by the circuit
breaker, never a new metric series."""

from __future__ import annotations

import uuid

import pytest
from app_harness import assert_error_contract, run_flow
from prometheus_client.parser import text_string_to_metric_families


def deep_tweaks(depth: int) -> str:
    """A /run-flow body whose tweaks nest ``depth`` objects (json.dumps would recurse)."""
    return '{"flow_id": "faq", "input": "x", "tweaks": ' + '{"t":' * depth + "1" + "}" * depth + "}"


@pytest.mark.parametrize(("body", "words"), [
    pytest.param({"flow_id": "faq\n", "input": "x"}, "flow_id", id="flow-id-trailing-newline"),
    pytest.param({"flow_id": "faq\n", "input": "x", "stream": True}, "flow_id",
                 id="flow-id-trailing-newline-streamed"),
])
def test_ids_are_matched_whole(make_app, engine, body, words) -> None:
    client, _ = make_app()
    error = assert_error_contract(run_flow(client, body), 400, "bad_request")
    assert words in error["message"]
    assert engine.requests == []


@pytest.mark.parametrize(("headers", "name"), [
    pytest.param({"Idempotency-Key": "commande-\u00e9t\u00e9"}, "idempotency-key",
                 id="idempotency-key-latin-1"),
    pytest.param({"X-Request-ID": "r\u00e9q-1"}, "x-request-id", id="request-id-latin-1"),
    pytest.param({"Idempotency-Key": "\u00c3\u00a9"}, "idempotency-key",
                 id="idempotency-key-utf8-bytes"),
    pytest.param({"Cache-Control": "no-cache\x01"}, "cache-control", id="control-character"),
    pytest.param({"Last-Event-ID": "\u00b2"}, "last-event-id", id="last-event-id-superscript"),
])
def test_headers_that_are_not_ascii_are_refused(make_app, engine, headers, name) -> None:
    client, _ = make_app()
    error = assert_error_contract(run_flow(client, headers=headers), 400, "bad_request")
    assert name in error["message"].lower()
    assert engine.requests == []


@pytest.mark.parametrize("depth", [65, 500, 960, 5000, 150_000])
def test_deep_json_is_a_400_and_never_opens_the_breaker(make_app, engine, depth) -> None:
    """~960 levels (7 KB) used to crash json.dumps on the upstream path: a 500 the breaker
    counted, so five of them opened the circuit for every caller."""
    client, amb = make_app({"breaker.consecutive_failures": 5})
    for _ in range(8):
        response = client.post("/run-flow", data=deep_tweaks(depth),
                               content_type="application/json")
        assert "deeper than 64" in assert_error_contract(response, 400, "bad_request")["message"]
    assert engine.requests == []
    assert amb.breaker.state == "closed"
    at_the_limit = client.post("/run-flow", data=deep_tweaks(62), content_type="application/json")
    assert at_the_limit.status_code == 200 and len(engine.requests) == 1


def flow_series(client) -> set[str]:
    text = client.get("/metrics").get_data(as_text=True)
    return {s.labels["flow"] for f in text_string_to_metric_families(text)
            for s in f.samples if f.name == "flowgate_ambassador_requests"}


@pytest.mark.parametrize(("config", "status"), [
    pytest.param({"breaker.consecutive_failures": 5}, 503, id="engine-down-503"),
    pytest.param({"ratelimit": {"requests_per_s": 0.001, "burst": 1}}, 429, id="rate-limited-429"),
])
def test_made_up_flow_ids_add_no_metric_series(make_app, dead_port, config, status) -> None:
    client, _ = make_app({"upstream.url": f"http://127.0.0.1:{dead_port}",
                          "flows": {"faq": {"fallback": {"output": "busy"}}}, **config})
    run_flow(client)  # the configured flow: its own label
    before = flow_series(client)
    statuses = {run_flow(client, {"flow_id": f"flow-{uuid.uuid4().hex}", "input": "x"}).status_code
                for _ in range(1000)}
    assert statuses == {status}
    assert flow_series(client) == before | {"other"}
    assert "faq" in before


def test_a_flow_the_engine_ran_keeps_its_label(make_app, engine) -> None:
    client, _ = make_app()
    engine.answer(404, {"error": {"code": "flow_not_found", "message": "no flow 'typo'"}})
    run_flow(client, {"flow_id": "typo", "input": "x"})
    run_flow(client, {"flow_id": "real-flow", "input": "x"})
    assert {"other", "real-flow"} <= flow_series(client)
    assert "typo" not in flow_series(client)


def test_input_value_is_langflows_name_for_input(make_app, engine) -> None:
    client, _ = make_app()
    for body in ({"flow_id": "faq", "input_value": "hello"},
                 {"flow_id": "faq", "input": "hello", "input_value": "hello"}):
        assert run_flow(client, body).status_code == 200
    assert [r["body"]["input_value"] for r in engine.requests] == ["hello", "hello"]
    for body in ({"flow_id": "faq", "input": "hello", "input_value": "bye"},
                 {"flow_id": "faq", "input_value": 7}):
        assert_error_contract(run_flow(client, body), 400, "bad_request")
    assert len(engine.requests) == 2
