"""Retries that never replay work the engine may have started.

A failed attempt is retried only when

- the request certainly was not processed: no connection was made (``connect_error``), or
  the engine shed it (503 with ``Retry-After``); or
- the request carries an ``Idempotency-Key`` — which this filter adds to every run request
  by default — and the attempt timed out or its connection broke: the engine then answers
  the retry with the first attempt's run instead of starting another (same key, one run).

Nothing is retried once a streamed response has started (this filter only ever sees a
stream before its first byte reaches the client). Backoff is exponential with full jitter,
at least the engine's ``Retry-After``, and never past the request's deadline. A retry
budget (Linkerd-style) caps retries at ``budget_ratio`` of the requests of the last
``budget_window_s`` plus a floor of ``budget_min_per_s``, so an outage cannot multiply the
load on the engine. ``X-Upstream-Attempts`` tells the caller how many attempts were made.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from ambassador.chain import Handler, Request, Response, note
from ambassador.config import Retry as RetrySettings
from flowgate.common.backoff import Backoff


class RetryBudget:
    """Retries allowed ≤ ratio × requests + min_per_s × window, over a sliding window."""

    def __init__(self, ratio: float, min_per_s: float, window_s: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio, self.min_per_s, self.window_s = ratio, min_per_s, window_s
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._lock = threading.Lock()

    def _trim(self, now: float) -> None:
        for q in (self._requests, self._retries):
            while q and now - q[0] > self.window_s:
                q.popleft()

    def record_request(self) -> None:
        with self._lock:
            now = self._clock()
            self._requests.append(now)
            self._trim(now)

    def try_spend(self) -> bool:
        with self._lock:
            now = self._clock()
            self._trim(now)
            allowed = self.ratio * len(self._requests) + self.min_per_s * self.window_s
            if len(self._retries) + 1 > allowed:
                return False
            self._retries.append(now)
            return True


def retry_reason(response: Response, has_key: bool) -> str | None:
    """Why this failed attempt may be retried, or None when it must not be."""
    kind = response.meta.get("upstream_error")
    if kind == "connect_error":
        return "connect_error"
    if response.status == 503 and "Retry-After" in response.headers and kind is None \
            and not response.meta.get("breaker_open"):
        return "unavailable"
    if has_key and kind in ("timeout", "reset"):
        return "timeout" if kind == "timeout" else "upstream_error"
    return None


class Retry:
    name = "retry"

    def __init__(self, settings: RetrySettings, budget: RetryBudget, *,
                 on_retry: Callable[[str], None] | None = None,
                 on_budget_exhausted: Callable[[], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[float, float], float] = random.uniform) -> None:
        self.s = settings
        self.budget = budget
        self._on_retry = on_retry or (lambda reason: None)
        self._on_exhausted = on_budget_exhausted or (lambda: None)
        self._sleep, self._clock = sleep, clock
        self._backoff = Backoff(settings.backoff_base_s, settings.backoff_max_s, "full",
                                uniform=rand)

    def __call__(self, request: Request, next: Handler) -> Response:
        if self.s.add_idempotency_key and request.method == "POST" \
                and request.header("idempotency-key") is None:
            request.headers["idempotency-key"] = f"amb-{uuid.uuid4().hex}"
        has_key = request.header("idempotency-key") is not None
        self.budget.record_request()
        attempt = 1
        while True:
            request.ctx["attempt"] = attempt
            response = next(request)
            reason = None if response.streamed else retry_reason(response, has_key)
            if reason is None or attempt >= self.s.max_attempts:
                break
            delay = self._delay(attempt, response)
            deadline = request.ctx.get("deadline")
            if deadline is not None and self._clock() + delay >= deadline:
                note(request, "retry_skipped", **{"flowgate.retry.reason": reason,
                                                  "flowgate.retry.why": "deadline"})
                break
            if not self.budget.try_spend():
                self._on_exhausted()
                note(request, "retry_skipped", **{"flowgate.retry.reason": reason,
                                                  "flowgate.retry.why": "budget_exhausted"})
                break
            self._on_retry(reason)
            note(request, "retry", **{"flowgate.retry.reason": reason,
                                      "flowgate.retry.attempt": attempt + 1,
                                      "flowgate.retry.delay_s": round(delay, 6)})
            self._sleep(delay)
            attempt += 1
        response.headers["X-Upstream-Attempts"] = str(attempt)
        response.meta["attempts"] = attempt
        return response

    def _delay(self, attempt: int, response: Response) -> float:
        delay = self._backoff.delay(attempt)
        # only the engine's own Retry-After counts, not the one on a synthesized error
        retry_after = None if "upstream_error" in response.meta else response.headers.get("Retry-After")
        if retry_after and retry_after.isascii() and retry_after.replace(".", "", 1).isdigit():
            delay = max(delay, min(float(retry_after), self.s.backoff_max_s))
        return delay
