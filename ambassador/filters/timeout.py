"""Deadlines: the request's total deadline (set on the first attempt, kept across retries)
and each attempt's per-try limit, which is the smaller of ``per_try_s`` and what is left of
the total. A request whose deadline has passed is answered 504 without another attempt.
Streams use the first-byte and idle limits in upstream.py instead of a total."""

from __future__ import annotations

import time
from collections.abc import Callable

from ambassador.chain import Handler, Request, Response, error_response
from ambassador.config import Timeouts


class Timeout:
    name = "timeout"

    def __init__(self, settings: Timeouts, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self._clock = clock

    def __call__(self, request: Request, next: Handler) -> Response:
        now = self._clock()
        deadline = request.ctx.setdefault("deadline", now + self.s.total_s)
        remaining = deadline - now
        if remaining <= 0:
            return error_response(504, "timeout",
                                  f"no answer within the {self.s.total_s:g} s deadline", request)
        request.ctx["per_try_s"] = min(self.s.per_try_s, remaining)
        return next(request)
