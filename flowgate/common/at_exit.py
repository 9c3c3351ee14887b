"""Work a process must finish before it exits — flush what is still queued (run records,
run events, outcomes) — registered without keeping its owner alive.

``atexit.register(obj.flush)`` would hold ``obj`` (and the whole app behind it) until the
process ends: a process that builds and drops apps, as the test suite does, would keep
every one in memory and flush each at exit against stores long gone. Here each call is a
weak reference: an owner that was dropped is neither kept nor called. Calls run newest
first, like atexit's; one that fails is logged and the others still run. Owners dropped but
still held in a reference cycle are collected first, so they are not flushed either; and a
log line whose stream is already closed at exit is dropped, not printed as a traceback.
"""

from __future__ import annotations

import atexit
import gc
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
    if not any(ref() is not None for ref in _calls):
        return
    gc.collect()  # owners dropped inside a reference cycle are not called
    logging.raiseExceptions = False  # a handler whose stream is closed drops the line
    for ref in reversed(_calls):
        method = ref()
        if method is None:
            continue
        try:
            method()
        except Exception:
            log.exception("flushing at exit failed")
