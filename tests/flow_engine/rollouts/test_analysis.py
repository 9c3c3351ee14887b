"""Canary analysis as a pure function: the verdicts for each situation an SRE cares about."""

from __future__ import annotations

import math
from itertools import pairwise
from statistics import NormalDist

import pytest

from flow_engine.rollouts.analysis import (
    BUCKETS,
    Guard,
    Outcomes,
    breach,
    bucket_of,
    judge_canary,
    judge_publish,
)
from flow_engine.store.schema import OUTCOME_BUCKETS

GUARD = Guard(max_error_rate=0.1, max_latency_ratio=2.0, min_runs=10, window_s=60)
STEPS = (5, 25, 50, 100)


def outcomes(ok: int, failed: int = 0, seconds: float = 0.2) -> Outcomes:
    o = Outcomes()
    for _ in range(ok):
        o.add(False, seconds)
    for _ in range(failed):
        o.add(True, seconds)
    return o


@pytest.mark.parametrize(("seconds", "bucket"), [(0.0, 0), (0.01, 0), (0.0101, 1), (1.0, 26),
                                                (1.15, 27), (811.0, 62), (900.0, len(BUCKETS) - 1)])
def test_durations_fall_in_their_bucket(seconds, bucket):
    assert bucket_of(seconds) == bucket


def test_buckets_are_1_2_apart_and_the_store_has_a_column_for_each():
    finite = BUCKETS[:-1]
    assert all(b / a == pytest.approx(1.2, rel=1e-3) for a, b in pairwise(finite))
    assert (finite[0], math.isinf(BUCKETS[-1])) == (0.01, True) and finite[-1] > 600
    assert len(BUCKETS) == OUTCOME_BUCKETS


def test_p95_is_interpolated_within_the_bucket_of_the_95th_run():
    o = outcomes(95, seconds=0.2)
    for _ in range(5):
        o.add(False, 3.0)
    assert BUCKETS[bucket_of(0.2) - 1] < o.p95() <= BUCKETS[bucket_of(0.2)]
    o.add(False, 3.0)
    assert BUCKETS[bucket_of(3.0) - 1] < o.p95() <= BUCKETS[bucket_of(3.0)]
    assert o.p95() == pytest.approx(3.0, rel=0.2)
    spread = Outcomes()
    for i in range(1000):  # 1.000 s .. 1.999 s: p95 is 1.95 s
        spread.add(False, 1 + i / 1000)
    assert spread.p95() == pytest.approx(1.95, rel=0.02)
    assert outcomes(20, seconds=1000.0).p95() == math.inf  # past the last bound
    assert Outcomes().p95() is None


def durations(shape: str, median: float, n: int = 200) -> list[float]:
    """``n`` run durations around ``median``: all equal, evenly spread ±30 %, or log-normal."""
    if shape == "equal":
        return [median] * n
    if shape == "spread":
        return [median * (0.7 + 0.6 * i / (n - 1)) for i in range(n)]
    normal = NormalDist(0, 0.5)
    return [median * math.exp(normal.inv_cdf((i + 0.5) / n)) for i in range(n)]


def of(seconds: list[float]) -> Outcomes:
    o = Outcomes()
    for s in seconds:
        o.add(False, s)
    return o


@pytest.mark.parametrize(("slowdown", "ratio", "expected"), [
    pytest.param(1.22, 1.5, None, id="1.22x-holds-at-1.5"),
    pytest.param(1.8, 1.5, "latency", id="1.8x-aborts-at-1.5"),
    pytest.param(3.8, 2.0, "latency", id="3.8x-aborts-at-2.0"),
    pytest.param(1.0, 1.5, None, id="as-fast-holds"),
])
@pytest.mark.parametrize("shape", ["equal", "spread", "lognormal"])
def test_the_latency_guard_judges_the_slowdown_not_the_buckets(slowdown, ratio, expected, shape):
    """Live runs from 20 ms to 2 min (5 % apart, so every position within a bucket), the
    canary's ``slowdown`` × as long: the verdict is the same for every one of them."""
    guard = Guard(max_latency_ratio=ratio, min_runs=10)
    wrong = []
    for k in range(180):
        median = 0.02 * 1.05 ** k
        live, canary = of(durations(shape, median)), of(durations(shape, median * slowdown))
        found = (breach(canary, live, guard) or {}).get("breach")
        if found != expected:
            wrong.append((round(median, 3), found, round(canary.p95() / live.p95(), 2)))
    assert not wrong, f"misjudged (live median s, verdict, measured ratio): {wrong[:5]} ..."


@pytest.mark.parametrize(("canary", "live", "expected"), [
    pytest.param(outcomes(15, 5), outcomes(100, 1), "error_rate", id="errors-over-both"),
    pytest.param(outcomes(15, 5), outcomes(60, 40), None, id="no-worse-than-live"),
    pytest.param(outcomes(5, 4), outcomes(100), None, id="too-few-runs-to-judge"),
    pytest.param(outcomes(20, 1), outcomes(100), None, id="under-the-error-rate"),
    pytest.param(outcomes(20, seconds=4.0), outcomes(100, seconds=0.2), "latency", id="slower"),
    pytest.param(outcomes(20, seconds=0.3), outcomes(100, seconds=0.2), None,
                 id="slower-within-the-ratio"),
    pytest.param(outcomes(20, seconds=4.0), outcomes(3, seconds=0.2), None,
                 id="live-too-few-runs-for-latency"),
])
def test_breach(canary, live, expected):
    found = breach(canary, live, GUARD)
    assert (found or {}).get("breach") == expected
    if found:
        assert found["candidate"]["runs"] == canary.runs and found["guard"]["min_runs"] == 10


def test_a_breaching_canary_aborts_at_once():
    verdict = judge_canary(outcomes(10, 10), outcomes(100), GUARD, STEPS, percent=5,
                           seconds_on_step=1, step_after_s=60)
    assert verdict.action == "abort" and verdict.reason["breach"] == "error_rate"


@pytest.mark.parametrize(("percent", "on_step", "runs", "expected", "next_percent"), [
    pytest.param(5, 10, 50, "hold", None, id="too-early-to-step"),
    pytest.param(5, 61, 5, "hold", None, id="too-few-runs-to-step"),
    pytest.param(5, 61, 50, "step", 25, id="step"),
    pytest.param(50, 61, 50, "step", 100, id="to-100"),
    pytest.param(100, 61, 50, "promote", None, id="promote"),
])
def test_a_healthy_canary_walks_its_steps(percent, on_step, runs, expected, next_percent):
    verdict = judge_canary(outcomes(runs), outcomes(100), GUARD, STEPS, percent=percent,
                           seconds_on_step=on_step, step_after_s=60)
    assert (verdict.action, verdict.percent) == (expected, next_percent)


def test_a_guarded_publish_rolls_back_on_a_breach_and_is_done_after_the_window():
    assert judge_publish(outcomes(10, 10), outcomes(100), GUARD, 5).action == "rollback"
    assert judge_publish(outcomes(30), outcomes(100), GUARD, 5).action == "hold"
    assert judge_publish(outcomes(30), outcomes(100), GUARD, 61).action == "done"


@pytest.mark.parametrize(("raw", "fragment"), [
    pytest.param([], "must be an object", id="not-an-object"),
    pytest.param({"max_error_rate": 2}, "max_error_rate must be a number from 0.0 to 1.0", id="rate"),
    pytest.param({"min_runs": 2.5}, "min_runs", id="fractional-runs"),
    pytest.param({"min_runs": True}, "min_runs", id="boolean"),
    pytest.param({"window_s": 1}, "window_s", id="window-too-short"),
    pytest.param({"threshold": 1}, "must be an object with", id="unknown-field"),
])
def test_a_bad_guard_is_refused_naming_the_field(raw, fragment):
    with pytest.raises(ValueError, match=fragment):
        Guard.parse(raw, "canary.guard")


def test_a_guard_takes_defaults_for_what_it_does_not_say():
    guard = Guard.parse({"max_error_rate": 0.2}, "guard")
    assert guard == Guard(max_error_rate=0.2)
    assert math.isfinite(guard.window_s)
