"""The ambassador's stateful parts, kept across config reloads.

A reload rebuilds policy — which filters run, with which settings — but what the process
has learned lives here and outlives it: the circuit breaker's state, the retry budget's
window, the rate-limit buckets, the response cache and the engine connection pool. Each
part is held under the settings that shape it (:meth:`Parts.get`): a reload whose
settings for a part are unchanged gets the same object back, and one that changed them
gets a new one (the old one is closed once nothing new uses it). A part whose settings
are only thresholds, like the breaker's, is kept and told the new ones instead
(``adjust``), so an edit to them applies without forgetting that the engine is down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class Parts:
    def __init__(self) -> None:
        self._held: dict[str, tuple[Hashable, Any]] = {}
        self._lock = threading.Lock()

    def get(self, kind: str, key: Hashable, build: Callable[[], T], *,
            adjust: Callable[[T], None] | None = None,
            close: Callable[[T], None] | None = None) -> T:
        """The ``kind`` part built for ``key``: the one held if its key is ``key``; else,
        with ``adjust``, the one held, adjusted to ``key``'s settings; else a new one from
        ``build`` (``close`` is then called on the one it replaces)."""
        with self._lock:
            held = self._held.get(kind)
            if held is not None and held[0] == key:
                return held[1]
            if held is not None and adjust is not None:
                adjust(held[1])
                self._held[kind] = (key, held[1])
                return held[1]
            part = build()
            self._held[kind] = (key, part)
        if held is not None and close is not None:
            close(held[1])
        return part


def key_of(*settings: Any) -> tuple:
    """A hashable key for pydantic models and plain values (models by their content)."""
    return tuple(s.model_dump_json() if hasattr(s, "model_dump_json") else s for s in settings)
