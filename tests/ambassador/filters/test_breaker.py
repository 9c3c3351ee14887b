"""Circuit breaker: closed → open (consecutive failures or failure ratio), open answers 503
circuit_open with a counting-down Retry-After, half-open trials, what counts as a failure,
and the transitions reported (fake clock throughout)."""

from __future__ import annotations

from typing import Any

import pytest

from ambassador.chain import Response, error_response
from ambassador.config import Breaker as BreakerSettings
from ambassador.filters.breaker import Breaker, CircuitBreaker, is_failure
from flowgate import tracing

OK = Response(200, {}, b"{}")


def failure(status: int = 503, **meta: Any) -> Response:
    response = error_response(status, "x", "failed")
    response.meta.update(meta)
    return response


CONNECT_ERROR = failure(503, upstream_error="connect_error")
ENGINE_404 = failure(404, engine_answered=True)  # a 4xx the engine itself answered


@pytest.fixture
def make_breaker(clock):
    def build(**settings: Any) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
        transitions: list[tuple[str, str]] = []
        cb = CircuitBreaker(BreakerSettings(**settings), clock=clock,
                            on_transition=lambda old, new: transitions.append((old, new)))
        return cb, transitions

    return build


def send(breaker_filter, request_for, downstream, *answers: Response) -> list[Response]:
    return [breaker_filter(request_for(), downstream(a)) for a in answers]


@pytest.mark.parametrize("answer", [
    pytest.param(failure(500), id="500"),
    pytest.param(failure(503), id="503"),
    pytest.param(failure(504), id="504"),
    pytest.param(failure(503, upstream_error="connect_error"), id="connect-error"),
    pytest.param(failure(504, upstream_error="timeout"), id="timeout"),
    pytest.param(failure(502, upstream_error="reset"), id="connection-reset"),
    pytest.param(failure(502, upstream_error="protocol"), id="protocol-error"),
])
def test_failures(answer) -> None:
    assert is_failure(answer)


@pytest.mark.parametrize("answer", [
    pytest.param(OK, id="200"),
    pytest.param(failure(400), id="400"),
    pytest.param(failure(401), id="401"),
    pytest.param(failure(404), id="404"),
    pytest.param(failure(422), id="422"),
    pytest.param(failure(429), id="429"),
    pytest.param(failure(502), id="engine-502-flow-failed"),
])
def test_not_failures(make_breaker, request_for, downstream, answer) -> None:
    assert not is_failure(answer)
    cb, transitions = make_breaker(consecutive_failures=1)
    f = Breaker(cb)
    responses = send(f, request_for, downstream, *[answer] * 10)
    assert [r.status for r in responses] == [answer.status] * 10
    assert cb.state == "closed" and transitions == []


def test_opens_after_n_consecutive_failures(make_breaker, request_for, downstream) -> None:
    cb, transitions = make_breaker(consecutive_failures=3)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR, CONNECT_ERROR)
    assert cb.state == "closed"
    send(f, request_for, downstream, CONNECT_ERROR)
    assert cb.state == "open"
    assert transitions == [("closed", "open")]


def test_a_success_resets_the_consecutive_count(make_breaker, request_for, downstream) -> None:
    cb, _ = make_breaker(consecutive_failures=3)
    f = Breaker(cb)
    send(f, request_for, downstream, *[CONNECT_ERROR, CONNECT_ERROR, OK] * 5)
    assert cb.state == "closed"


def test_an_engine_4xx_resets_the_consecutive_count(make_breaker, request_for, downstream) -> None:
    cb, _ = make_breaker(consecutive_failures=2)
    f = Breaker(cb)
    send(f, request_for, downstream, *[CONNECT_ERROR, ENGINE_404] * 5)
    assert cb.state == "closed"


@pytest.mark.parametrize(("outcomes", "state"), [
    # F failure, S success; ratio 0.5, min_requests 4, consecutive effectively off
    pytest.param("FSF", "closed", id="under-min-requests"),
    pytest.param("FSFS", "open", id="ratio-reached-at-min-requests"),
    pytest.param("FSSS", "closed", id="ratio-below"),
    pytest.param("SSSSSSFFFFFF", "open", id="ratio-reached-later"),
    pytest.param("SSSSSSSSSFFFF", "closed", id="4-of-13-below"),
])
def test_opens_on_failure_ratio_with_min_requests(make_breaker, request_for, downstream, outcomes,
                                                  state) -> None:
    cb, _ = make_breaker(consecutive_failures=1000, failure_ratio=0.5, min_requests=4, window_s=30)
    f = Breaker(cb)
    send(f, request_for, downstream, *[CONNECT_ERROR if o == "F" else OK for o in outcomes])
    assert cb.state == state


def test_ratio_only_counts_the_window(make_breaker, request_for, downstream, clock) -> None:
    cb, _ = make_breaker(consecutive_failures=1000, failure_ratio=0.5, min_requests=4, window_s=30)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR, CONNECT_ERROR, CONNECT_ERROR)
    clock.advance(31)  # those three fall out of the window
    send(f, request_for, downstream, OK, CONNECT_ERROR, OK)
    assert cb.state == "closed"
    send(f, request_for, downstream, CONNECT_ERROR)  # now 2 of 4 within the window
    assert cb.state == "open"


def test_open_answers_503_with_a_retry_after_counting_down(make_breaker, request_for, downstream,
                                                           clock) -> None:
    cb, _ = make_breaker(consecutive_failures=1, open_s=10)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    trace = tracing.from_headers(None, None)
    for advance, retry_after in [(0, "10"), (3.5, "7"), (5.5, "1"), (0.9, "1")]:
        clock.advance(advance)
        down = downstream(OK)
        response = f(request_for(ctx={"trace": trace}), down)
        assert response.status == 503 and down.count == 0
        assert response.headers["Retry-After"] == retry_after
        assert response.json()["error"] == {"code": "circuit_open", "message": response.json()[
            "error"]["message"], "trace_id": trace.trace_id}
        assert response.meta["breaker_open"] is True
    assert cb.state == "open"


def test_half_open_after_open_s_allows_half_open_max_trials(make_breaker, clock) -> None:
    cb, transitions = make_breaker(consecutive_failures=1, open_s=10, half_open_max=2)
    cb.record(True)
    clock.advance(9.99)
    assert cb.allow() is False
    clock.advance(0.01)
    assert [cb.allow() for _ in range(4)] == [True, True, False, False]
    assert cb.state == "half_open"
    assert transitions == [("closed", "open"), ("open", "half_open")]


def test_half_open_limits_concurrent_trials_through_the_filter(make_breaker, request_for, downstream,
                                                              clock) -> None:
    cb, _ = make_breaker(consecutive_failures=1, open_s=10, half_open_max=2)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    clock.advance(10)
    seen: list[int] = []

    def nested(depth: int):
        """A trial whose downstream sends the next request while it is still in flight."""

        def handler(request):
            if depth < 3:
                seen.append(f(request_for(), downstream(nested(depth + 1))).status)
            return Response(200, {}, b"{}")

        return handler

    outer = f(request_for(), downstream(nested(1)))
    # trials 1 and 2 hold both slots while trial 3 arrives: 3 is refused
    assert outer.status == 200
    assert seen == [503, 200]  # innermost (third) first, then the second
    assert cb.state == "closed"


def test_half_open_success_closes(make_breaker, request_for, downstream, clock) -> None:
    cb, transitions = make_breaker(consecutive_failures=2, open_s=10)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR, CONNECT_ERROR)
    clock.advance(10)
    assert send(f, request_for, downstream, OK)[0].status == 200
    assert cb.state == "closed"
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    # closed again with a fresh count: one failure does not reopen it
    send(f, request_for, downstream, CONNECT_ERROR)
    assert cb.state == "closed"


def test_half_open_failure_reopens_for_another_open_s(make_breaker, request_for, downstream,
                                                      clock) -> None:
    cb, transitions = make_breaker(consecutive_failures=1, open_s=10)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    clock.advance(12)
    assert send(f, request_for, downstream, CONNECT_ERROR)[0].status == 503
    assert cb.state == "open"
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]
    response = send(f, request_for, downstream, OK)[0]
    assert response.status == 503 and response.headers["Retry-After"] == "10"
    clock.advance(10)
    assert send(f, request_for, downstream, OK)[0].status == 200
    assert cb.state == "closed"


def test_half_open_engine_4xx_counts_as_success(make_breaker, request_for, downstream,
                                               clock) -> None:
    cb, _ = make_breaker(consecutive_failures=1, open_s=1)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    clock.advance(1)
    send(f, request_for, downstream, ENGINE_404)
    assert cb.state == "closed"


def test_a_trial_that_raises_does_not_wedge_the_breaker(make_breaker, request_for, downstream,
                                                        clock) -> None:
    cb, _ = make_breaker(consecutive_failures=1, open_s=10, half_open_max=1)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    clock.advance(10)

    def boom(request):
        raise RuntimeError("unexpected transport error (e.g. an SSL error)")

    with pytest.raises(RuntimeError):
        f(request_for(), downstream(boom))
    clock.advance(60)  # long after another open_s
    assert send(f, request_for, downstream, OK)[0].status == 200


# -- what the engine never saw counts neither way ---------------------------------------------

LOCAL_REFUSALS = [
    pytest.param(failure(400), id="400-request-cannot-be-sent"),
    pytest.param(failure(401), id="401-auth-placed-after-the-breaker"),
    pytest.param(failure(413), id="413"),
    pytest.param(failure(429), id="429-ratelimit-placed-after-the-breaker"),
]


@pytest.mark.parametrize("answer", LOCAL_REFUSALS)
def test_a_local_4xx_does_not_reset_the_consecutive_count(make_breaker, request_for, downstream,
                                                          answer) -> None:
    """A caller cannot keep the circuit closed over a failing engine with bad requests."""
    cb, _ = make_breaker(consecutive_failures=3)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR, answer, CONNECT_ERROR, answer, CONNECT_ERROR)
    assert cb.state == "open"


@pytest.mark.parametrize("answer", LOCAL_REFUSALS)
def test_a_local_4xx_does_not_close_a_half_open_circuit(make_breaker, request_for, downstream,
                                                        clock, answer) -> None:
    cb, _ = make_breaker(consecutive_failures=1, open_s=1, half_open_max=1)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    clock.advance(1)
    assert send(f, request_for, downstream, answer)[0].status == answer.status
    assert cb.state == "half_open"
    # its trial slot was given back: the next request is a trial, and decides
    assert send(f, request_for, downstream, OK)[0].status == 200
    assert cb.state == "closed"


@pytest.mark.parametrize("error", [
    pytest.param(RecursionError("maximum recursion depth exceeded"), id="recursion-error"),
    pytest.param(ValueError("header holds a line break"), id="value-error"),
    pytest.param(UnicodeEncodeError("latin-1", "\u0101", 0, 1, "ordinal not in range"),
                 id="unicode-encode-error"),
])
def test_exceptions_on_the_ambassador_side_never_open_the_circuit(make_breaker, request_for,
                                                                  downstream, error) -> None:
    """Five requests that crash while being built must not open the circuit for everyone."""
    cb, transitions = make_breaker(consecutive_failures=5)
    f = Breaker(cb)

    def boom(request):
        raise error

    for _ in range(10):
        with pytest.raises(type(error)):
            f(request_for(), downstream(boom))
    assert cb.state == "closed" and transitions == []
