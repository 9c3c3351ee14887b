"""Timeout filter: the total deadline is set once (kept across retries); each attempt's
per-try limit is min(per_try_s, what is left); a passed deadline answers 504."""

from __future__ import annotations

import pytest

from ambassador.chain import error_response
from ambassador.config import Retry as RetrySettings
from ambassador.config import Timeouts
from ambassador.filters.retry import Retry, RetryBudget
from ambassador.filters.timeout import Timeout
from flowgate.common import tracing


@pytest.mark.parametrize(("per_try", "total", "elapsed", "expected_per_try"), [
    pytest.param(4, 10, 0, 4, id="per-try-smaller"),
    pytest.param(4, 10, 8, 2, id="remaining-smaller"),
    pytest.param(4, 10, 6, 4, id="equal"),
    pytest.param(10, 10, 0, 10, id="per-try-equals-total"),
    pytest.param(4, 10, 9.75, 0.25, id="a-quarter-second-left"),
])
def test_per_try_is_the_smaller_of_per_try_and_remaining(clock, request_for, downstream, per_try,
                                                         total, elapsed, expected_per_try) -> None:
    t = Timeout(Timeouts(per_try_s=per_try, total_s=total), clock=clock)
    req = request_for()
    t(req, downstream())  # first attempt sets the deadline
    assert req.ctx["deadline"] == clock() + total
    clock.advance(elapsed)
    down = downstream()
    t(req, down)
    assert down.calls[0].ctx["per_try_s"] == pytest.approx(expected_per_try)
    assert down.calls[0].ctx["deadline"] == req.ctx["deadline"]


def test_deadline_is_set_once(clock, request_for, downstream) -> None:
    t = Timeout(Timeouts(per_try_s=4, total_s=10), clock=clock)
    req = request_for()
    start = clock()
    for _ in range(3):
        t(req, downstream())
        clock.advance(3)
    assert req.ctx["deadline"] == start + 10


def test_an_existing_deadline_is_kept(clock, request_for, downstream) -> None:
    t = Timeout(Timeouts(per_try_s=60, total_s=120), clock=clock)
    req = request_for(ctx={"deadline": clock() + 5})
    down = downstream()
    t(req, down)
    assert req.ctx["deadline"] == clock() + 5 and down.calls[0].ctx["per_try_s"] == 5


@pytest.mark.parametrize("past", [pytest.param(0, id="exactly-at-deadline"),
                                  pytest.param(0.001, id="just-past"),
                                  pytest.param(100, id="long-past")])
def test_a_passed_deadline_answers_504(clock, request_for, downstream, past) -> None:
    t = Timeout(Timeouts(per_try_s=4, total_s=10), clock=clock)
    trace = tracing.from_headers(None, None)
    req = request_for(ctx={"trace": trace})
    t(req, downstream())
    clock.advance(10 + past)
    down = downstream()
    response = t(req, down)
    assert response.status == 504 and down.count == 0
    error = response.json()["error"]
    assert error["code"] == "timeout" and error["trace_id"] == trace.trace_id


def test_deadline_kept_across_retries(clock, request_for, downstream) -> None:
    """retry → timeout → downstream: every attempt shares the first attempt's deadline."""
    timeout = Timeout(Timeouts(per_try_s=4, total_s=10), clock=clock)
    retry = Retry(RetrySettings(max_attempts=5, backoff_base_s=3, backoff_max_s=3),
                  RetryBudget(1, 100, 10, clock=clock), sleep=clock.sleep, clock=clock,
                  rand=lambda lo, hi: hi)
    failure = error_response(503, "upstream_unavailable", "down")
    failure.meta["upstream_error"] = "connect_error"
    down = downstream(failure)
    start = clock()
    response = retry(request_for(), lambda req: timeout(req, down))
    assert {c.ctx["deadline"] for c in down.calls} == {start + 10}
    # attempts at 0, 3, 6 and 9 s (1 s left); another 3 s backoff would pass the deadline
    assert [c.ctx["per_try_s"] for c in down.calls] == pytest.approx([4, 4, 4, 1])
    assert down.count == 4 and response.headers["X-Upstream-Attempts"] == "4"
