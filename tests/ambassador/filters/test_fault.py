"""Fault filter (issue #14): off by default; per-flow delays and aborts drawn with an
injected random source; the X-Flowgate-Fault header parsed strictly (400) and only from
identities the config allows (403); an abort answered as the engine would, so the breaker,
retry and fallback filters treat it as a real engine answer; a delay that uses up the
attempt's limit. Sleep and random are fakes: nothing really waits, nothing is left to chance."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from app_harness import assert_error_contract, run_flow

from ambassador.chain import Response, build_chain
from ambassador.config import DEFAULT_FILTERS, FILTERS, ConfigError, load
from ambassador.config import Breaker as BreakerSettings
from ambassador.config import Retry as RetrySettings
from ambassador.filters.auth import Identity
from ambassador.filters.breaker import Breaker, CircuitBreaker, is_failure, is_local
from ambassador.filters.fallback import Fallback
from ambassador.filters.fault import (
    MAX_HEADER_CHARS,
    BadFaultHeader,
    Fault,
    Injection,
    header_identities,
    parse_header,
)
from ambassador.filters.retry import Retry, RetryBudget
from ambassador.filters.timeout import Timeout
from flowgate.common import tracing
from flowgate.common.jsonlog import JsonFormatter

OK = Response(200, {"Content-Type": "application/json"}, b'{"output": "ok"}')
DRILLER = Identity("drill-app")  # allowed to send the header (below)
OTHER_APP = Identity("orders-app")  # not allowed
API_KEYS = [{"key": "drill-secret-0001", "identity": "drill-app", "allow_fault_header": True},
            {"key": "orders-secret-0001", "identity": "orders-app"}]
KEYS_MODE = {"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS}


class Rand:
    """A random source returning the given draws in order (and counting the calls)."""

    def __init__(self, *draws: float) -> None:
        self.draws = list(draws)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.draws.pop(0)


class Recorder:
    """The filter's injectables: sleep (recorded, never waits) and on_fault."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.faults: list[tuple[str | None, str]] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def on_fault(self, flow: str | None, kind: str) -> None:
        self.faults.append((flow, kind))


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def make_fault(settings_with, rec):
    def build(rand: Rand | None = None, **dotted: Any) -> Fault:
        return Fault(settings_with(**dotted), on_fault=rec.on_fault, sleep=rec.sleep,
                     rand=rand or Rand())

    return build


def with_header(request_for, value: str, identity: Identity | None = DRILLER, *,
                ctx: dict[str, Any] | None = None, **kw: Any):
    ctx = {**(ctx or {}), **({"identity": identity} if identity is not None else {})}
    return request_for(headers={"X-Flowgate-Fault": value}, ctx=ctx, **kw)


def error_of(response: Response) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


# -- off by default -------------------------------------------------------------------------------

def test_fault_is_the_innermost_filter_by_default() -> None:
    assert FILTERS[-1] == "fault" and DEFAULT_FILTERS[-1] == "fault"
    assert DEFAULT_FILTERS.index("timeout") == len(DEFAULT_FILTERS) - 2


def test_without_configuration_nothing_is_injected(make_fault, request_for, downstream, rec):
    rand = Rand()
    fault = make_fault(rand)
    down = downstream(OK)
    for request in (request_for("faq"), request_for("faq", stream=True),
                    request_for(None, route="/runs/<id>/events", method="GET")):
        assert fault(request, down).status == 200
    assert down.count == 3
    assert (rand.calls, rec.sleeps, rec.faults) == (0, [], [])


# -- per-flow config --------------------------------------------------------------------------------

def test_abort_percent_with_a_deterministic_random(make_fault, request_for, downstream, rec):
    rand = Rand(0.10, 0.2999, 0.30, 0.99)
    fault = make_fault(rand, **{"flows.faq.fault": {"abort": {"percent": 30, "status": 503}}})
    down = downstream(OK)

    statuses = [fault(request_for("faq"), down).status for _ in range(4)]

    assert statuses == [503, 503, 200, 200]  # a draw below 30 % aborts
    assert down.count == 2 and rand.calls == 4
    assert rec.faults == [("faq", "abort"), ("faq", "abort")]


def test_fractional_percent(make_fault, request_for, downstream):
    fault = make_fault(Rand(0.00499, 0.005), **{
        "flows.faq.fault": {"abort": {"percent": 0.5, "status": 500}}})
    assert [fault(request_for("faq"), downstream(OK)).status for _ in range(2)] == [500, 200]


@pytest.mark.parametrize(("percent", "status"), [(0, 200), (100, 502)])
def test_0_and_100_percent_need_no_draw(make_fault, request_for, downstream, percent, status):
    rand = Rand()  # any draw would fail: it has none
    fault = make_fault(rand, **{"flows.faq.fault": {"abort": {"percent": percent, "status": 502}}})
    assert [fault(request_for("faq"), downstream(OK)).status for _ in range(3)] == [status] * 3
    assert rand.calls == 0


def test_delay_is_drawn_before_the_abort_each_on_its_own(make_fault, request_for, downstream, rec):
    # attempt 1: delay hit, abort missed; attempt 2: delay missed, abort hit
    fault = make_fault(Rand(0.1, 0.9, 0.9, 0.1), **{"flows.faq.fault": {
        "delay": {"percent": 50, "ms": 250}, "abort": {"percent": 50, "status": 503}}})
    down = downstream(OK)

    first, second = fault(request_for("faq"), down), fault(request_for("faq"), down)

    assert (first.status, second.status) == (200, 503)
    assert rec.sleeps == [0.25] and down.count == 1
    assert rec.faults == [("faq", "delay"), ("faq", "abort")]


def test_config_faults_concern_only_run_flow_requests_of_that_flow(make_fault, request_for,
                                                                   downstream, rec):
    fault = make_fault(**{"flows.faq.fault": {"abort": {"percent": 100, "status": 503}}})
    down = downstream(OK)
    events = request_for("faq", route="/runs/<id>/events", method="GET")
    assert fault(events, down).status == 200
    assert fault(request_for("other-flow"), down).status == 200
    assert fault(request_for(None), down).status == 200
    assert down.count == 3 and rec.faults == []


def test_the_policy_is_the_one_of_the_settings_it_was_built_with(make_fault, request_for,
                                                                 downstream):
    """A reload builds a new filter from the new settings: the fault goes with the config."""
    on = make_fault(**{"flows.faq.fault": {"abort": {"percent": 100, "status": 503}}})
    off = make_fault(**{"flows.faq.cache": {"ttl_s": 60}})
    assert on(request_for("faq"), downstream(OK)).status == 503
    assert off(request_for("faq"), downstream(OK)).status == 200


# -- the abort: an engine answer of that status ----------------------------------------------------

@pytest.mark.parametrize("status", [400, 404, 429, 500, 502, 503, 504, 599])
def test_abort_is_answered_in_the_engines_error_shape(make_fault, request_for, downstream, status):
    fault = make_fault(**{"flows.faq.fault": {"abort": {"percent": 100, "status": status}}})
    trace = tracing.from_headers(None, None)
    down = downstream(OK)

    response = fault(request_for("faq", ctx={"trace": trace}), down)

    assert response.status == status and down.count == 0
    error = error_of(response)
    assert error["code"] == "fault_injected" and error["message"]
    assert error["trace_id"] == trace.trace_id
    assert response.meta["engine_answered"] is True and "upstream_error" not in response.meta
    assert ("Retry-After" in response.headers) == (status in (429, 503))
    # what the breaker makes of it: the same as of the engine's own answer
    assert is_failure(response) == (status in (500, 503, 504))
    assert not is_local(response)


def test_an_abort_opens_the_breaker_is_retried_and_falls_back(settings_with, request_for,
                                                              downstream, clock, rec):
    """The filters as the default chain orders them (fallback, breaker, retry, timeout, fault):
    a 503 abort is retried as engine load shedding, counted by the breaker until it opens,
    and the flow's fallback answers the caller — and not one request reaches the engine."""
    settings = settings_with(**{
        "flows.faq.fault": {"abort": {"percent": 100, "status": 503}},
        "flows.faq.fallback": {"output": "busy"},
        "retry.max_attempts": 2, "retry.budget_min_per_s": 100,
        "breaker.consecutive_failures": 2, "breaker.readiness_path": None})
    retries: list[str] = []
    fallbacks: list[str] = []
    breaker = CircuitBreaker(settings.breaker, clock=clock)
    chain = build_chain([
        Fallback(settings, on_fallback=fallbacks.append),
        Breaker(breaker),
        Retry(settings.retry, RetryBudget(1, 100, 10, clock=clock), on_retry=retries.append,
              sleep=clock.sleep, clock=clock, rand=lambda lo, hi: hi),
        Timeout(settings.upstream.timeouts, clock=clock),
        Fault(settings, on_fault=rec.on_fault, sleep=rec.sleep),
    ], down := downstream(OK))

    first = chain(request_for("faq"))
    assert first.status == 200 and first.headers["X-Fallback"] == "true"
    body = first.json()
    assert body["fallback_reason"] == "fault_injected" and body["output"] == "busy"
    assert first.headers["X-Upstream-Attempts"] == "2" and retries == ["unavailable"]
    assert breaker.state == "closed"  # one failed request so far (the breaker sees requests)

    chain(request_for("faq"))
    assert breaker.state == "open"  # two failed requests in a row

    third = chain(request_for("faq"))
    assert third.status == 200 and third.json()["fallback_reason"] == "circuit_open"
    assert down.count == 0 and fallbacks == ["faq"] * 3
    assert rec.faults == [("faq", "abort")] * 4  # two attempts each; the open breaker: none


@pytest.mark.parametrize("value", ["abort=503", "delay=60000"])
def test_a_header_fault_never_opens_the_breaker_for_the_other_apps(settings_with, request_for,
                                                                   downstream, clock, value):
    """The attack (security review): an identity allowed to drill sends aborts (or delays
    as long as the attempt) until the sidecar's one breaker would open for every app behind
    it. Its own requests fail as it asked; the breaker counts none of them, and the next
    app's request reaches the engine."""
    settings = settings_with(**{**KEYS_MODE, "retry.max_attempts": 1,
                                "breaker.consecutive_failures": 1,
                                "breaker.readiness_path": None})
    breaker = CircuitBreaker(settings.breaker, clock=clock)
    chain = build_chain([Breaker(breaker), Timeout(settings.upstream.timeouts, clock=clock),
                         Fault(settings, sleep=clock.sleep)], down := downstream(OK))
    for _ in range(5):
        assert chain(with_header(request_for, value)).status in (503, 504)
    assert breaker.state == "closed"
    other = request_for("faq", ctx={"identity": OTHER_APP})
    assert chain(other).status == 200 and down.count == 1


def test_a_4xx_abort_is_not_retried_nor_a_breaker_failure(settings_with, request_for, downstream,
                                                         clock):
    settings = settings_with(**{"flows.faq.fault": {"abort": {"percent": 100, "status": 429}}})
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=1), clock=clock)
    chain = build_chain([Breaker(breaker),
                         Retry(RetrySettings(), RetryBudget(1, 100, 10, clock=clock),
                               sleep=clock.sleep, clock=clock),
                         Fault(settings)], downstream(OK))
    response = chain(request_for("faq"))
    assert response.status == 429 and response.headers["X-Upstream-Attempts"] == "1"
    assert breaker.state == "closed"


# -- the delay: part of the attempt ---------------------------------------------------------------

def test_delay_uses_up_part_of_the_attempts_limit(make_fault, request_for, downstream, rec):
    fault = make_fault(**{"flows.faq.fault": {"delay": {"percent": 100, "ms": 1500}},
                          "upstream.timeouts.per_try_s": 10})
    request = request_for("faq", ctx={"per_try_s": 4.0, "upstream_s": 0.5})
    down = downstream(OK)

    response = fault(request, down)

    assert response.status == 200 and rec.sleeps == [1.5]
    assert down.calls[0].ctx["per_try_s"] == pytest.approx(2.5)  # what the upstream may wait
    assert request.ctx["per_try_s"] == 4.0  # restored: the next attempt's is its own
    assert request.ctx["upstream_s"] == pytest.approx(2.0)  # upstream time, not overhead
    assert rec.faults == [("faq", "delay")]


def test_delay_without_the_timeout_filter_uses_the_configured_per_try(make_fault, request_for,
                                                                      downstream, rec):
    fault = make_fault(**{"flows.faq.fault": {"delay": {"percent": 100, "ms": 1000}},
                          "upstream.timeouts.per_try_s": 3})
    request = request_for("faq")
    down = downstream(OK)
    fault(request, down)
    assert down.calls[0].ctx["per_try_s"] == pytest.approx(2.0)
    assert "per_try_s" not in request.ctx


@pytest.mark.parametrize(("stream", "limit"), [(False, 2.0), (True, 0.5)])
def test_a_delay_as_long_as_the_limit_is_the_upstreams_timeout(make_fault, request_for,
                                                               downstream, rec, stream, limit):
    fault = make_fault(**{"flows.faq.fault": {"delay": {"percent": 100, "ms": 5000},
                                              "abort": {"percent": 100, "status": 500}},
                          "upstream.timeouts.stream_first_byte_s": 0.5})
    down = downstream(OK)

    response = fault(request_for("faq", stream=stream, ctx={"per_try_s": 2.0}), down)

    assert response.status == 504 and down.count == 0
    assert error_of(response)["code"] == "upstream_timeout"
    assert response.meta["upstream_error"] == "timeout"  # retried (with a key) like a real one
    assert rec.sleeps == [limit]  # waits no longer than the real timeout would
    assert rec.faults == [("faq", "delay")]  # the attempt timed out before the abort


def test_delay_and_abort_from_the_header(make_fault, request_for, downstream, rec):
    fault = make_fault(**KEYS_MODE)
    response = fault(with_header(request_for, "delay=500;abort=503"), down := downstream(OK))
    assert response.status == 503 and rec.sleeps == [0.5] and down.count == 0
    assert response.meta["upstream_s"] == pytest.approx(0.5)
    assert rec.faults == [("faq", "delay"), ("faq", "abort")]


# -- the header ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("delay=500", Injection(500, None)),
    ("abort=503", Injection(None, 503)),
    ("delay=500;abort=503", Injection(500, 503)),
    ("abort=503;delay=500", Injection(500, 503)),
    (" delay=500 ; abort=503 ", Injection(500, 503)),
    ("delay=0", Injection(0, None)),
    ("delay=60000", Injection(60000, None)),
    ("abort=400", Injection(None, 400)),
    ("abort=599", Injection(None, 599)),
])
def test_header_values_that_parse(value, expected) -> None:
    assert parse_header(value) == expected


ATTACKS = [
    pytest.param("delay=1;" * 9, "at most 64", id="huge"),
    pytest.param("delay=" + "9" * 100_000, "at most 64", id="very-huge"),
    pytest.param("", "empty", id="empty"),
    pytest.param("   ", "empty", id="blank"),
    pytest.param("delay=-5", "ASCII digits", id="negative"),
    pytest.param("delay=+5", "ASCII digits", id="plus-sign"),
    pytest.param("delay=abc", "ASCII digits", id="non-numeric"),
    pytest.param("delay=1.5", "ASCII digits", id="fraction"),
    pytest.param("delay=1e3", "ASCII digits", id="exponent"),
    pytest.param("delay=1_000", "ASCII digits", id="underscore"),
    pytest.param("delay=0x10", "ASCII digits", id="hex"),
    pytest.param("delay=\u00b2", "ASCII digits", id="unicode-digit"),
    pytest.param("delay=", "ASCII digits", id="no-number"),
    pytest.param("delay", "ASCII digits", id="no-equals"),
    pytest.param("delay=500ms", "ASCII digits", id="unit"),
    pytest.param("delay = 500", "unknown part", id="space-in-part"),
    pytest.param("crash=1", "unknown part", id="unknown-key"),
    pytest.param("DELAY=5", "unknown part", id="upper-case-key"),
    pytest.param("delay=5;", "unknown part", id="trailing-separator"),
    pytest.param(";", "unknown part", id="separator-only"),
    pytest.param("delay=5,abort=503", "ASCII digits", id="comma"),
    pytest.param("delay=1;delay=2", "twice", id="duplicate-delay"),
    pytest.param("abort=503;abort=503", "twice", id="duplicate-abort"),
    pytest.param("abort=200", "from 400 to 599", id="status-200"),
    pytest.param("abort=399", "from 400 to 599", id="status-399"),
    pytest.param("abort=600", "from 400 to 599", id="status-600"),
    pytest.param("abort=999", "from 400 to 599", id="status-999"),
    pytest.param("abort=0503", "ASCII digits", id="leading-zero"),
    pytest.param("delay=00", "ASCII digits", id="zeros"),
    pytest.param("delay=60001", "at most 60000", id="delay-over-max"),
    pytest.param("delay=999999", "at most 60000", id="delay-far-over-max"),
]


@pytest.mark.parametrize(("value", "why"), ATTACKS)
def test_malformed_or_out_of_range_headers_are_a_400(make_fault, request_for, downstream, rec,
                                                     value, why):
    with pytest.raises(BadFaultHeader, match=why):
        parse_header(value)
    fault = make_fault(**KEYS_MODE)
    trace = tracing.from_headers(None, None)
    request = with_header(request_for, value)
    request.ctx["trace"] = trace
    down = downstream(OK)

    response = fault(request, down)

    assert response.status == 400 and down.count == 0
    error = error_of(response)
    assert error["code"] == "bad_request" and "X-Flowgate-Fault" in error["message"]
    assert error["trace_id"] == trace.trace_id
    assert len(error["message"]) < 200  # the caller's value is never echoed whole
    assert is_local(response)  # the breaker does not count it, retry does not retry it
    assert (rec.sleeps, rec.faults) == ([], [])


def test_the_header_limit_is_what_the_parser_allows() -> None:
    assert MAX_HEADER_CHARS == 64
    parse_header("delay=1" + " " * (MAX_HEADER_CHARS - 7))
    with pytest.raises(BadFaultHeader):
        parse_header("delay=1" + " " * (MAX_HEADER_CHARS - 6))


@pytest.mark.parametrize(("config", "identity"), [
    pytest.param(KEYS_MODE, OTHER_APP, id="api-key-not-allowed"),
    pytest.param(KEYS_MODE, None, id="api-keys-no-identity"),
    pytest.param({}, None, id="auth-none"),
    pytest.param({"inbound_auth.mode": "jwt", "inbound_auth.jwt": {
        "secret": "s" * 32, "audience": "a", "fault_header_identities": ["drill-app"]}},
        OTHER_APP, id="jwt-identity-not-listed"),
])
@pytest.mark.parametrize("value", ["abort=503", "delay=500", "garbage;;;"])
def test_identities_not_allowed_get_403(make_fault, request_for, downstream, rec, config,
                                        identity, value):
    fault = make_fault(**config, **{"flows.faq.fault": {"abort": {"percent": 0, "status": 503}}})
    response = fault(with_header(request_for, value, identity), down := downstream(OK))
    assert response.status == 403 and down.count == 0
    error = error_of(response)
    assert error["code"] == "fault_not_allowed" and "X-Flowgate-Fault" in error["message"]
    assert is_local(response)
    assert (rec.sleeps, rec.faults) == ([], [])


@pytest.mark.parametrize("config", [
    pytest.param(KEYS_MODE, id="api-key-allowed"),
    pytest.param({"inbound_auth.mode": "jwt", "inbound_auth.jwt": {
        "secret": "s" * 32, "audience": "a", "fault_header_identities": ["drill-app"]}},
        id="jwt-identity-listed"),
])
def test_allowed_identities_get_the_fault_at_100_percent(make_fault, request_for, downstream,
                                                         rec, config):
    rand = Rand()  # the header's fault is not drawn
    fault = make_fault(rand, **config)
    statuses = [fault(with_header(request_for, "abort=502"), downstream(OK)).status
                for _ in range(5)]
    assert statuses == [502] * 5 and rand.calls == 0


def test_the_header_replaces_the_flows_fault_and_works_on_every_route(make_fault, request_for,
                                                                      downstream, rec):
    fault = make_fault(**KEYS_MODE, **{
        "flows.faq.fault": {"abort": {"percent": 100, "status": 500}}})
    down = downstream(OK)
    assert fault(with_header(request_for, "delay=100"), down).status == 200  # no 500
    events = with_header(request_for, "abort=503", flow_id=None,
                         route="/runs/<id>/events", method="GET")
    assert fault(events, down).status == 503
    assert rec.faults == [("faq", "delay"), (None, "abort")]
    assert fault(with_header(request_for, "delay=0"), down).status == 200  # nothing to inject
    assert down.count == 2 and rec.sleeps == [0.1]


def test_header_identities_by_auth_mode(settings_with) -> None:
    assert header_identities(settings_with(**KEYS_MODE).inbound_auth) == {"drill-app"}
    assert header_identities(settings_with().inbound_auth) == frozenset()
    jwt = settings_with(**{"inbound_auth.mode": "jwt", "inbound_auth.jwt": {
        "secret": "s" * 32, "audience": "a", "fault_header_identities": ["x", "y"]}})
    assert header_identities(jwt.inbound_auth) == {"x", "y"}
    # keys held for another mode do not count
    jwt_with_keys = settings_with(**{"inbound_auth.api_keys": API_KEYS, "inbound_auth.mode": "jwt",
                                     "inbound_auth.jwt": {"secret": "s" * 32, "audience": "a"}})
    assert header_identities(jwt_with_keys.inbound_auth) == frozenset()


# -- logged -------------------------------------------------------------------------------------

@pytest.fixture
def json_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Lines(logging.DEBUG)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ambassador.filters.fault")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_each_injection_is_one_json_log_line_with_the_trace_id(make_fault, request_for,
                                                               downstream, json_lines):
    fault = make_fault(**KEYS_MODE)
    trace = tracing.from_headers(None, None)
    token = tracing.current.set(trace)
    try:
        fault(with_header(request_for, "delay=20;abort=504", ctx={"trace": trace}),
              downstream(OK))
        fault(request_for("faq"), downstream(OK))  # nothing injected: nothing logged
    finally:
        tracing.current.reset(token)
    [line] = json_lines
    entry = json.loads(line)
    assert entry["msg"] == "fault injected" and entry["level"] == "warning"
    assert entry["trace_id"] == trace.trace_id
    assert (entry["fault_source"], entry["flow_id"], entry["delay_ms"], entry["abort_status"],
            entry["identity"]) == ("header", "faq", 20, 504, "drill-app")


# -- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "bad_key"), [
    ({"flows.faq.fault": {"abort": {"percent": 101, "status": 503}}}, "flows.faq.fault.abort.percent"),
    ({"flows.faq.fault": {"abort": {"percent": -1, "status": 503}}}, "flows.faq.fault.abort.percent"),
    ({"flows.faq.fault": {"abort": {"percent": "50", "status": 503}}}, "flows.faq.fault.abort.percent"),
    ({"flows.faq.fault": {"abort": {"percent": 5, "status": 200}}}, "flows.faq.fault.abort.status"),
    ({"flows.faq.fault": {"abort": {"percent": 5, "status": 999}}}, "flows.faq.fault.abort.status"),
    ({"flows.faq.fault": {"abort": {"percent": 5}}}, "flows.faq.fault.abort.status"),
    ({"flows.faq.fault": {"delay": {"percent": 5, "ms": 60001}}}, "flows.faq.fault.delay.ms"),
    ({"flows.faq.fault": {"delay": {"percent": 5, "ms": -1}}}, "flows.faq.fault.delay.ms"),
    ({"flows.faq.fault": {"delay": {"percent": 5, "ms": 1.5}}}, "flows.faq.fault.delay.ms"),
    ({"flows.faq.fault": {"crash": {"percent": 5}}}, "flows.faq.fault.crash"),
    ({"flows.faq.fault": {"abort": {"percent": 5, "status": 503}},
      "filters": ["trace", "auth", "timeout"]}, "'fault' is not in filters"),
    ({"filters": ["trace", "fault", "timeout"]}, "must be the last"),
    ({"inbound_auth.api_keys": [{**API_KEYS[0]}, {**API_KEYS[1], "identity": "drill-app"}]},
     "must agree on allow_fault_header"),
    ({"inbound_auth.mode": "jwt", "inbound_auth.jwt": {
        "secret": "s" * 32, "audience": "a", "fault_header_identities": ["has space"]}},
     "inbound_auth.jwt.fault_header_identities.0"),
])
def test_config_is_validated(overrides, bad_key) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ={}, overrides=overrides)
    assert bad_key in str(info.value)


def test_config_shape() -> None:
    settings = load(None, environ={}, overrides={
        "flows.faq.fault": {"delay": {"percent": 12.5, "ms": 800},
                            "abort": {"percent": 5, "status": 503}},
        **KEYS_MODE})
    fault = settings.flows["faq"].fault
    assert (fault.delay.percent, fault.delay.ms) == (12.5, 800)
    assert (fault.abort.percent, fault.abort.status) == (5, 503)
    assert [k.allow_fault_header for k in settings.inbound_auth.api_keys] == [True, False]
    assert load(None, environ={}).flows == {}  # off by default


# -- wired into the app (in-process, the fake engine) ------------------------------------------------

def faults_counted(amb, flow: str, kind: str) -> float:
    return amb.metrics.registry.get_sample_value(
        "flowgate_ambassador_faults_injected_total", {"flow": flow, "kind": kind}) or 0.0


def test_the_apps_chain_injects_counts_and_reloads(make_app, engine, tmp_path) -> None:
    path = tmp_path / "ambassador.yaml"
    path.write_text(json.dumps({"flows": {"faq": {"fault": {"abort": {"percent": 100,
                                                                       "status": 503}}}}}))
    client, amb = make_app(path=str(path), **{"retry.max_attempts": 2})

    response = run_flow(client)

    error = assert_error_contract(response, 503, "fault_injected")
    assert response.headers["X-Upstream-Attempts"] == "2"  # retried as the engine's 503
    assert error["message"] and engine.requests == []
    assert faults_counted(amb, "faq", "abort") == 2
    assert amb.metrics.registry.get_sample_value("flowgate_ambassador_retries_total",
                                                 {"reason": "unavailable"}) == 1

    # an edit of the file (the holder's reload) builds a new filter: the fault is off
    before = path.stat().st_mtime
    path.write_text(json.dumps({"flows": {"faq": {"cache": {"ttl_s": 60}}}}))
    os.utime(path, (before + 5, before + 5))  # a new mtime, coarse clocks included
    amb.holder.maybe_reload(due=True)  # (what the watch thread does about every second)
    assert amb.holder.settings.flows["faq"].fault is None

    response = run_flow(client)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(engine.requests) == 1 and faults_counted(amb, "faq", "abort") == 2


def test_the_header_through_the_app(make_app, engine) -> None:
    keys = [{"key": "drill-secret-0001", "identity": "drill-app", "allow_fault_header": True},
            {"key": "orders-secret-0001", "identity": "orders-app", "flows": ["faq"]}]
    client, amb = make_app({"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": keys})

    def run(key: str, fault: str, flow: str = "faq"):
        return run_flow(client, {"flow_id": flow, "input": "hi"},
                        {"x-api-key": key, "X-Flowgate-Fault": fault})

    assert_error_contract(run("drill-secret-0001", "abort=502"), 502, "fault_injected")
    assert_error_contract(run("orders-secret-0001", "abort=502"), 403, "fault_not_allowed")
    assert_error_contract(run("drill-secret-0001", "abort=502;abort=503"), 400, "bad_request")
    assert engine.requests == []
    # a flow id the config does not name is counted as "other" (bounded labels)
    assert_error_contract(run("drill-secret-0001", "abort=500", "made-up-1"), 500,
                          "fault_injected")
    # one attempt each: neither 502 nor 500 is retried (nor would the engine's be)
    assert (faults_counted(amb, "faq", "abort"), faults_counted(amb, "other", "abort")) == (1, 1)
    assert faults_counted(amb, "made-up-1", "abort") == 0
