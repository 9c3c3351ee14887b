"""Retry filter: what is retried and what never is, the Idempotency-Key it adds, backoff with
full jitter (rand stub), Retry-After, the deadline, the retry budget, X-Upstream-Attempts.
The clock and sleep are fakes: nothing really waits."""

from __future__ import annotations

from typing import Any

import pytest

from ambassador.chain import Response, error_response
from ambassador.config import Retry as RetrySettings
from ambassador.filters.retry import Retry, RetryBudget

OK = Response(200, {"Content-Type": "application/json"}, b'{"output": "ok"}')


def failed(status: int, headers: dict[str, str] | None = None, **meta: Any) -> Response:
    response = error_response(status, "x", "failed", headers=headers)
    response.meta.update(meta)
    return response


CONNECT_ERROR = failed(503, {"Retry-After": "1"}, upstream_error="connect_error", sent=False)
TIMEOUT = failed(504, upstream_error="timeout", sent=True)
RESET = failed(502, upstream_error="reset", sent=True)
SHED = failed(503, {"Retry-After": "1"})  # the engine itself: 503 + Retry-After


class Hooks:
    def __init__(self) -> None:
        self.retries: list[str] = []
        self.exhausted = 0

    def on_exhausted(self) -> None:
        self.exhausted += 1


class Rand:
    """A rand(lo, hi) stub that records its bounds and returns ``pick(lo, hi)``."""

    def __init__(self, pick=lambda lo, hi: hi) -> None:
        self.pick = pick
        self.bounds: list[tuple[float, float]] = []

    def __call__(self, lo: float, hi: float) -> float:
        self.bounds.append((lo, hi))
        return self.pick(lo, hi)


@pytest.fixture
def make_retry(clock):
    def build(budget: RetryBudget | None = None, rand=None, **settings: Any):
        hooks = Hooks()
        budget = budget or RetryBudget(0.2, 100, 10, clock=clock)
        r = Retry(RetrySettings(**settings), budget, on_retry=hooks.retries.append,
                  on_budget_exhausted=hooks.on_exhausted, sleep=clock.sleep, clock=clock,
                  rand=rand or Rand(lambda lo, hi: 0.0))
        return r, hooks

    return build


def test_success_is_one_attempt(make_retry, request_for, downstream) -> None:
    r, hooks = make_retry()
    down = downstream(OK)
    response = r(request_for(), down)
    assert response.status == 200 and down.count == 1
    assert response.headers["X-Upstream-Attempts"] == "1" and response.meta["attempts"] == 1
    assert hooks.retries == []


@pytest.mark.parametrize(("first", "method", "headers", "reason"), [
    pytest.param(CONNECT_ERROR, "POST", {}, "connect_error", id="connect-error-post"),
    pytest.param(CONNECT_ERROR, "GET", {}, "connect_error", id="connect-error-get-without-key"),
    pytest.param(SHED, "POST", {}, "unavailable", id="engine-503-with-retry-after"),
    pytest.param(SHED, "GET", {}, "unavailable", id="engine-503-with-retry-after-get"),
    pytest.param(TIMEOUT, "POST", {}, "timeout", id="timeout-post-gets-a-key"),
    pytest.param(TIMEOUT, "GET", {"Idempotency-Key": "k1"}, "timeout", id="timeout-get-with-key"),
    pytest.param(RESET, "POST", {}, "upstream_error", id="reset-post-gets-a-key"),
    pytest.param(RESET, "GET", {"Idempotency-Key": "k1"}, "upstream_error", id="reset-get-with-key"),
])
def test_retried(make_retry, request_for, downstream, clock, first, method, headers, reason) -> None:
    r, hooks = make_retry()
    down = downstream(first, OK)
    response = r(request_for(method=method, headers=headers), down)
    assert response.status == 200 and down.count == 2
    assert response.headers["X-Upstream-Attempts"] == "2"
    assert hooks.retries == [reason]
    assert len(clock.sleeps) == 1


@pytest.mark.parametrize(("answer", "method", "settings"), [
    pytest.param(TIMEOUT, "GET", {}, id="timeout-without-key"),
    pytest.param(RESET, "GET", {}, id="reset-without-key"),
    pytest.param(TIMEOUT, "POST", {"add_idempotency_key": False}, id="timeout-post-key-disabled"),
    pytest.param(failed(502), "POST", {}, id="engine-502"),
    pytest.param(failed(500), "POST", {}, id="engine-500"),
    pytest.param(failed(504), "POST", {}, id="engine-504"),
    pytest.param(failed(503), "POST", {}, id="503-without-retry-after"),
    pytest.param(failed(400), "POST", {}, id="400"),
    pytest.param(failed(404), "POST", {}, id="404"),
    pytest.param(failed(409), "POST", {}, id="409"),
    pytest.param(failed(422), "POST", {}, id="422"),
    pytest.param(failed(429, {"Retry-After": "1"}), "POST", {}, id="429"),
    pytest.param(failed(503, {"Retry-After": "5"}, breaker_open=True), "POST", {}, id="breaker-open"),
    pytest.param(Response(503, {"Retry-After": "1"}, chunks=iter([b"x"])), "POST", {},
                 id="streamed-503"),
    pytest.param(Response(200, {}, chunks=iter([b"data: x\n\n"])), "POST", {}, id="streamed-200"),
])
def test_never_retried(make_retry, request_for, downstream, clock, answer, method, settings) -> None:
    r, hooks = make_retry(**settings)
    down = downstream(answer, OK)
    response = r(request_for(method=method), down)
    assert down.count == 1 and response.status == answer.status
    assert response.headers["X-Upstream-Attempts"] == "1"
    assert hooks.retries == [] and clock.sleeps == []


def test_streamed_connect_error_is_not_retried(make_retry, request_for, downstream) -> None:
    streamed = Response(503, {}, chunks=iter([b"x"]), meta={"upstream_error": "connect_error"})
    r, _ = make_retry()
    down = downstream(streamed, OK)
    assert r(request_for(), down).status == 503 and down.count == 1


def test_idempotency_key_added_to_posts_and_kept_across_attempts(make_retry, request_for,
                                                                 downstream) -> None:
    r, _ = make_retry(max_attempts=3)
    down = downstream(TIMEOUT, RESET, OK)
    r(request_for(method="POST"), down)
    keys = [call.headers.get("idempotency-key") for call in down.calls]
    assert len(keys) == 3 and keys[0] and len(set(keys)) == 1


def test_each_request_gets_its_own_key(make_retry, request_for, downstream) -> None:
    r, _ = make_retry()
    down = downstream(OK)
    r(request_for(), down)
    r(request_for(), down)
    assert down.calls[0].headers["idempotency-key"] != down.calls[1].headers["idempotency-key"]


def test_callers_idempotency_key_is_kept(make_retry, request_for, downstream) -> None:
    r, _ = make_retry()
    down = downstream(TIMEOUT, OK)
    r(request_for(headers={"Idempotency-Key": "caller-key"}), down)
    assert [c.headers["idempotency-key"] for c in down.calls] == ["caller-key", "caller-key"]


@pytest.mark.parametrize(("method", "settings"), [
    pytest.param("GET", {}, id="get"),
    pytest.param("POST", {"add_idempotency_key": False}, id="post-disabled"),
])
def test_no_idempotency_key_added(make_retry, request_for, downstream, method, settings) -> None:
    r, _ = make_retry(**settings)
    down = downstream(OK)
    r(request_for(method=method), down)
    assert "idempotency-key" not in down.calls[0].headers


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 5])
def test_max_attempts(make_retry, request_for, downstream, clock, max_attempts) -> None:
    r, hooks = make_retry(max_attempts=max_attempts)
    down = downstream(CONNECT_ERROR)
    response = r(request_for(), down)
    assert response.status == 503 and down.count == max_attempts
    assert response.headers["X-Upstream-Attempts"] == str(max_attempts)
    assert len(clock.sleeps) == len(hooks.retries) == max_attempts - 1


@pytest.mark.parametrize(("base", "cap", "expected_caps"), [
    pytest.param(0.1, 0.3, [0.1, 0.2, 0.3, 0.3], id="doubling-then-capped"),
    pytest.param(0.05, 2.0, [0.05, 0.1, 0.2, 0.4], id="defaults-like"),
    pytest.param(1.0, 0.5, [0.5, 0.5, 0.5, 0.5], id="cap-below-base"),
])
def test_full_jitter_backoff_bounds(make_retry, request_for, downstream, clock, base, cap,
                                    expected_caps) -> None:
    rand = Rand(lambda lo, hi: hi)
    r, _ = make_retry(rand=rand, max_attempts=5, backoff_base_s=base, backoff_max_s=cap)
    r(request_for(), downstream(CONNECT_ERROR))
    assert [lo for lo, _ in rand.bounds] == [0] * 4  # full jitter: from zero
    assert [hi for _, hi in rand.bounds] == pytest.approx(expected_caps)
    assert clock.sleeps == pytest.approx(expected_caps)


def test_jitter_value_is_what_is_slept(make_retry, request_for, downstream, clock) -> None:
    rand = Rand(lambda lo, hi: hi / 4)
    r, _ = make_retry(rand=rand, max_attempts=3, backoff_base_s=0.4, backoff_max_s=10)
    r(request_for(), downstream(CONNECT_ERROR))
    assert clock.sleeps == pytest.approx([0.1, 0.2])


@pytest.mark.parametrize(("retry_after", "backoff_max", "slept"), [
    pytest.param("1.5", 2.0, 1.5, id="honoured"),
    pytest.param("30", 2.0, 2.0, id="capped-at-backoff-max"),
    pytest.param("0", 2.0, 0.0, id="zero"),
    pytest.param("soon", 2.0, 0.0, id="unparseable-ignored"),
])
def test_engine_retry_after_sets_the_minimum_delay(make_retry, request_for, downstream, clock,
                                                   retry_after, backoff_max, slept) -> None:
    r, hooks = make_retry(backoff_max_s=backoff_max)  # rand stub returns 0
    down = downstream(failed(503, {"Retry-After": retry_after}), OK)
    response = r(request_for(), down)
    if retry_after == "soon":  # still 503 + Retry-After: retried, with the jittered delay
        assert hooks.retries == ["unavailable"]
    assert response.status == 200
    assert clock.sleeps == pytest.approx([slept])


def test_synthesized_retry_after_of_a_connect_error_is_ignored(make_retry, request_for, downstream,
                                                               clock) -> None:
    r, _ = make_retry()
    r(request_for(), downstream(CONNECT_ERROR, OK))
    assert clock.sleeps == [0.0]


@pytest.mark.parametrize(("deadline_in", "delay", "attempts"), [
    pytest.param(None, 0.6, 3, id="no-deadline"),
    pytest.param(10.0, 0.6, 3, id="far-deadline"),
    pytest.param(1.0, 0.6, 2, id="second-retry-would-pass-the-deadline"),
    pytest.param(0.5, 0.6, 1, id="first-retry-would-pass-the-deadline"),
    pytest.param(1.2, 0.6, 2, id="retry-landing-on-the-deadline"),
])
def test_the_deadline_stops_retries(make_retry, request_for, downstream, clock, deadline_in, delay,
                                    attempts) -> None:
    r, _hooks = make_retry(rand=Rand(lambda lo, hi: delay), max_attempts=3, backoff_base_s=5,
                          backoff_max_s=5)
    ctx = {"deadline": clock() + deadline_in} if deadline_in is not None else {}
    down = downstream(CONNECT_ERROR)
    response = r(request_for(ctx=ctx), down)
    assert down.count == attempts
    assert response.headers["X-Upstream-Attempts"] == str(attempts)
    assert sum(clock.sleeps) == pytest.approx(delay * (attempts - 1))


# -- budget -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ratio", "min_per_s", "window", "requests", "allowed"), [
    pytest.param(0.0, 0.1, 10, 0, 1, id="floor-only"),
    pytest.param(0.5, 0.0, 10, 4, 2, id="ratio-only"),
    pytest.param(0.5, 0.1, 10, 4, 3, id="ratio-plus-floor"),
    pytest.param(0.2, 0.0, 10, 4, 0, id="ratio-rounds-down"),
    pytest.param(0.0, 0.0, 10, 100, 0, id="no-budget"),
])
def test_budget_is_ratio_plus_floor(clock, ratio, min_per_s, window, requests, allowed) -> None:
    budget = RetryBudget(ratio, min_per_s, window, clock=clock)
    for _ in range(requests):
        budget.record_request()
    spent = [budget.try_spend() for _ in range(allowed + 3)]
    assert spent == [True] * allowed + [False] * 3


def test_budget_slides_with_the_window(clock) -> None:
    budget = RetryBudget(0.0, 0.1, 10, clock=clock)  # 1 retry per 10 s
    assert budget.try_spend() is True
    clock.advance(5)
    assert budget.try_spend() is False
    clock.advance(5.01)
    assert budget.try_spend() is True


def test_requests_age_out_of_the_budget(clock) -> None:
    budget = RetryBudget(1.0, 0.0, 10, clock=clock)
    budget.record_request()
    clock.advance(10.01)
    assert budget.try_spend() is False


def test_budget_exhausted_stops_retries(make_retry, request_for, downstream, clock) -> None:
    budget = RetryBudget(0.5, 0.0, 10, clock=clock)
    r, hooks = make_retry(budget=budget, max_attempts=3)
    down = downstream(CONNECT_ERROR)
    # request 1: ratio 0.5 × 1 request = 0.5 retries → none allowed
    response = r(request_for(), down)
    assert down.count == 1 and response.headers["X-Upstream-Attempts"] == "1"
    assert hooks.exhausted == 1 and hooks.retries == []
    # request 2: 0.5 × 2 = 1 retry in the window
    down2 = downstream(CONNECT_ERROR)
    r(request_for(), down2)
    assert down2.count == 2 and hooks.retries == ["connect_error"] and hooks.exhausted == 2


def test_budget_shared_by_requests_caps_an_outage(make_retry, request_for, downstream, clock) -> None:
    budget = RetryBudget(0.2, 0.1, 10, clock=clock)  # 0.2 × requests + 1
    r, hooks = make_retry(budget=budget, max_attempts=3)
    calls = 0
    for _ in range(20):
        down = downstream(CONNECT_ERROR)
        r(request_for(), down)
        calls += down.count
    assert len(hooks.retries) <= 0.2 * 20 + 1
    assert calls == 20 + len(hooks.retries)
    assert hooks.exhausted > 0
