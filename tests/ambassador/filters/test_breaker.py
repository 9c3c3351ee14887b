"""Circuit breaker: closed → open (consecutive failures or failure ratio), open answers 503
circuit_open with a counting-down Retry-After, half-open trials, what counts as a failure,
and the transitions reported; when trials go — a backoff from backoff_base_s doubling up to
open_s, and only once the engine's readiness probe says ready (fake clock and a fake probe
throughout)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from ambassador.chain import Response, error_response
from ambassador.config import Breaker as BreakerSettings
from ambassador.filters.breaker import Breaker, CircuitBreaker, is_failure
from flowgate.common import tracing

OK = Response(200, {}, b"{}")


def failure(status: int = 503, **meta: Any) -> Response:
    response = error_response(status, "x", "failed")
    response.meta.update(meta)
    return response


def _run_outcome(status: int) -> Response:
    """An engine answer about a run (it names the run): that run's outcome."""
    response = failure(status, engine_answered=True)
    response.headers["X-Run-ID"] = "0" * 32
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
    # a run's own outcome: an LLM that timed out, an earlier run's error replayed by its key
    pytest.param(_run_outcome(504), id="engine-504-run-timeout"),
    pytest.param(_run_outcome(503), id="engine-503-replayed-run-abandoned"),
    pytest.param(_run_outcome(500), id="engine-500-of-a-run"),
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
    cb, _ = make_breaker(consecutive_failures=1, open_s=10, backoff_base_s=10)
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
    cb, transitions = make_breaker(consecutive_failures=1, open_s=10, backoff_base_s=10,
                                   half_open_max=2)
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
    cb, transitions = make_breaker(consecutive_failures=1, open_s=10, backoff_base_s=10)
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


# -- when trials go: backoff, and the engine's readiness (issue #11) ---------------------------

class Engine:
    """An engine as the breaker sees it: down, booting (refuses runs; /readyz not 200) or
    ready; ``probe`` is its readiness as asked by the breaker."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.state = "ready"
        self.runs: list[tuple[float, str]] = []  # (time, state) of each request it got
        self.probes: list[tuple[float, str]] = []

    def probe(self) -> bool:
        self.probes.append((self.clock(), self.state))
        return self.state == "ready"

    def handler(self, request) -> Response:
        self.runs.append((self.clock(), self.state))
        return Response(200, {}, b"{}") if self.state == "ready" else CONNECT_ERROR


def first_success_after(f, request_for, downstream, clock, engine, *, restart_at: float,
                        ready_at: float, every_s: float = 0.125) -> float:
    """Requests every ``every_s`` (exact in binary: no drift) from t=0 (the engine just
    died) until one succeeds; the engine restarts (booting) at ``restart_at`` and is ready
    at ``ready_at``."""
    start = clock()
    engine.state = "down"
    for _ in range(100_000):
        elapsed = clock() - start
        engine.state = "ready" if elapsed >= ready_at else "booting" if elapsed >= restart_at \
            else "down"
        if f(request_for(), downstream(engine.handler)).status == 200:
            return elapsed
        clock.advance(every_s)
    raise AssertionError("never recovered")


def test_recovery_follows_the_engines_readiness(make_breaker, request_for, downstream,
                                                clock) -> None:
    """The finding: the engine came back just before open_s ended, the trial hit it while
    it booted and the circuit stayed open another open_s — the first success came 7.6 s
    after the engine was ready. Now a trial goes only once /readyz says ready."""
    engine = Engine(clock)
    settings = {"consecutive_failures": 1, "open_s": 10, "backoff_base_s": 0.5,
                "probe_interval_s": 0.5}
    cb = CircuitBreaker(BreakerSettings(**settings), clock=clock, probe=engine.probe)
    f = Breaker(cb)

    recovered = first_success_after(f, request_for, downstream, clock, engine,
                                    restart_at=9.9, ready_at=12.7)

    assert 12.7 <= recovered <= 12.7 + 0.5 + 0.125, recovered
    # no run reached the engine while it was down or booting, but the one that opened it
    assert [state for _, state in engine.runs] == ["down", "ready"]
    assert engine.probes and all(b - a >= 0.5 for (a, _), (b, _) in itertools.pairwise(engine.probes))
    assert cb.state == "closed"


def test_without_a_probe_a_failed_trial_backs_off_from_the_base(make_breaker, request_for,
                                                                downstream, clock) -> None:
    engine = Engine(clock)
    cb, _ = make_breaker(consecutive_failures=1, open_s=10, backoff_base_s=0.5)
    f = Breaker(cb)

    recovered = first_success_after(f, request_for, downstream, clock, engine,
                                    restart_at=9.9, ready_at=12.7)

    # trials at 0.5, 1.5, 3.5, 7.5, 15.5 s: the first after 12.7 s is 15.5 s
    trials = [t - engine.runs[0][0] for t, _ in engine.runs[1:]]
    assert trials == [0.5, 1.5, 3.5, 7.5, 15.5]
    assert recovered == 15.5


def test_an_engine_ready_but_failing_gets_ever_fewer_trials(request_for, downstream,
                                                           clock) -> None:
    """/readyz says ready, every run fails: trials back off 0.5, 1, 2, 4, 8, then open_s."""
    cb = CircuitBreaker(BreakerSettings(consecutive_failures=1, open_s=10, backoff_base_s=0.5,
                                        probe_interval_s=0.5), clock=clock, probe=lambda: True)
    f = Breaker(cb)
    sent: list[float] = []

    def failing(request) -> Response:
        sent.append(clock())
        return CONNECT_ERROR

    for _ in range(560):  # 70 s, a request every 0.125 s
        f(request_for(), downstream(failing))
        clock.advance(0.125)

    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, 10.0], gaps


def test_a_closed_circuit_starts_again_from_the_base(request_for, downstream, clock) -> None:
    cb = CircuitBreaker(BreakerSettings(consecutive_failures=1, open_s=10, backoff_base_s=0.5),
                        clock=clock)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    for wait in (0.5, 1.0, 2.0):  # three failed trials
        clock.advance(wait)
        send(f, request_for, downstream, CONNECT_ERROR)
    clock.advance(4.0)
    send(f, request_for, downstream, OK)
    assert cb.state == "closed"
    send(f, request_for, downstream, CONNECT_ERROR)  # opens again: the base, not 8 s
    assert f(request_for(), downstream(OK)).headers["Retry-After"] == "1"
    clock.advance(0.5)
    assert send(f, request_for, downstream, OK)[0].status == 200


def test_while_the_engine_is_not_ready_nothing_goes_and_readiness_is_asked_at_intervals(
        request_for, downstream, clock) -> None:
    asked: list[float] = []

    def not_ready() -> bool:
        asked.append(clock())
        return False

    cb = CircuitBreaker(BreakerSettings(consecutive_failures=1, open_s=10, backoff_base_s=1,
                                        probe_interval_s=2), clock=clock, probe=not_ready)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    down = downstream(OK)
    answers = []
    for _ in range(48):  # 6 s, a request every 0.125 s
        answers.append(f(request_for(), down))
        clock.advance(0.125)

    assert down.count == 0
    assert {(a.status, a.json()["error"]["code"]) for a in answers} == {(503, "circuit_open")}
    start = asked[0] - 1.0
    assert [t - start for t in asked] == [1.0, 3.0, 5.0]
    assert cb.state == "open"
    # Retry-After says when readiness is asked next (5 + 2 = 7 s; now 6 s)
    assert f(request_for(), down).headers["Retry-After"] == "1"


def test_one_request_asks_the_others_are_answered_meanwhile(request_for, downstream,
                                                            clock) -> None:
    inner: list[Response] = []
    f: Breaker

    def slow_probe() -> bool:  # another request arrives while this one is asking
        inner.append(f(request_for(), downstream(OK)))
        return True

    cb = CircuitBreaker(BreakerSettings(consecutive_failures=1, backoff_base_s=1,
                                        half_open_max=1), clock=clock, probe=slow_probe)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    clock.advance(1)
    down = downstream(OK)

    outer = f(request_for(), down)

    assert [r.status for r in inner] == [503]  # it did not ask again, nor get through
    assert outer.status == 200 and down.count == 1
    assert cb.state == "closed"


@pytest.mark.parametrize("error", [ConnectionError("refused"), RuntimeError("bug")])
def test_a_probe_that_raises_is_not_ready(request_for, downstream, clock, error) -> None:
    calls: list[float] = []

    def probe() -> bool:
        calls.append(clock())
        raise error

    probes: list[bool] = []
    cb = CircuitBreaker(BreakerSettings(consecutive_failures=1, backoff_base_s=1,
                                        probe_interval_s=1), clock=clock, probe=probe,
                        on_probe=probes.append)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    clock.advance(1)
    assert send(f, request_for, downstream, OK)[0].status == 503
    assert send(f, request_for, downstream, OK)[0].status == 503  # not asked again yet
    clock.advance(1)
    assert send(f, request_for, downstream, OK)[0].status == 503
    assert len(calls) == 2 and probes == [False, False]
    assert cb.state == "open"


def test_a_probe_interrupted_does_not_wedge_the_breaker(request_for, downstream, clock) -> None:
    """A BaseException in the probe (a gevent Timeout, a killed greenlet) leaves the next
    request free to ask again."""
    answers = iter([KeyboardInterrupt, True])

    def probe() -> bool:
        answer = next(answers)
        if answer is KeyboardInterrupt:
            raise KeyboardInterrupt
        return answer

    cb = CircuitBreaker(BreakerSettings(consecutive_failures=1, backoff_base_s=1,
                                        probe_interval_s=1), clock=clock, probe=probe)
    f = Breaker(cb)
    send(f, request_for, downstream, CONNECT_ERROR)
    clock.advance(1)
    with pytest.raises(KeyboardInterrupt):
        f(request_for(), downstream(OK))
    clock.advance(1)
    assert send(f, request_for, downstream, OK)[0].status == 200
    assert cb.state == "closed"
