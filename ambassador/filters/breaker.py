"""Circuit breaker in front of the engine.

    closed ──(N consecutive failures, or failure ratio ≥ r over window with ≥ min requests)──▶ open
    open ──(backoff elapsed, and the engine's GET /readyz answers 200)──▶ half_open:
           up to half_open_max real trial requests at once
    half_open ──(a trial succeeds)──▶ closed        half_open ──(a trial fails)──▶ open

While open, requests are answered at once with 503 ``circuit_open`` and ``Retry-After``
(the seconds until the next trial may go), so an engine outage costs callers microseconds,
not timeouts. A failure is a transport error (unreachable, timeout, broken connection) or an
engine status 500/503/504; 4xx answers, 502 (a flow or its LLM failed, the engine itself
is fine) and any answer about a run (``X-Run-ID``: that run's outcome) are not. What the
engine never saw counts neither way — a 4xx the ambassador answered itself (a request that
cannot be sent, a filter placed after this one) or an exception on the ambassador's side —
so no caller can open (or, half-open, close) the
circuit for everyone with bad input; it only frees its half-open trial slot.

When trials go. A trial sent to an engine that is still booting fails and, with a fixed
``open_s``, kept the circuit open for a whole ``open_s`` more: the first success came 10 s
after the engine was back, 7.6 s after it was ready. So:

- the wait before a trial is ``backoff_base_s`` after opening, doubling with each failed
  trial up to ``open_s`` (and back to the base once the circuit closes);
- once the wait is over, the next request first asks the engine's readiness
  (``breaker.readiness_path``, ``GET /readyz``: cheap, it runs no flow) and becomes the
  trial only if the engine answers 200 (or has no such path: 404/405/501); otherwise it is
  answered 503 and readiness is asked again ``probe_interval_s`` later. Only one request
  asks at a time; the others are answered 503 meanwhile.

Recovery then follows the engine's readiness within ``probe_interval_s`` (given traffic),
and an engine that is ready but failing gets trials ever less often, at most one per
``open_s``. The clock and the readiness probe are injected so tests never sleep.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from ambassador.chain import Handler, Request, Response, error_response, note
from ambassador.config import Breaker as BreakerSettings
from flowgate.common.backoff import Backoff

FAILURE_STATUSES = frozenset({500, 503, 504})


def is_failure(response: Response) -> bool:
    """Does this answer say the engine is unwell? An engine answer that names a run
    (``X-Run-ID``) is that run's outcome — an LLM timeout (504 ``run_timeout``), a replayed
    error of an earlier run — which says nothing about the engine's health and is the
    caller's own doing as often as not: counting it would let one caller open the circuit
    for everyone (five requests with a tweak that makes the LLM time out)."""
    if "upstream_error" in response.meta:
        return True
    if response.meta.get("engine_answered") and "X-Run-ID" in response.headers:
        return False
    return response.status in FAILURE_STATUSES


def is_local(response: Response) -> bool:
    """A 4xx of the ambassador's own: the engine did not answer it (upstream.py marks
    what the engine answered with ``meta["engine_answered"]``)."""
    return 400 <= response.status < 500 and not response.meta.get("engine_answered")


class CircuitBreaker:
    """The state machine; thread-safe, clock and readiness ``probe`` injected, listeners
    for metrics (``on_transition(old, new)``, ``on_probe(ready)``)."""

    def __init__(self, settings: BreakerSettings, *, clock: Callable[[], float] = time.monotonic,
                 probe: Callable[[], bool] | None = None,
                 on_transition: Callable[[str, str], None] | None = None,
                 on_probe: Callable[[bool], None] | None = None) -> None:
        self.s = settings
        self._clock = clock
        self._probe = probe
        self._on_transition = on_transition or (lambda old, new: None)
        self._on_probe = on_probe or (lambda ready: None)
        self._lock = threading.Lock()
        self.state = "closed"
        self._consecutive = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, failed) within window
        self._failures = 0  # failed outcomes in _outcomes, kept as they come and go (O(1))
        self._failed_trials = 0  # since the circuit last closed: the backoff's exponent
        self._next_trial_at = 0.0  # while open: no trial (nor probe) before this
        self._next_probe_at = 0.0  # while open: no readiness probe before this
        self._probing = False
        self._trials = 0

    def reconfigure(self, settings: BreakerSettings,
                    probe: Callable[[], bool] | None = None) -> None:
        """New thresholds from a config reload, the state kept: an open circuit stays open
        (the next trial still waits out the backoff it was given), a closed one keeps its
        window of outcomes and judges it by the new thresholds from the next outcome on."""
        with self._lock:
            self.s, self._probe = settings, probe

    def _set(self, state: str) -> None:
        if state != self.state:
            old, self.state = self.state, state
            self._on_transition(old, state)

    def allow(self) -> bool:
        """May a request go upstream now? (In half-open, this takes a trial slot; when a
        trial is due, the caller first asks the engine's readiness.)"""
        with self._lock:
            if self.state == "closed":
                return True
            if self.state == "open":
                now = self._clock()
                if now < self._next_trial_at or (self._probe is not None and (
                        self._probing or now < self._next_probe_at)):
                    return False
                if self._probe is None:
                    self._half_open()
                else:
                    self._probing = True  # this request asks; the others get 503 meanwhile
            if self.state == "half_open":
                if self._trials >= self.s.half_open_max:
                    return False
                self._trials += 1
                return True
        return self._ask_readiness()

    def _ask_readiness(self) -> bool:
        """The probe, outside the lock (it waits on the network): ready → this request is
        the first trial; not ready → readiness is asked again after probe_interval_s."""
        ready = False
        try:
            ready = bool(self._probe())  # type: ignore[misc]
        except Exception:
            ready = False
        finally:  # whatever happened, the next request may ask again
            with self._lock:
                self._probing = False
                trial = ready and self.state == "open"  # only the prober leaves open
                if trial:
                    self._half_open()
                    self._trials = 1
                elif self.state == "open":
                    self._next_probe_at = self._clock() + self.s.probe_interval_s
        self._on_probe(ready)
        return trial

    def _half_open(self) -> None:
        self._set("half_open")
        self._trials = 0

    def retry_after(self) -> int:
        """Whole seconds until a trial may go (at least 1)."""
        with self._lock:
            at = max(self._next_trial_at, self._next_probe_at) if self._probe else self._next_trial_at
            remaining = at - self._clock() if self.state == "open" else 0.0
        return max(1, math.ceil(remaining))

    def record(self, failed: bool) -> None:
        with self._lock:
            now = self._clock()
            if self.state == "half_open":
                self._trials = max(0, self._trials - 1)
                if failed:
                    self._failed_trials += 1
                    self._open(now)
                else:
                    self._set("closed")
                    self._consecutive = 0
                    self._outcomes.clear()
                    self._failures = 0
                    self._failed_trials = 0
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
                self._failed_trials = 0
                self._open(now)

    def release(self) -> None:
        """A request that took a slot in ``allow`` ended without an engine outcome."""
        with self._lock:
            if self.state == "half_open":
                self._trials = max(0, self._trials - 1)

    def _open(self, now: float) -> None:
        # the first wait after opening, then doubling after each failed trial (no jitter)
        wait = Backoff(self.s.backoff_base_s, self.s.open_s).delay(self._failed_trials + 1)
        self._next_trial_at = self._next_probe_at = now + wait
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
            note(request, "breaker_rejected", **{"flowgate.breaker.state": self.breaker.state})
            response = error_response(
                503, "circuit_open", "the flow engine is failing; not calling it for a moment",
                request, headers={"Retry-After": str(self.breaker.retry_after())})
            response.meta["breaker_open"] = True
            return response
        if self.breaker.state == "half_open":
            note(request, "breaker_trial")
        try:
            response = next(request)
        except BaseException:
            self.breaker.release()  # the ambassador's own error, not the engine's
            raise
        if is_local(response) or response.meta.get("fault_source") == "header":
            # the ambassador's own answer, or a fault one caller injected for itself
            # (ambassador/filters/fault.py): says nothing of the engine's health
            self.breaker.release()
        else:
            self.breaker.record(is_failure(response))
        return response
