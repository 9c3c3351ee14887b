"""RedisPause (flowgate/common/redis_guard.py): after a failure, Redis is left alone for
pause_s (calls refused at once, the callee never called), then tried again; ``failed()``
starts a pause without a call (the engine's tenant limits). A fake clock: nothing sleeps."""

from __future__ import annotations

import pytest

from flowgate.common.redis_guard import RedisPause, RedisPaused


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def boom() -> None:
    raise ConnectionError("redis is down")


def test_a_failure_pauses_calls_for_pause_s(clock) -> None:
    failures: list[int] = []
    pause = RedisPause(5.0, clock, on_failure=lambda: failures.append(1))
    called: list[int] = []

    def counted() -> str:
        called.append(1)
        return "ok"

    assert pause.call(counted) == "ok"
    with pytest.raises(ConnectionError):
        pause.call(boom)
    for _ in range(3):  # refused here, never reaching Redis
        with pytest.raises(RedisPaused):
            pause.call(counted)
        clock.advance(1.5)
    assert called == [1] and pause.paused  # 4.5 s of 5
    clock.advance(0.5)
    assert pause.call(counted) == "ok"
    assert (called, pause.failures, failures) == ([1, 1], 1, [1])


def test_the_first_call_after_a_pause_finds_out_again(clock) -> None:
    pause = RedisPause(5.0, clock)
    with pytest.raises(ConnectionError):
        pause.call(boom)
    clock.advance(5.0)
    with pytest.raises(ConnectionError):
        pause.call(boom)  # still down: a new pause
    assert pause.failures == 2 and pause.paused


def test_failed_starts_a_pause_without_a_call(clock) -> None:
    failures: list[int] = []
    pause = RedisPause(2.0, clock, on_failure=lambda: failures.append(1))
    assert not pause.paused
    pause.failed()
    assert pause.paused and pause.failures == 1 and failures == [1]
    with pytest.raises(RedisPaused):
        pause.call(lambda: "never called")
    clock.advance(2.0)
    assert not pause.paused and pause.call(lambda: "ok") == "ok"


def test_a_refusal_is_a_connection_error_and_not_a_failure(clock) -> None:
    """Callers fall back on ConnectionError; a refused call is not counted again."""
    pause = RedisPause(5.0, clock)
    pause.failed()
    with pytest.raises(ConnectionError):
        pause.call(lambda: "never called")
    assert pause.failures == 1
