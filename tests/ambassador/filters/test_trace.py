"""Trace filter: keeps a valid incoming W3C traceparent and X-Request-ID, else starts a valid
trace; the trace headers are on every response, errors included."""

from __future__ import annotations

import re

import pytest

from ambassador.chain import Response, error_response
from ambassador.filters.trace import Trace
from flowgate.common import tracing

W3C = re.compile(r"^00-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})$")
VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def assert_valid_new(traceparent: str) -> re.Match:
    match = W3C.match(traceparent)
    assert match, traceparent
    assert match["trace"] != "0" * 32 and match["span"] != "0" * 16
    return match


def run(request_for, downstream, headers=None, answer=None):
    req = request_for(headers=headers or {})
    down = downstream(answer or Response(200, {}, b"{}"))
    return req, down, Trace()(req, down)


@pytest.mark.parametrize("traceparent", [
    pytest.param(VALID, id="sampled"),
    pytest.param("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", id="not-sampled"),
    pytest.param("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
                 id="future-version-with-extra-field"),
])
def test_keeps_a_valid_incoming_traceparent(request_for, downstream, traceparent) -> None:
    _req, down, response = run(request_for, downstream, {"traceparent": traceparent})
    assert response.headers["traceparent"] == traceparent
    assert response.headers["X-Trace-ID"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    trace = down.calls[0].ctx["trace"]  # what the rest of the chain sees
    assert trace.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace.traceparent == traceparent


@pytest.mark.parametrize("traceparent", [
    pytest.param(None, id="missing"),
    pytest.param("", id="empty"),
    pytest.param("garbage", id="garbage"),
    pytest.param("00-00000000000000000000000000000000-00f067aa0ba902b7-01", id="all-zero-trace-id"),
    pytest.param("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", id="all-zero-parent-id"),
    pytest.param("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", id="version-ff"),
    pytest.param("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", id="trace-id-too-short"),
    pytest.param("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                 id="version-00-with-extra-field"),
    pytest.param("00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01", id="non-hex"),
    pytest.param("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", id="no-flags"),
])
def test_starts_a_valid_trace_when_the_incoming_one_is_missing_or_invalid(
        request_for, downstream, traceparent) -> None:
    headers = {"traceparent": traceparent} if traceparent is not None else {}
    _, down, response = run(request_for, downstream, headers)
    match = assert_valid_new(response.headers["traceparent"])
    assert match["trace"] != "4bf92f3577b34da6a3ce929d0e0e4736"
    assert response.headers["X-Trace-ID"] == match["trace"]
    assert down.calls[0].ctx["trace"].trace_id == match["trace"]
    # without a caller's request id, the trace id serves as one
    assert response.headers["X-Request-ID"] == match["trace"]


def test_upper_case_traceparent_is_kept_verbatim_or_restarted(request_for, downstream) -> None:
    upper = VALID.upper()
    _, _, response = run(request_for, downstream, {"traceparent": upper})
    kept = response.headers["traceparent"] == upper
    restarted = response.headers["X-Trace-ID"] != "4bf92f3577b34da6a3ce929d0e0e4736"
    assert kept or restarted


def test_every_new_trace_is_different(request_for, downstream) -> None:
    ids = {run(request_for, downstream)[2].headers["X-Trace-ID"] for _ in range(20)}
    assert len(ids) == 20


@pytest.mark.parametrize(("request_id", "kept"), [
    pytest.param("req-123", True, id="simple"),
    pytest.param("a.b_c:d/e=f+g-h", True, id="allowed-punctuation"),
    pytest.param("x" * 200, True, id="200-chars"),
    pytest.param("x" * 201, False, id="too-long"),
    pytest.param("has space", False, id="space"),
    pytest.param("<script>", False, id="markup"),
])
def test_keeps_a_valid_incoming_request_id(request_for, downstream, request_id, kept) -> None:
    _, down, response = run(request_for, downstream,
                            {"traceparent": VALID, "X-Request-ID": request_id})
    expected = request_id if kept else "4bf92f3577b34da6a3ce929d0e0e4736"
    assert response.headers["X-Request-ID"] == expected
    assert down.calls[0].ctx["trace"].request_id == expected


@pytest.mark.parametrize("answer", [
    pytest.param(Response(200, {}, b"{}"), id="ok"),
    pytest.param(error_response(401, "unauthorized", "no"), id="401"),
    pytest.param(error_response(503, "circuit_open", "open"), id="503"),
    pytest.param(Response(200, {}, chunks=iter([b"data: x\n\n"])), id="stream"),
])
def test_trace_headers_on_every_response(request_for, downstream, answer) -> None:
    _, _, response = run(request_for, downstream, {"traceparent": VALID, "X-Request-ID": "r-1"},
                         answer=answer)
    assert response.headers["traceparent"] == VALID
    assert response.headers["X-Trace-ID"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert response.headers["X-Request-ID"] == "r-1"


def test_a_trace_already_on_the_request_is_used(request_for, downstream) -> None:
    trace = tracing.from_headers(None, "rid-9")
    req = request_for(headers={"traceparent": VALID}, ctx={"trace": trace})
    response = Trace()(req, downstream())
    assert response.headers["X-Trace-ID"] == trace.trace_id
    assert response.headers["X-Request-ID"] == "rid-9"


def test_child_span_keeps_the_trace_and_makes_a_new_span() -> None:
    trace = tracing.from_headers(VALID, None)
    child = trace.child()
    match = assert_valid_new(child.traceparent)
    assert match["trace"] == trace.trace_id
    assert match["span"] != "00f067aa0ba902b7"
    assert match["flags"] == "01"
