"""Work a process must finish before it exits — flush what is still queued (run records,
run events, outcomes) — registered without keeping its owner alive.

``atexit.register(obj.flush)`` would hold ``obj`` (and the whole app behind it) until the
process ends: a process that builds and drops apps, as the test suite does, would keep
every one in memory and flush each at exit against stores long gone. Here each call is a
weak reference: an owner that was dropped is neither kept nor called. Calls run newest
first, like atexit's; one that fails is logged and the others still run.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)
_calls: list[weakref.WeakMethod] = []


def flush_at_exit(method: Callable[[], object]) -> None:
    """Call the bound ``method`` when the process exits, if its object still lives."""
    _calls[:] = [ref for ref in _calls if ref() is not None]
    _calls.append(weakref.WeakMethod(method))


@atexit.register
def _run() -> None:
    for ref in reversed(_calls):
        method = ref()
        if method is None:
            continue
        try:
            method()
        except Exception:
            log.exception("flushing at exit failed")
