"""Garbage-collection pauses, measured: how long each collection stopped the process.

A gevent worker serves every connection from one thread, so a full collection of a few
hundred thousand tracked objects (150–200 ms, seen under load) is a pause of every request
and stream in that worker. ``gc.callbacks`` brackets each collection; the pause goes to a
histogram by generation and to a longest-pause gauge (each service's
``flowgate_<service>_gc_pause_seconds`` and ``..._gc_pause_max_seconds``).

One timer per process: the newest ``watch()`` call's metrics receive the figures (an app
built twice in one process, as tests do, does not time each collection twice).

``freeze()`` is for a worker that has finished starting: it moves every object alive then
(modules, compiled flows, settings) into the collector's permanent generation, so full
collections stop walking what never becomes garbage (CPython's ``gc.freeze``).
"""

from __future__ import annotations

import gc
import time
from collections import deque
from typing import Any

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)


class _Timer:
    """The ``gc.callbacks`` entry. A collection starts at any allocation — also inside a
    metric's own locked update — so the callback takes no lock and touches no metric: it
    only appends to a deque (atomic), and ``drain`` moves the pauses into the metrics
    from a safe place (after each request, and before each scrape)."""

    def __init__(self) -> None:
        self.metrics: tuple[Any, Any] | None = None
        self.started = 0.0
        self.longest = 0.0
        self.pauses: deque[tuple[int, float]] = deque(maxlen=10_000)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started:
            self.pauses.append((info.get("generation", -1), time.perf_counter() - self.started))

    def drain(self) -> None:
        if self.metrics is None:
            self.pauses.clear()
            return
        histogram, longest = self.metrics
        while True:
            try:  # another thread or greenlet may be draining too
                generation, pause = self.pauses.popleft()
            except IndexError:
                return
            histogram.labels(str(generation)).observe(pause)
            if pause > self.longest:
                self.longest = pause
                longest.set(pause)


_TIMER = _Timer()


def watch(histogram: Any, longest: Any) -> None:
    """Time every collection of this process into ``histogram`` (labelled by generation)
    and ``longest`` (a gauge): the service's own metrics (flow_engine/metrics.py,
    ambassador/metrics.py)."""
    longest.set(_TIMER.longest)
    for generation in range(3):  # every series from the start, not at its first collection
        histogram.labels(str(generation))
    _TIMER.metrics = (histogram, longest)
    if _TIMER not in gc.callbacks:
        gc.callbacks.append(_TIMER)


def drain() -> None:
    """Move the pauses timed since the last call into the metrics (cheap when none)."""
    if _TIMER.pauses:
        _TIMER.drain()


def freeze() -> None:
    """Everything alive now is never garbage: keep full collections off it. The collection
    that clears start-up's garbage first stops nobody (nothing is served yet): not timed."""
    timed = _TIMER in gc.callbacks
    if timed:
        gc.callbacks.remove(_TIMER)
    try:
        gc.collect()
    finally:
        if timed:
            gc.callbacks.append(_TIMER)
    gc.freeze()
