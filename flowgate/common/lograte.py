"""Log a repeating failure once per interval, not once per occurrence.

When a dependency (Redis, the database) is down, every request and every background write
fails the same way: logging each one buried the logs (about 2,900 warnings in 15 s with
Redis down) and cost CPU exactly when the process was struggling. The first occurrence is
logged at once; later ones are counted and summed up in the next line, at most one line per
interval. Metrics still count every occurrence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class Throttled:
    """``warning(msg, *args)`` logs at most once per ``interval_s`` (see the module docstring)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0
        self._skipped = 0

    def warning(self, msg: str, *args: object) -> bool:
        """Log now or count it for later; True when a line was written."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._skipped += 1
                return False
            skipped, self._skipped = self._skipped, 0
            self._next = now + self.interval_s
        if skipped:
            msg += f" ({skipped} more like this in the last {self.interval_s:g} s)"
        self.logger.warning(msg, *args)
        return True

    def reset(self) -> None:
        """The failure is over: the next one is logged at once."""
        with self._lock:
            self._next, self._skipped = 0.0, 0
