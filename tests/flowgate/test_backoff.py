"""Backoff (flowgate/common/backoff.py): base doubling up to the cap, and the three jitter
policies its users need — full (the ambassador's retries), 50-100 % (the engine's LLM and
embedding retries), none (the engine's polling loops). A stub random source: no chance, no
sleeping."""

from __future__ import annotations

import itertools

import pytest

from flowgate.common.backoff import Backoff


class Uniform:
    """A uniform(lo, hi) stub that records its bounds and returns ``pick(lo, hi)``."""

    def __init__(self, pick) -> None:
        self.pick, self.bounds = pick, []

    def __call__(self, lo: float, hi: float) -> float:
        self.bounds.append((lo, hi))
        return self.pick(lo, hi)


@pytest.mark.parametrize(("base", "cap", "ceilings"), [
    pytest.param(0.1, 0.3, [0.1, 0.2, 0.3, 0.3], id="doubling-then-capped"),
    pytest.param(0.05, 2.0, [0.05, 0.1, 0.2, 0.4], id="doubling"),
    pytest.param(1.0, 0.5, [0.5, 0.5, 0.5, 0.5], id="cap-below-base"),
])
def test_the_ceiling_doubles_up_to_the_cap(base, cap, ceilings) -> None:
    assert [Backoff(base, cap).ceiling(n) for n in (1, 2, 3, 4)] == pytest.approx(ceilings)


def test_no_jitter_is_the_ceiling_and_draws_nothing() -> None:
    uniform = Uniform(lambda lo, hi: 1 / 0)
    backoff = Backoff(0.05, 2.0, uniform=uniform)
    assert list(itertools.islice(backoff.delays(), 8)) == [
        0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert uniform.bounds == []


def test_full_jitter_draws_from_zero_to_the_ceiling() -> None:
    uniform = Uniform(lambda lo, hi: hi / 4)
    backoff = Backoff(0.4, 10, "full", uniform=uniform)
    assert [backoff.delay(n) for n in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.4])
    assert [lo for lo, _ in uniform.bounds] == [0, 0, 0]  # full jitter: from zero
    assert [hi for _, hi in uniform.bounds] == pytest.approx([0.4, 0.8, 1.6])


@pytest.mark.parametrize(("unit", "n", "delay"), [
    pytest.param(0.0, 1, 0.125, id="half-of-the-first"),
    pytest.param(0.999, 2, 0.49975, id="almost-all-of-the-second"),
    pytest.param(0.0, 9, 2.0, id="half-of-the-cap"),
])
def test_half_jitter_is_50_to_100_percent(unit, n, delay) -> None:
    backoff = Backoff(0.25, 4.0, "half", uniform=lambda lo, hi: lo + (hi - lo) * unit)
    assert backoff.delay(n) == pytest.approx(delay)


def test_a_huge_attempt_number_is_the_cap_not_an_overflow() -> None:
    assert Backoff(0.05, 2.0).delay(5000) == 2.0


def test_an_unknown_jitter_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="jitter"):
        Backoff(1, 2, "some")  # type: ignore[arg-type]


def test_the_default_random_source_stays_in_bounds() -> None:
    full, half = Backoff(1.0, 1.0, "full"), Backoff(1.0, 1.0, "half")
    for _ in range(200):
        assert 0 <= full.delay(1) <= 1.0 and 0.5 <= half.delay(1) <= 1.0
