"""GC pauses are timed into the service's metrics, never from inside the collector."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import CollectorRegistry

from flow_engine.metrics import EngineMetrics
from flowgate.common import gc_pauses


class Recording:
    """A metric that records what was done to it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def labels(self, *values):
        self.calls.append(("labels", *values))
        return self

    def observe(self, value):
        self.calls.append(("observe", value))

    def set(self, value):
        self.calls.append(("set", value))


def make_garbage() -> None:
    for _ in range(1000):
        a: list = []
        a.append(a)  # a cycle: only the collector frees it


@pytest.fixture
def restore_timer():
    """The process-wide timer as a fresh worker has it (no longest pause yet: one seen by
    an earlier test would hide this test's pauses from the longest-pause gauge), restored
    after."""
    before, longest = gc_pauses._TIMER.metrics, gc_pauses._TIMER.longest
    gc_pauses._TIMER.longest = 0.0
    yield
    gc_pauses._TIMER.metrics, gc_pauses._TIMER.longest = before, max(
        longest, gc_pauses._TIMER.longest)


def test_a_collection_touches_no_metric_until_drained(restore_timer):
    histogram, longest = Recording(), Recording()
    gc_pauses.watch(histogram, longest)
    histogram.calls.clear(), longest.calls.clear()
    make_garbage()
    gc.collect()
    # inside the collection a metric's lock may already be held by the code that allocated:
    # touching the metric there deadlocks a gevent worker (seen: LoopExit in the ambassador)
    assert histogram.calls == [] and longest.calls == []

    gc_pauses.drain()

    assert ("labels", "2") in histogram.calls
    observed = [c[1] for c in histogram.calls if c[0] == "observe"]
    assert observed and all(p >= 0 for p in observed)
    assert longest.calls and longest.calls[-1][1] == max([*observed, gc_pauses._TIMER.longest])


def test_the_services_export_their_pauses(restore_timer):
    metrics = EngineMetrics(CollectorRegistry())
    make_garbage()
    gc.collect()
    text = metrics.render()[0].decode()
    full = [line for line in text.splitlines()
            if line.startswith('flowgate_engine_gc_pause_seconds_count{generation="2"}')]
    assert full and float(full[0].rsplit(" ", 1)[1]) >= 1
    longest = [line for line in text.splitlines()
               if line.startswith("flowgate_engine_gc_pause_max_seconds ")]
    assert float(longest[0].rsplit(" ", 1)[1]) > 0


def test_every_generations_series_exists_before_its_first_collection(restore_timer):
    """A series born mid-run (the first full collection) would look like a label an attacker
    added (tests/flow_engine/api/security/test_hostile_input_attack.py), and Prometheus
    never sees its first increase: all three exist from the start."""
    metrics = EngineMetrics(CollectorRegistry())
    text = metrics.render()[0].decode()
    for generation in range(3):
        assert f'flowgate_engine_gc_pause_seconds_count{{generation="{generation}"}}' in text
