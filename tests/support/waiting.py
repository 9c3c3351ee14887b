"""Waiting for a condition in a test: bounded, and fair to a paused machine.

CI machines are shared: the test process, or the whole VM, can be descheduled for tens of
seconds (a CI run once saw one in-process GET take 38 s, every thread of the process frozen,
and a 30 s wait failed with the document still being indexed). A wait whose budget is plain
wall-clock time then fails although the system under test was never given that time.

:func:`wait_until` therefore counts a gap between two polls far longer than a poll takes
(``STALL_S``) as a pause, not as waiting: the deadline moves by the gap, at most
``MAX_PAUSE_S`` in all, so a system that really never gets there still fails, and the
condition is always checked again after the deadline has passed before failing. Tests that
measure latency must not use it: it forgives slowness by design.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

WAIT_S = 30.0
STALL_S = 5.0  # one poll (a local request, a Redis or SQL read) never takes this long
MAX_PAUSE_S = 120.0


def wait_until(check: Callable[[], T], what: str | Callable[[], str], timeout_s: float = WAIT_S,
               interval_s: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy and return that; AssertionError
    naming ``what`` (a text, or a function giving one when the wait fails) and the last value
    seen when it does not within ``timeout_s`` of time the process was allowed to run."""
    deadline = time.monotonic() + timeout_s
    paused = 0.0
    last: Any = None
    previous = time.monotonic()
    while True:
        last = check()
        if last:
            return last
        now = time.monotonic()
        gap = now - previous - interval_s
        if gap > STALL_S and paused < MAX_PAUSE_S:
            moved = min(gap, MAX_PAUSE_S - paused)
            paused += moved
            deadline += moved
        elif now >= deadline:
            suffix = f" (and {paused:.0f} s paused)" if paused else ""
            what = what() if callable(what) else what
            raise AssertionError(f"{what}: not true within {timeout_s:g} s{suffix}; "
                                 f"last seen: {last!r}")
        time.sleep(interval_s)
        previous = now
