"""Exponential backoff, written once: the ``n``-th wait (1-based; the wait before retry
``n``) is at most ``base_s × 2^(n-1)``, never above ``cap_s``, with one of three jitter
policies:

- ``full``: uniform in [0, ceiling) — the ambassador's retry filter;
- ``half``: 50-100 % of the ceiling — the engine's LLM and embedding calls
  (``flow_engine/components/openai_compat.py`` RetryPolicy);
- ``none``: the ceiling itself — the engine's polling and rewrite loops (Redis event
  batches, run records, idempotency waits, SQLite locks).

The random source is injectable (``uniform(lo, hi)``, like :func:`random.uniform`) so tests
never depend on chance, and nothing here sleeps."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Literal

Jitter = Literal["full", "half", "none"]
_MAX_EXPONENT = 1000  # 2**1000 is still a float: past it every ceiling is cap_s anyway


class Backoff:
    def __init__(self, base_s: float, cap_s: float, jitter: Jitter = "none", *,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        if jitter not in ("full", "half", "none"):
            raise ValueError(f"jitter must be full, half or none, got {jitter!r}")
        self.base_s, self.cap_s, self.jitter = base_s, cap_s, jitter
        self._uniform = uniform

    def ceiling(self, n: int) -> float:
        """The longest ``n``-th wait (1-based): ``base_s`` doubling, at most ``cap_s``."""
        return min(self.cap_s, self.base_s * 2 ** min(n - 1, _MAX_EXPONENT))

    def delay(self, n: int) -> float:
        """The ``n``-th wait (1-based), jittered as the policy says."""
        ceiling = self.ceiling(n)
        if self.jitter == "full":
            return self._uniform(0, ceiling)
        if self.jitter == "half":
            return ceiling * self._uniform(0.5, 1.0)
        return ceiling

    def delays(self) -> Iterator[float]:
        """The 1st, 2nd, 3rd, … wait (endless: the caller's deadline stops it)."""
        n = 1
        while True:
            yield self.delay(n)
            n += 1
