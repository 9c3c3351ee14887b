"""ambassador.upstream against the in-test engine: the run lookup is made as the caller,
what the engine answered is marked so, and a request that cannot be written is the
ambassador's own 400 — never an exception a filter would take for an engine failure."""

from __future__ import annotations

import pytest

from ambassador.chain import Request
from ambassador.config import Upstream as UpstreamSettings
from ambassador.filters.auth import Identity
from ambassador.upstream import Upstream, engine_timing
from flowgate.common import tracing


@pytest.fixture
def upstream(engine):
    client = Upstream(UpstreamSettings(url=engine.url), "svc-key-123")
    yield client
    client.close()


def test_the_run_lookup_carries_the_callers_identity_and_tenant(upstream, engine) -> None:
    engine.answer(200, {"run_id": "r1", "flow_id": "faq", "status": "succeeded"})
    caller = Request("GET", "/api/v1/runs/r1/events", {"last-event-id": "3", "x-api-key": "k"},
                     "/runs/<id>/events", ctx={"identity": Identity("orders-app", "shop"),
                                               "trace": tracing.from_headers(None, None)})
    assert upstream.flow_of_run("r1", caller) == "faq"
    [probe] = engine.requests
    assert (probe["method"], probe["path"]) == ("GET", "/api/v1/runs/r1")
    assert probe["headers"]["x-flowgate-identity"] == "orders-app"
    assert probe["headers"]["x-flowgate-tenant"] == "shop"
    assert probe["headers"]["authorization"] == "Bearer svc-key-123"
    assert "last-event-id" not in probe["headers"] and "x-api-key" not in probe["headers"]


@pytest.mark.parametrize(("request_", "words"), [
    pytest.param(Request("POST", "/api/v1/run/faq", {}, "/run-flow", {"tweaks": {1, 2}}),
                 "serializable", id="body-that-does-not-serialize"),
    pytest.param(Request("GET", "/api/v1/runs/r1\n/events", {}, "/runs/<id>/events"),
                 "path", id="newline-in-the-path"),
    pytest.param(Request("GET", "/api/v1/runs/r 1/events", {}, "/runs/<id>/events"),
                 "path", id="space-in-the-path"),
    pytest.param(Request("POST", "/api/v1/run/faq", {"idempotency-key": "k\u0101"}, "/run-flow",
                         {}), "non-ASCII", id="header-beyond-latin-1"),
    pytest.param(Request("POST", "/api/v1/run/faq", {"idempotency-key": "k\u00e9"}, "/run-flow",
                         {}), "non-ASCII", id="latin-1-header"),
    pytest.param(Request("POST", "/api/v1/run/faq", {}, "/run-flow", {},
                         ctx={"identity": Identity("a\r\nx-flowgate-tenant: bank")}),
                 "line break", id="line-break-in-the-identity"),
])
def test_a_request_that_cannot_be_written_is_a_local_400(upstream, engine, request_,
                                                         words) -> None:
    response = upstream(request_)
    assert response.status == 400
    error = response.json()["error"]
    assert error["code"] == "bad_request" and words in error["message"]
    assert not response.meta.get("engine_answered") and "upstream_error" not in response.meta
    assert engine.requests == []


def test_what_the_engine_answered_is_marked(upstream, engine, dead_port) -> None:
    engine.answer(404, {"error": {"code": "flow_not_found", "message": "no"}})
    answered = upstream(Request("POST", "/api/v1/run/x", {}, "/run-flow", {}))
    assert answered.status == 404 and answered.meta["engine_answered"] is True
    down = Upstream(UpstreamSettings(url=f"http://127.0.0.1:{dead_port}"), None)
    try:
        failed = down(Request("POST", "/api/v1/run/x", {}, "/run-flow", {}))
    finally:
        down.close()
    assert failed.status == 503 and "engine_answered" not in failed.meta


@pytest.mark.parametrize(("status", "ready"), [
    pytest.param(200, True, id="200-ready"),
    pytest.param(503, False, id="503-not-ready"),
    pytest.param(500, False, id="500"),
    pytest.param(404, True, id="no-such-path-says-nothing-against-it"),
])
def test_readiness_is_what_the_engine_says(upstream, engine, status, ready) -> None:
    engine.answer(status, {"status": "whatever"})
    assert upstream.ready("/readyz", 1.0) is ready
    [probe] = engine.requests
    assert (probe["method"], probe["path"]) == ("GET", "/readyz")
    assert "authorization" not in probe["headers"]  # the probe needs no key, sends none


def test_an_unreachable_engine_is_not_ready(dead_port) -> None:
    down = Upstream(UpstreamSettings(url=f"http://127.0.0.1:{dead_port}"), None)
    try:
        assert down.ready("/readyz", 1.0) is False
    finally:
        down.close()


# -- the engine's Server-Timing: the hop's share of X-Ambassador-Overhead-Ms -------------------

@pytest.mark.parametrize(("timing", "attempt_s", "hop_s"), [
    ("app;dur=8.000", 0.010, 0.002),  # 2 ms of the attempt were not the engine's app
    ("app;dur=8.000, idem;dur=3.000", 0.010, 0.005),  # claiming the key is the proxy's doing
    ("idem;dur=3, app;desc=\"x\";dur=8", 0.010, 0.005),  # any order, other params
    ("app;dur=12", 0.010, 0.0),  # clocks differ: never negative
])
def test_engine_timing_is_the_attempt_minus_the_engines_own_work(timing, attempt_s, hop_s):
    got = engine_timing([("content-type", "application/json"), ("server-timing", timing)],
                        attempt_s)
    assert got["hop_s"] == pytest.approx(hop_s, abs=1e-9)


@pytest.mark.parametrize("timing", ["", "app", "app;dur=", "app;dur=abc", "app;dur=nan",
                                    "app;dur=inf", "app;dur=-5", "cache;dur=1", ";;;,,,="])
def test_engine_timing_without_a_usable_app_duration_adds_nothing(timing):
    assert engine_timing([("server-timing", timing)], 0.01) == {}
    assert engine_timing([], 0.01) == {}
