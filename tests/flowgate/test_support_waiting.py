"""tests/support/waiting.py: a paused machine does not fail a wait, a system that never gets
there still does. The clock is fake (time is what no test can own)."""

from __future__ import annotations

import pytest
from support import waiting


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(waiting, "time", fake)
    return fake


def test_returns_the_first_truthy_value(clock) -> None:
    answers = iter([None, 0, "", {"status": "ready"}])
    assert waiting.wait_until(lambda: next(answers), "ready") == {"status": "ready"}
    assert len(clock.sleeps) == 3


def test_gives_up_after_the_timeout_naming_the_wait_and_the_last_value(clock) -> None:
    with pytest.raises(AssertionError, match=r"the run ends: not true within 2 s; last seen: 0"):
        waiting.wait_until(lambda: 0, "the run ends", timeout_s=2, interval_s=0.5)
    assert clock.now == pytest.approx(1002.0)


def test_a_pause_of_the_machine_moves_the_deadline_and_the_condition_is_checked_again(clock) -> None:
    calls = []

    def check():  # the first poll is frozen for 38 s (the CI run this helper was written for)
        calls.append(clock.now)
        if len(calls) == 1:
            clock.now += 38
            return None
        return "ready" if len(calls) == 3 else None

    assert waiting.wait_until(check, "ready", timeout_s=30) == "ready"
    assert len(calls) == 3


def test_pauses_are_forgiven_only_up_to_a_bound(clock) -> None:
    def frozen():
        clock.now += 50  # every poll stalls: a system that hangs, not a paused machine
        return None

    with pytest.raises(AssertionError, match=r"and 120 s paused"):
        waiting.wait_until(frozen, "never", timeout_s=30)


def test_the_message_can_be_built_when_the_wait_fails(clock) -> None:
    seen = []

    def check():
        seen.append(len(seen))
        return None

    with pytest.raises(AssertionError, match=r"polled \d+ times"):
        waiting.wait_until(check, lambda: f"polled {len(seen)} times", timeout_s=1, interval_s=0.25)
