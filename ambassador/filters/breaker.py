"""Circuit breaker in front of the engine.

    closed ──(N consecutive failures, or failure ratio ≥ r over window with ≥ min requests)──▶ open
    open ──(open_s elapsed)──▶ half_open: up to half_open_max real trial requests at once
    half_open ──(a trial succeeds)──▶ closed        half_open ──(a trial fails)──▶ open

While open, requests are answered at once with 503 ``circuit_open`` and ``Retry-After``
(the seconds until the next trial), so an engine outage costs callers microseconds, not
timeouts. A failure is a transport error (unreachable, timeout, broken connection) or an
engine status 500/503/504; 4xx answers and 502 (a flow or its LLM failed, the engine itself
is fine) are not. What the engine never saw counts neither way — a 4xx the ambassador
answered itself (a request that cannot be sent, a filter placed after this one) or an
exception on the ambassador's side — so no caller can open (or, half-open, close) the
circuit for everyone with bad input; it only frees its half-open trial slot. The clock is
injected so tests never sleep.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from ambassador.chain import Handler, Request, Response, error_response
from ambassador.config import Breaker as BreakerSettings

FAILURE_STATUSES = frozenset({500, 503, 504})


def is_failure(response: Response) -> bool:
    return "upstream_error" in response.meta or response.status in FAILURE_STATUSES


def is_local(response: Response) -> bool:
    """A 4xx of the ambassador's own: the engine did not answer it (upstream.py marks
    what the engine answered with ``meta["engine_answered"]``)."""
    return 400 <= response.status < 500 and not response.meta.get("engine_answered")


class CircuitBreaker:
    """The state machine; thread-safe, clock injected, listeners for metrics."""

    def __init__(self, settings: BreakerSettings, *, clock: Callable[[], float] = time.monotonic,
                 on_transition: Callable[[str, str], None] | None = None) -> None:
        self.s = settings
        self._clock = clock
        self._on_transition = on_transition or (lambda old, new: None)
        self._lock = threading.Lock()
        self.state = "closed"
        self._consecutive = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, failed) within window
        self._failures = 0  # failed outcomes in _outcomes, kept as they come and go (O(1))
        self._opened_at = 0.0
        self._trials = 0

    def _set(self, state: str) -> None:
        if state != self.state:
            old, self.state = self.state, state
            self._on_transition(old, state)

    def allow(self) -> bool:
        """May a request go upstream now? (In half-open, this takes a trial slot.)"""
        with self._lock:
            if self.state == "open":
                if self._clock() - self._opened_at < self.s.open_s:
                    return False
                self._set("half_open")
                self._trials = 0
            if self.state == "half_open":
                if self._trials >= self.s.half_open_max:
                    return False
                self._trials += 1
            return True

    def retry_after(self) -> int:
        with self._lock:
            remaining = self.s.open_s - (self._clock() - self._opened_at)
        return max(1, math.ceil(remaining))

    def record(self, failed: bool) -> None:
        with self._lock:
            now = self._clock()
            if self.state == "half_open":
                self._trials = max(0, self._trials - 1)
                if failed:
                    self._open(now)
                else:
                    self._set("closed")
                    self._consecutive = 0
                    self._outcomes.clear()
                    self._failures = 0
                return
            if self.state == "open":
                return
            outcomes = self._outcomes
            outcomes.append((now, failed))
            self._failures += failed
            while now - outcomes[0][0] > self.s.window_s:
                self._failures -= outcomes.popleft()[1]
            self._consecutive = self._consecutive + 1 if failed else 0
            total, failures = len(outcomes), self._failures
            if self._consecutive >= self.s.consecutive_failures or (
                    total >= self.s.min_requests and failures / total >= self.s.failure_ratio):
                self._open(now)

    def release(self) -> None:
        """A request that took a slot in ``allow`` ended without an engine outcome."""
        with self._lock:
            if self.state == "half_open":
                self._trials = max(0, self._trials - 1)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._consecutive = 0
        self._outcomes.clear()
        self._failures = 0
        self._set("open")


class Breaker:
    name = "breaker"

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def __call__(self, request: Request, next: Handler) -> Response:
        if not self.breaker.allow():
            response = error_response(
                503, "circuit_open", "the flow engine is failing; not calling it for a moment",
                request, headers={"Retry-After": str(self.breaker.retry_after())})
            response.meta["breaker_open"] = True
            return response
        try:
            response = next(request)
        except BaseException:
            self.breaker.release()  # the ambassador's own error, not the engine's
            raise
        if is_local(response):
            self.breaker.release()
        else:
            self.breaker.record(is_failure(response))
        return response
