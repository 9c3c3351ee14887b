"""Fallback: a configured answer replaces an engine failure for the flows that have one."""

from __future__ import annotations

import json

import pytest

from ambassador.chain import Response, error_response
from ambassador.filters.fallback import Fallback

FALLBACK = {"output": "Our assistant is busy; please try again."}


def engine_error(status: int, code: str) -> Response:
    return error_response(status, code, "engine trouble")


@pytest.fixture
def fallback(settings_with):
    return Fallback(settings_with(flows={"faq": {"fallback": FALLBACK}}))


@pytest.mark.parametrize(("status", "code"), [
    pytest.param(503, "upstream_unavailable", id="unreachable"),
    pytest.param(503, "circuit_open", id="breaker-open"),
    pytest.param(504, "upstream_timeout", id="timeout"),
    pytest.param(502, "llm_error", id="llm-failed"),
    pytest.param(500, "internal", id="engine-500"),
])
def test_engine_failure_is_answered_with_the_flows_fallback(fallback, downstream, request_for,
                                                            status, code):
    response = fallback(request_for("faq"), downstream(engine_error(status, code)))
    assert response.status == 200
    assert response.headers["X-Fallback"] == "true"
    body = json.loads(response.body)
    assert body["output"] == FALLBACK["output"]
    assert (body["fallback"], body["fallback_reason"], body["flow_id"]) == (True, code, "faq")


@pytest.mark.parametrize("response", [
    pytest.param(Response(200, {}, b'{"output": "real"}'), id="success"),
    pytest.param(error_response(404, "flow_not_found", "no"), id="client-error"),
    pytest.param(error_response(422, "flow_invalid", "no"), id="invalid-tweaks"),
    pytest.param(error_response(429, "rate_limited", "no"), id="rate-limited"),
])
def test_answers_that_are_not_engine_failures_pass_through(fallback, downstream, request_for,
                                                           response):
    out = fallback(request_for("faq"), downstream(response))
    assert out.status == response.status
    assert "X-Fallback" not in out.headers


def test_flows_without_a_fallback_keep_the_error(fallback, downstream, request_for):
    out = fallback(request_for("other"), downstream(engine_error(503, "circuit_open")))
    assert (out.status, out.json()["error"]["code"]) == (503, "circuit_open")


def test_streams_and_other_routes_are_never_replaced(fallback, downstream, request_for):
    events = request_for("faq", route="/runs/<id>/events", method="GET")
    assert fallback(events, downstream(engine_error(503, "x"))).status == 503
    stream = Response(503, {}, chunks=iter([b""]))
    assert fallback(request_for("faq", stream=True), downstream(stream)).status == 503


def test_reports_each_fallback(settings_with, downstream, request_for):
    seen = []
    f = Fallback(settings_with(flows={"faq": {"fallback": FALLBACK}}), on_fallback=seen.append)
    f(request_for("faq"), downstream(engine_error(504, "upstream_timeout")))
    assert seen == ["faq"]
