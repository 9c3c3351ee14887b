"""The shared window of run outcomes (flow_engine/rollouts/outcomes.py) on its real
backends: Redis, and the store (SQLite and PostgreSQL). Two recorders stand for two engine
processes; what each records is read back summed by either."""

from __future__ import annotations

import uuid

import pytest
import redis

from flow_engine.rollouts.analysis import BUCKETS, bucket_of
from flow_engine.rollouts.outcomes import (
    KEEP_S,
    PREFIX,
    SLOT_S,
    OutcomeRecorder,
    RedisWindow,
    StoreWindow,
    counts_failure,
    slot_of,
)
from flow_engine.store import SqlFlowStore


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["redis", "sqlite", "postgres"])
def window(request, tmp_path):
    if request.param == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
        yield RedisWindow(client)
        client.close()
        return
    url = (f"sqlite:///{tmp_path / 'o.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    store = SqlFlowStore(url)
    store.migrate()
    yield StoreWindow(store)
    store.close()


@pytest.fixture
def flow_id() -> str:
    return f"f-{uuid.uuid4().hex[:12]}"  # Redis is shared by every test: keys of our own


def test_two_processes_add_up_in_the_window(window, flow_id):
    clock = Clock()
    a, b = OutcomeRecorder(window, clock=clock), OutcomeRecorder(window, clock=clock)
    for _ in range(3):
        a.record(flow_id, 1, False, 0.2)
    b.record(flow_id, 1, True, 3.0)
    b.record(flow_id, 2, False, 0.2)  # another version
    clock.t += SLOT_S  # a later slot
    a.record(flow_id, 1, True, 0.01)
    b.flush()

    seen = a.window(flow_id, 1, clock.t - 60, clock.t)  # flushes a's own counts first
    assert (seen.ok, seen.failed) == (3, 2)
    expected = [0] * len(BUCKETS)
    for seconds in (0.2, 0.2, 0.2, 3.0, 0.01):
        expected[bucket_of(seconds)] += 1
    assert seen.histogram == expected
    assert b.window(flow_id, 2, clock.t - 60, clock.t).runs == 1
    # a window that starts after the first slot leaves it out
    later = a.window(flow_id, 1, clock.t, clock.t)
    assert (later.ok, later.failed) == (0, 1)


def test_a_failed_flush_keeps_its_counts_for_the_next(flow_id, redis_url):
    dead = RedisWindow(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    errors = []
    clock = Clock()
    recorder = OutcomeRecorder(dead, clock=clock, on_error=lambda: errors.append(1))
    recorder.record(flow_id, 1, False, 0.1)
    recorder.record(flow_id, 1, True, 0.1)
    assert recorder.flush() is False
    assert errors == [1]
    recorder.record(flow_id, 1, False, 0.1)

    recorder.shared = RedisWindow(redis.Redis.from_url(redis_url))  # Redis is back
    assert recorder.flush() is True
    seen = recorder.window(flow_id, 1, clock.t - 10, clock.t)
    assert (seen.ok, seen.failed) == (2, 1)


def test_counts_kept_through_an_outage_are_bounded_by_age(flow_id):
    dead = RedisWindow(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    clock = Clock()
    recorder = OutcomeRecorder(dead, clock=clock)
    recorder.record(flow_id, 1, False, 0.1)
    clock.t += KEEP_S + SLOT_S  # an outage longer than any window could read
    recorder.record(flow_id, 1, False, 0.1)
    recorder.flush()
    assert list(recorder._pending) == [(flow_id, 1, slot_of(clock.t))]


def test_redis_keys_expire_after_the_longest_window(flow_id, redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    recorder = OutcomeRecorder(RedisWindow(client))
    recorder.record(flow_id, 3, False, 0.1)
    recorder.flush()
    [key] = client.keys(f"{PREFIX}{flow_id}:3:*")
    assert 0 < client.ttl(key) <= KEEP_S
    client.delete(key)


@pytest.mark.parametrize(("status", "error", "counted"), [
    ("succeeded", None, False),
    ("failed", {"status": 502, "code": "llm_error"}, True),
    ("failed", {"status": 504, "code": "run_timeout"}, True),
    ("failed", {"status": 500, "code": "internal"}, True),
    ("failed", None, True),
    ("failed", {"status": 400, "code": "bad_request"}, None),
    ("failed", {"status": 429, "code": "tenant_limit"}, None),
    ("cancelled", {"status": 499, "code": "run_cancelled"}, None),
])
def test_what_counts_as_a_failure(status, error, counted):
    assert counts_failure(status, error) is counted


def test_recording_stays_in_the_process_until_a_flush(flow_id):
    """A run's end never waits on the network: records pile up here, one flush sends them
    (bench/hot_update.py measures the cost per record)."""
    dead = RedisWindow(redis.Redis(host="127.0.0.1", port=1))
    recorder = OutcomeRecorder(dead)
    calls = []
    dead.add = lambda batch: calls.append(batch)  # type: ignore[method-assign]
    for _ in range(1000):
        recorder.record(flow_id, 1, False, 0.1)
    assert calls == []  # nothing left the process until a flush
    recorder.flush()
    assert len(calls) == 1 and sum(o.runs for o in calls[0].values()) == 1000
