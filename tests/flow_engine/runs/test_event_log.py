"""The run event log (flow_engine/runs/events.py): the in-memory log, the Redis Streams
mirror and the two combined, against the protocol in the module's docstring.

The Redis cases use the real server at ``FLOWGATE_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) under a key prefix of their own that is deleted afterwards.
When Redis is unreachable they skip, except under CI, where they fail (tests/support/needs.py;
the session fixture ``redis_url`` of tests/conftest.py).
"""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from flow_engine.runs.events import (
    EventLogUnavailable,
    MemoryEventLog,
    RedisEventLog,
    RunEventLog,
)
from flow_engine.runs.runner import RunEvent

WAIT_S = 5.0  # every blocking read and poll here gives up after this long
# A read that must return "at once" or "when woken" waits up to LONG_S and must be back well
# before it: no test depends on how fast this machine is, only on not waiting for a timeout.
LONG_S = 60.0


def run_events(run_id: str = "r1", tokens: int = 3, *, finished: bool = True) -> list[RunEvent]:
    """A realistic run: run_started, one node with ``tokens`` tokens, run_finished."""
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("run_started", {"run_id": run_id, "flow_id": "f", "version": 1, "session_id": None}),
        ("node_started", {"node": "llm", "type": "ChatModel"})]
    kinds += [("token", {"node": "llm", "index": i, "text": f" w{i}"}) for i in range(tokens)]
    kinds.append(("node_finished", {"node": "llm", "type": "ChatModel",
                                    "output": "".join(f" w{i}" for i in range(tokens)),
                                    "duration_ms": 1.5}))
    if finished:
        kinds.append(("run_finished", {"run_id": run_id, "output": "done", "usage": {"llm_calls": 1}}))
    return [RunEvent(seq, kind, data) for seq, (kind, data) in enumerate(kinds, start=1)]


class FakeClock:
    """The clock MemoryEventLog reads finish times from; tests move it by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``fn`` in a daemon thread; the dict gets its ``result`` (or ``error``) and the
    ``seconds`` it took."""
    out: dict[str, Any] = {}

    def target() -> None:
        started = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc
        out["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def dead_client() -> redis.Redis:
    """A client, configured like the engine's (``from_url``), for a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5,
                                socket_timeout=0.5)


# -- MemoryEventLog -------------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 1, 3, 5, 6, 7])
def test_memory_read_returns_exactly_the_events_after_k_in_order(after):
    log = MemoryEventLog()
    events = run_events(tokens=3)  # 7 events
    for event in events:
        log.append("r1", event)

    got = log.read("r1", after, timeout_s=0)

    assert got == [e for e in events if e.seq > after]


def test_memory_read_of_an_unknown_run_is_none_at_once():
    log = MemoryEventLog()
    log.append("other", run_events("other")[0])

    started = time.monotonic()
    assert log.read("nope", 0, timeout_s=LONG_S) is None
    assert time.monotonic() - started < LONG_S / 2
    assert not log.knows("nope")
    assert log.knows("other")


def test_memory_blocking_read_wakes_when_another_thread_appends():
    log = MemoryEventLog()
    first, second = run_events(finished=False)[:2]
    log.append("r1", first)
    thread, out = in_thread(lambda: log.read("r1", 1, timeout_s=LONG_S))
    time.sleep(0.15)
    assert thread.is_alive(), "the read must wait for an event after seq 1"

    log.append("r1", second)
    thread.join(LONG_S)

    assert out["result"] == [second]
    assert out["seconds"] < LONG_S / 2, "woken by the append, not by its timeout"


def test_memory_blocking_read_returns_empty_after_the_timeout_when_nothing_comes():
    log = MemoryEventLog()
    log.append("r1", run_events(finished=False)[0])

    started = time.monotonic()
    got = log.read("r1", 1, timeout_s=0.2)

    assert got == []
    assert time.monotonic() - started >= 0.2  # (a timed wait cannot end early)


def test_memory_terminal_event_ends_waiting():
    log = MemoryEventLog()
    events = run_events(tokens=1)
    for event in events[:-1]:
        log.append("r1", event)
    waiting, out = in_thread(lambda: log.read("r1", events[-2].seq, timeout_s=LONG_S))

    log.append("r1", events[-1])  # run_finished
    waiting.join(LONG_S)
    assert out["result"] == [events[-1]]

    # a reader that already has the last event is not kept waiting for more
    started = time.monotonic()
    assert log.read("r1", events[-1].seq, timeout_s=LONG_S) == []
    assert time.monotonic() - started < LONG_S / 2


def test_memory_error_event_is_terminal_too():
    log = MemoryEventLog()
    log.append("r1", RunEvent(1, "run_started", {}))
    log.append("r1", RunEvent(2, "error", {"code": "run_failed", "message": "x", "node": None}))

    started = time.monotonic()
    assert log.read("r1", 2, timeout_s=LONG_S) == []
    assert time.monotonic() - started < LONG_S / 2


def test_memory_finished_runs_are_kept_whole_as_one_object_each_for_the_collector():
    """A finished run's events are packed: thousands of kept runs must not give every full
    garbage collection of the worker ~45 objects each to walk (issue: 35–75 ms pauses)."""
    with young_objects():
        log = MemoryEventLog()
        for i in range(300):
            for event in run_events(f"r{i}", tokens=5):
                log.append(f"r{i}", event)
    assert tracked_objects_of(list(log._runs.values()), most=10 * 300) <= 2 * 300
    assert log.read("r7", 0, timeout_s=0) == run_events("r7", tokens=5)
    assert log.read("r7", 4, timeout_s=0) == run_events("r7", tokens=5)[4:]
    assert log.finished("r7") and log.owner("r7") is None


@contextmanager
def young_objects() -> Iterator[None]:
    """What the block makes stays in the young generations (no collection runs meanwhile);
    after it, the collector has looked at it twice — which is when it leaves tuples of
    strings and ints out of its walks (a tuple of tuples once its members are). Young
    collections only: a full one in a test process holding every earlier test's leftovers
    can take minutes."""
    gc.disable()
    try:
        yield
    finally:
        gc.collect(0)
        gc.collect(1)
        gc.enable()


def tracked_objects_of(roots: list[Any], most: int = 10_000) -> int:
    """How many objects the garbage collector walks of what ``roots`` hold (a class leads to
    the whole program: not theirs); the walk stops past ``most``."""
    seen: set[int] = set()
    stack = list(roots)
    while stack and len(seen) <= most:
        obj = stack.pop()
        if id(obj) in seen or not gc.is_tracked(obj) or isinstance(obj, type):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


@pytest.mark.parametrize("data", [
    pytest.param({"output": "hello \ud800"}, id="lone-surrogate"),  # a client's input
    pytest.param({"output": 2 ** 70}, id="int-over-64-bits"),
    pytest.param({"output": {1: "a", "b": [1.5, None, "é"]}}, id="non-string-key"),
])
def test_memory_events_only_the_stdlib_can_encode_are_packed_and_read_back_as_it_reads(data):
    """orjson refuses these; the log then writes them with the stdlib's json, so the run is
    still packed (one object for the collector) and reads back as JSON gives it back."""
    with young_objects():
        log = MemoryEventLog()
        log.append("r1", RunEvent(1, "node_finished", data))
        log.append("r1", RunEvent(2, "run_finished", {"run_id": "r1"}))
    assert tracked_objects_of([log._runs["r1"]]) <= 2
    assert log.read("r1", 0, timeout_s=0)[0].data == json.loads(json.dumps(data))


def test_memory_a_run_whose_events_json_cannot_hold_still_ends():
    """Packing encodes each event; an event JSON cannot hold (a non-string key) must not
    cost the run its end: it stays as it was, readable and finished."""
    log = MemoryEventLog()
    odd = RunEvent(1, "node_finished", {"output": {("a", 1): "tuple key"}})
    log.append("r1", odd)
    log.append("r1", RunEvent(2, "run_finished", {"run_id": "r1"}))
    assert log.finished("r1")
    assert log.read("r1", 0, timeout_s=0) == [odd, RunEvent(2, "run_finished", {"run_id": "r1"})]


def test_memory_an_event_holding_itself_is_counted_once_and_the_run_still_ends():
    """Data JSON cannot hold because it contains itself: counting its bytes must not walk
    the cycle forever, and the run must still end, readable."""
    log = MemoryEventLog()
    loop: dict[str, Any] = {"text": "x" * 1000}
    loop["self"] = loop
    log.append("r1", RunEvent(1, "node_finished", {"output": loop}))
    log.append("r1", RunEvent(2, "run_finished", {"run_id": "r1"}))
    assert log.finished("r1")
    assert [e.seq for e in log.read("r1", 0, timeout_s=0)] == [1, 2]
    assert 1000 < log.bytes < 1300


def test_memory_counts_an_event_as_about_its_json_length():
    log = MemoryEventLog()
    log.append("r1", RunEvent(1, "token", {"text": "é" * 10_000}))  # 2 bytes each in UTF-8
    assert 20_000 <= log.bytes < 20_100


RSS_SCRIPT = textwrap.dedent("""
    import os
    from flow_engine.runs.events import MemoryEventLog
    from flow_engine.runs.runner import RunEvent

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    log = MemoryEventLog()
    log.append("warm-up", RunEvent(1, "token", {"node": "llm", "index": 0, "text": " w"}))
    log.append("warm-up", RunEvent(2, "run_finished", {"output": "w"}))
    before = rss_mb()
    for r in range(200):
        for t in range(50):
            log.append(f"run-{r}", RunEvent(t + 1, "token", {"node": "llm", "index": t,
                                                              "text": f" tok{t}"}))
        log.append(f"run-{r}", RunEvent(51, "run_finished", {"output": "x" * 300}))
    print(rss_mb() - before, log.bytes / 1e6)
""")


def test_memory_kept_events_cost_the_process_about_what_they_are_counted_as():
    """10,000 small events (counted as ~0.9 MB) must not cost the process tens of MB: the
    encoded events once pinned one encoder buffer each (46 MB)."""
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb, counted_mb = map(float, done.stdout.split())
    assert counted_mb > 0.5
    assert grown_mb < 10 * counted_mb, (grown_mb, counted_mb)


def test_memory_an_event_after_the_last_one_is_kept_too():
    log = MemoryEventLog()
    events = run_events(tokens=1)
    for event in events:
        log.append("r1", event)
    late = RunEvent(len(events) + 1, "note", {"text": "late"})
    log.append("r1", late)
    assert log.read("r1", 0, timeout_s=0) == [*events, late]


def test_memory_finished_runs_expire_after_ttl_with_an_injected_clock():
    clock = FakeClock()
    log = MemoryEventLog(ttl_s=60, clock=clock)
    for event in run_events("done"):
        log.append("done", event)
    for event in run_events("running", finished=False):
        log.append("running", event)

    clock.now += 59
    log.append("trigger-1", RunEvent(1, "run_started", {}))  # creating a run sweeps
    assert log.knows("done"), "kept for ttl_s"
    assert log.read("done", 0, 0) == run_events("done")

    clock.now += 2  # 61 s after run_finished
    log.append("trigger-2", RunEvent(1, "run_started", {}))
    assert log.read("done", 0, 0) is None
    assert not log.knows("done")
    assert log.knows("running"), "a run that has not finished never expires"
    assert log.read("running", 0, 0) == run_events("running", finished=False)


def test_memory_finished_run_is_forgotten_after_ttl_even_without_new_runs():
    clock = FakeClock()
    log = MemoryEventLog(ttl_s=60, clock=clock)
    for event in run_events("done"):
        log.append("done", event)

    clock.now += 61

    assert log.read("done", 0, 0) is None


def test_memory_max_runs_eviction_prefers_finished_runs():
    log = MemoryEventLog(max_runs=3, ttl_s=3600, clock=FakeClock())
    log.append("old-running", RunEvent(1, "run_started", {}))
    for event in run_events("finished"):
        log.append("finished", event)
    log.append("young-running", RunEvent(1, "run_started", {}))

    log.append("new", RunEvent(1, "run_started", {}))

    assert not log.knows("finished"), "a finished run goes first, even though it is younger"
    assert all(log.knows(r) for r in ("old-running", "young-running", "new"))

    log.append("newer", RunEvent(1, "run_started", {}))  # nothing finished: the oldest goes
    assert not log.knows("old-running")
    assert all(log.knows(r) for r in ("young-running", "new", "newer"))


def test_memory_concurrent_readers_each_see_every_event_once_in_order():
    log = MemoryEventLog()
    events = run_events("r1", tokens=300)
    log.append("r1", events[0])

    def follow() -> list[int]:
        seen, after = [], 0
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            got = log.read("r1", after, timeout_s=0.5)
            assert got is not None
            for event in got:
                seen.append(event.seq)
                after = event.seq
            if got and got[-1].type == "run_finished":
                return seen
        raise AssertionError(f"no run_finished within {WAIT_S}s (saw {len(seen)})")

    readers = [in_thread(follow) for _ in range(6)]
    for i, event in enumerate(events[1:]):
        log.append("r1", event)
        if i % 25 == 0:
            time.sleep(0.002)  # let readers catch up mid-run, so they read in many slices
    for thread, _ in readers:
        thread.join(WAIT_S + 1)

    expected = [e.seq for e in events]
    for _, out in readers:
        assert "error" not in out, out.get("error")
        assert out["result"] == expected


# -- RedisEventLog --------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"flowgate-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=[pytest.param(True, id="str"), pytest.param(False, id="bytes")])
def decode_responses(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def make_client(redis_url: str, prefix: str) -> Iterator[Callable[..., redis.Redis]]:
    """Redis clients on the test server; every key under this test's prefix is deleted after."""
    clients: list[redis.Redis] = []

    def make(decode: bool = True) -> redis.Redis:
        client = redis.Redis.from_url(redis_url, decode_responses=decode,
                                      socket_connect_timeout=2, socket_timeout=10)
        clients.append(client)
        return client

    yield make
    cleaner = make()
    keys = list(cleaner.scan_iter(match=prefix + "*", count=1000))
    if keys:
        cleaner.delete(*keys)
    for client in clients:
        client.close()


def redis_log(client: redis.Redis, prefix: str, **kw: Any) -> RedisEventLog:
    return RedisEventLog(client, prefix=prefix, **kw)


def test_redis_write_batch_then_read_round_trips_types_data_and_seq(make_client, prefix,
                                                                    decode_responses):
    log = redis_log(make_client(decode_responses), prefix)
    mine, other = run_events("r1", tokens=2), run_events("r2", tokens=1)
    mine[2] = RunEvent(3, "token", {"node": "llm", "index": 0, "text": " naïve — 日本 \"q\"\n"})
    # two runs interleaved in one pipelined batch
    batch = [("r1", e) for e in mine[:3]] + [("r2", e) for e in other] + [("r1", e) for e in mine[3:]]

    log.write_batch(batch)

    assert log.read("r1", 0, timeout_s=0) == mine
    assert log.read("r2", 0, timeout_s=0) == other
    assert log.key("r1") == f"{prefix}run:r1"
    raw_ids = [e[0] for e in make_client().xrange(log.key("r1"))]
    assert raw_ids == [f"{e.seq}-0" for e in mine]


@pytest.mark.parametrize("after", [1, 3, 5])
def test_redis_read_after_k_returns_the_rest(make_client, prefix, after):
    log = redis_log(make_client(), prefix)
    events = run_events(tokens=3)
    log.write_batch([("r1", e) for e in events])

    assert log.read("r1", after, timeout_s=0) == events[after:]


def test_redis_append_is_written_by_the_background_writer(make_client, prefix):
    log = redis_log(make_client(), prefix)
    events = run_events(tokens=5)
    for event in events:
        log.append("r1", event)

    log.flush(WAIT_S)

    assert wait_until(lambda: log.read("r1", 0, timeout_s=0) == events)


def test_redis_blocking_read_wakes_on_a_later_write(make_client, prefix):
    writer, reader = redis_log(make_client(), prefix), redis_log(make_client(), prefix)
    events = run_events(tokens=1)
    writer.write_batch([("r1", events[0])])
    thread, out = in_thread(lambda: reader.read("r1", 1, timeout_s=LONG_S))
    time.sleep(0.2)
    assert thread.is_alive(), "XREAD BLOCK waits for an entry after 1-0"

    writer.write_batch([("r1", events[1]), ("r1", events[2])])
    thread.join(LONG_S)

    got = out["result"]
    assert got and got == events[1 : 1 + len(got)], "what came first, in order (1 or 2 entries)"
    assert out["seconds"] < LONG_S / 2, "woken by the write, not by its timeout"


def test_redis_read_times_out_with_an_empty_list_for_a_known_run(make_client, prefix):
    log = redis_log(make_client(), prefix)
    log.write_batch([("r1", run_events()[0])])

    started = time.monotonic()
    assert log.read("r1", 1, timeout_s=0.2) == []
    assert 0.15 < time.monotonic() - started < LONG_S / 2


def test_redis_read_of_an_unknown_key_is_none(make_client, prefix):
    log = redis_log(make_client(), prefix)

    assert log.read("never-ran", 0, timeout_s=0) is None
    assert log.read("never-ran", 0, timeout_s=0.1) is None
    assert not make_client().exists(log.key("never-ran"))


def test_redis_expire_is_set_and_shorter_once_the_run_has_ended(make_client, prefix):
    client = make_client()
    log = redis_log(client, prefix, ttl_s=60, running_ttl_s=600)
    events = run_events(tokens=2)

    log.write_batch([("r1", e) for e in events[:-1]])
    running_ttl = client.ttl(log.key("r1"))
    log.write_batch([("r1", events[-1])])
    finished_ttl = client.ttl(log.key("r1"))

    assert 590 <= running_ttl <= 600
    assert 50 <= finished_ttl <= 60


def test_redis_error_event_also_sets_the_short_ttl(make_client, prefix):
    client = make_client()
    log = redis_log(client, prefix, ttl_s=30, running_ttl_s=600)
    log.write_batch([("r1", RunEvent(1, "run_started", {})),
                     ("r1", RunEvent(2, "error", {"code": "run_cancelled"}))])

    assert 20 <= client.ttl(log.key("r1")) <= 30


def test_redis_failure_raises_event_log_unavailable_and_calls_on_error():
    errors: list[str] = []
    client = dead_client()
    log = RedisEventLog(client, prefix="flowgate-test-dead:", on_error=errors.append)

    log.write_batch([("r1", e) for e in run_events()])  # swallowed: runs never fail on Redis
    assert errors == ["append"]

    with pytest.raises(EventLogUnavailable) as caught:
        log.read("r1", 0, timeout_s=0.1)
    assert errors == ["append", "read"]
    assert (caught.value.status, caught.value.code) == (503, "event_log_unavailable")

    log.append("r1", run_events()[0])  # through the writer thread, which retries
    assert wait_until(lambda: errors.count("append") >= 2)


class SlowPipelineClient:
    """A Redis client whose pipelines take ``delay_s`` to execute (a slow network)."""

    def __init__(self, client: redis.Redis, delay_s: float) -> None:
        self.client, self.delay_s = client, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def pipeline(self, **kw: Any) -> Any:
        pipe = self.client.pipeline(**kw)
        execute, delay = pipe.execute, self.delay_s

        def slow_execute(*args: Any, **kwargs: Any) -> Any:
            time.sleep(delay)
            return execute(*args, **kwargs)

        pipe.execute = slow_execute
        return pipe


def test_redis_flush_waits_until_queued_events_are_written(make_client, prefix):
    client = make_client()
    log = redis_log(SlowPipelineClient(client, delay_s=0.3), prefix)
    log.append("r1", run_events()[0])

    try:
        log.flush(WAIT_S)

        assert client.xlen(log.key("r1")) == 1
    finally:  # let the late write land before the fixture deletes this test's keys
        wait_until(lambda: client.exists(log.key("r1")))


# -- RunEventLog ----------------------------------------------------------------------------


def test_run_event_log_without_redis_is_the_memory_log():
    log = RunEventLog(MemoryEventLog())
    for event in run_events():
        log.append("r1", event)

    assert log.read("r1", 2, 0) == run_events()[2:]
    assert log.read("nope", 0, 0) is None


def test_run_event_log_serves_local_runs_from_memory(make_client, prefix):
    client = make_client()
    local = RunEventLog(MemoryEventLog(), redis_log(client, prefix))
    events = run_events(tokens=4)

    for event in events:
        local.append("r1", event)
    assert local.read("r1", 0, 0) == events, "at once, before the writer has sent anything"

    local.shared.flush(WAIT_S)
    assert wait_until(lambda: client.xlen(local.shared.key("r1")) == len(events))
    client.delete(local.shared.key("r1"))
    assert local.read("r1", 3, 0) == events[3:], "memory is the authority for its own runs"


def test_run_event_log_reads_other_processes_runs_from_redis(make_client, prefix):
    client = make_client()
    a = RunEventLog(MemoryEventLog(), redis_log(client, prefix))
    b = RunEventLog(MemoryEventLog(), redis_log(make_client(), prefix))
    events = run_events(tokens=4)
    for event in events[:3]:
        a.append("r1", event)
    a.shared.flush(WAIT_S)
    assert wait_until(lambda: client.xlen(a.shared.key("r1")) == 3)

    assert b.read("r1", 0, 0) == events[:3]
    assert b.read("r1", 1, 0) == events[1:3]
    assert not b.memory.knows("r1"), "B only reads; the run is A's"
    assert b.read("unknown", 0, 0) is None

    waiting, out = in_thread(lambda: b.read("r1", 3, timeout_s=WAIT_S))
    time.sleep(0.2)
    for event in events[3:]:
        a.append("r1", event)
    waiting.join(WAIT_S + 1)
    assert out["result"], "B's blocking read wakes when A's writer sends the next event"
    assert out["result"] == events[3 : 3 + len(out["result"])]

    collected, after = list(events[:3]), 3
    deadline = time.monotonic() + WAIT_S
    while after < len(events) and time.monotonic() < deadline:
        got = b.read("r1", after, timeout_s=0.5)
        collected += got
        after = collected[-1].seq
    assert collected == events


def test_run_event_log_with_redis_down_still_serves_local_runs():
    errors: list[str] = []
    client = dead_client()
    log = RunEventLog(MemoryEventLog(),
                      RedisEventLog(client, prefix="flowgate-test-dead:", on_error=errors.append))
    events = run_events()
    for event in events:
        log.append("r1", event)

    assert log.read("r1", 0, 0) == events
    with pytest.raises(EventLogUnavailable):
        log.read("elsewhere", 0, 0)
    assert "read" in errors


def test_a_hole_in_the_redis_stream_ends_the_read_with_events_lost(make_client, prefix):
    """A batch the writer had to drop leaves a hole in the run's stream; a reader in another
    process gets the events before it and then an error naming it, never what follows."""
    client = make_client()
    writer = redis_log(client, prefix)
    events = run_events(tokens=4)  # 8 events
    writer.write_batch([("r1", e) for e in events[:3] + events[5:]])  # 4 and 5 never arrived
    reader = RunEventLog(MemoryEventLog(), redis_log(make_client(), prefix))

    got = reader.read("r1", 0, timeout_s=0)
    resumed = reader.read("r1", 4, timeout_s=0)  # a client that had 4 from the run's owner

    assert got[:3] == events[:3]
    assert (got[3].seq, got[3].type, got[3].data["code"]) == (0, "error", "events_lost")
    assert (got[3].data["first_lost"], got[3].data["last_lost"]) == (4, 5)
    assert len(got) == 4
    assert [e.seq for e in resumed] == [0] and resumed[0].data["first_lost"] == 5
    assert reader.read("r1", 5, timeout_s=0) == events[5:], "after the hole: no loss"


def test_a_batch_that_keeps_failing_is_dropped_counted_and_its_end_sent_later(make_client,
                                                                             prefix):
    lost: list[int] = []
    client = make_client()
    log = RedisEventLog(dead_client(), prefix=prefix, retry_s=0.0, on_lost=lost.append)
    events = run_events(tokens=2)

    assert log.write_with_retry([("r1", "tenant-a")] + [("r1", e) for e in events]) is False
    assert lost == [len(events)]
    log.client = client  # Redis answers again: the next write also sends what readers need
    assert log.write_with_retry([("r2", RunEvent(1, "run_started", {}))]) is True

    assert [e.seq for e in log.read("r1", 0, timeout_s=0)] == [events[-1].seq]
    assert log.owner("r1") == "tenant-a"


def test_memory_is_bounded_in_bytes_and_reports_what_it_holds():
    held: list[int] = []
    log = MemoryEventLog(max_bytes=400_000, ttl_s=3600, clock=FakeClock(), on_bytes=held.append)
    big = "x" * 20_000
    for n in range(100):  # 100 runs of ~40 kB: ten times the budget
        run_id = f"run-{n}"
        log.append(run_id, RunEvent(1, "run_started", {"input": big}))
        log.append(run_id, RunEvent(2, "run_finished", {"output": big}))

    assert log.bytes <= 400_000
    assert held and held[-1] == log.bytes
    assert log.knows("run-99") and not log.knows("run-0"), "the oldest went first"
    assert log.read("run-99", 0, 0)[1].data["output"] == big


def test_memory_a_run_over_its_share_keeps_its_end_and_readers_see_the_hole():
    log = RunEventLog(MemoryEventLog(max_bytes=400_000, ttl_s=3600, clock=FakeClock()))
    chunk = "y" * 30_000  # a quarter of the budget (100 kB) holds three of these
    events = [RunEvent(1, "run_started", {})]
    events += [RunEvent(i, "token", {"text": chunk}) for i in range(2, 8)]
    events.append(RunEvent(8, "run_finished", {"output": "end"}))
    for event in events:
        log.append("big", event)

    got = log.read("big", 0, 0)

    assert [e.seq for e in got[:-1]] == [1, 2, 3, 4]
    assert (got[-1].type, got[-1].data["code"], got[-1].data["first_lost"]) == (
        "error", "events_lost", 5)
    assert log.memory.bytes <= log.memory.max_run_bytes
