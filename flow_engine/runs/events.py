"""The run event log: every event of every run, by run id and sequence number, so that a
run can be watched from any worker or replica and a dropped stream resumed exactly.

Protocol (what ``GET /runs/{id}/events`` relies on):

- Events of one run have sequence numbers 1, 2, 3, … assigned by the process that runs it,
  appended in that order. ``read(run_id, after=k)`` returns the events with seq > k in
  order, waiting up to ``timeout_s`` for the first one; a reader resuming with its last seq
  (SSE ``Last-Event-ID``) therefore misses nothing and sees nothing twice.
- ``run_finished`` or ``error`` is a run's last event; after it the run's events are kept
  for ``ttl_s`` and then forgotten.
- ``open(run_id, owner)`` comes before a run's first event and records the tenant it
  belongs to (``owner(run_id)``), so that readers in any process can refuse other tenants
  before sending anything. In Redis it is the string ``flowgate:run:<id>:owner``, written
  in the same ordered queue as the events and expiring with them.
- Readers never skip: every read is checked to continue exactly after ``after`` with no
  hole. Where events are missing and cannot be had (the Redis mirror dropped a batch during
  an outage, a stream trimmed or restarted, a run over its memory budget), the read ends
  with an ``error`` event (seq 0, code ``events_lost``, naming the missing range) instead:
  a client never sees ``run_finished`` after a silent gap.
- The in-memory log (always on) is the authority for runs of this process, bounded in
  bytes (``FLOW_ENGINE_EVENT_MEMORY_BYTES``, each event counted as about its JSON length;
  gauge ``flowgate_engine_event_memory_bytes``) and in runs. With ``REDIS_URL``, every event
  is also mirrored to a Redis Stream ``flowgate:run:<id>`` (entry id ``<seq>-0``) by a
  background writer (``runs/redis_events.py``: retries, backoff, short timeouts), and runs
  of other processes are read from there. If Redis fails, runs of this process are still
  served from memory and the failure is counted (``flowgate_engine_event_log_errors_total``;
  events never written: ``flowgate_engine_event_log_lost_total``).
"""


from __future__ import annotations

import bisect
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from flow_engine.runs.redis_events import TERMINAL, EventLogUnavailable, RedisEventLog
from flow_engine.runs.runner import RunEvent

__all__ = ["TERMINAL", "EventLogUnavailable", "MemoryEventLog", "RedisEventLog", "RunEventLog",
           "contiguous", "event_size", "lost_event"]
_SCAN = 64  # eviction looks this far from the oldest end for a finished run
_STDLIB = " "  # leads an event's JSON written by the stdlib's json (valid JSON whitespace)


class _RunEvents:
    """One run's events. Live, a list of RunEvent and a Condition readers wait on. Each event
    is also encoded as it is appended — its data as JSON (orjson: the 12 events of a
    five-node run in 4 µs, the stdlib's json in 59) — which is what the event is counted as
    in the memory bound, and what a finished run is kept as. Once its last event is in, the
    run keeps only three tuples (``packed``: seqs, types, JSON data) and drops the rest:
    a finished run kept for late readers is then one object the garbage collector walks
    (tuples of strings and ints are left out of its walks) instead of about 45 — events,
    their dicts, the condition, its lock and deque. With thousands of runs kept, those were
    what full collections of a busy worker spent 35–75 ms on. A read decodes only the events
    it returns. A run with an event JSON cannot hold (a circular value, a tuple as a key)
    is never packed: ``blobs`` is None."""

    __slots__ = ("blobs", "bytes", "cond", "events", "finished_at", "owner", "packed", "seqs",
                 "waiting")

    def __init__(self) -> None:
        self.events: list[RunEvent] | None = []
        self.seqs: list[int] | None = []
        self.blobs: list[str] | None = []
        self.cond: threading.Condition | None = threading.Condition()
        self.finished_at: float | None = None
        self.owner: str | None = None
        self.bytes = 0
        self.waiting = 0  # readers waiting on cond
        self.packed: tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]] | None = None

    def add(self, event: RunEvent, blob: str | None, size: int) -> None:
        """With ``cond`` held: one more event (``blob``: its data's JSON, None if it has none)."""
        self.events.append(event)
        self.seqs.append(event.seq)
        if blob is None:
            self.blobs = None
        elif self.blobs is not None:
            self.blobs.append(blob)
        self.bytes += size

    def pack(self) -> None:
        """After the last event, with ``cond`` and the log's lock held (see the class)."""
        if self.blobs is None:
            return
        self.packed = (tuple(self.seqs), tuple(e.type for e in self.events), tuple(self.blobs))
        self.events = self.seqs = self.blobs = None
        self.cond = None  # readers waiting on it hold it; later ones never wait

    def unpack(self) -> None:
        """Live again (an event after the last one), with the log's lock held."""
        seqs, _types, blobs = self.packed
        self.events = _unpacked(self.packed, -1)
        self.seqs, self.blobs = list(seqs), list(blobs)
        self.packed, self.cond = None, threading.Condition()


def _unpacked(packed: tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]],
              after: int) -> list[RunEvent]:
    """The events with seq > ``after`` of a packed run: only those are decoded."""
    seqs, types, blobs = packed
    return [RunEvent(seqs[i], types[i], _decoded(blobs[i]))
            for i in range(bisect.bisect_right(seqs, after), len(seqs))]


def _decoded(blob: str) -> Any:
    if blob.startswith(_STDLIB):  # written by the stdlib (see _encoded): read by it too
        return json.loads(blob)  # (orjson would read an int over 64 bits as a float)
    return orjson.loads(blob)


def _encoded(event: RunEvent) -> tuple[str | None, int]:
    """The event's data as JSON and the size it is counted as (about its JSON length, in
    bytes); no JSON for data JSON cannot hold (a circular value) — then the size is
    estimated by walking it.
    Kept as a str, not orjson's bytes: orjson writes into a buffer of a few kB and shrinks
    it, and thousands of kept blobs each pinned the start of one, leaving gaps the next
    buffers did not fit (46 MB for 10,000 tokens instead of 4)."""
    try:
        raw = orjson.dumps(event.data, default=str)
        blob, size = raw.decode(), len(raw)
    except (TypeError, ValueError, RecursionError):  # orjson refuses lone surrogates (a
        try:  # client's input), ints over 64 bits and non-string keys; the stdlib does not
            blob = _STDLIB + json.dumps(event.data, separators=(",", ":"), default=str)
        except (TypeError, ValueError, RecursionError):
            return None, event_size(event)
        size = len(blob)  # (ASCII)
    return blob, 32 + len(event.type) + size


class MemoryEventLog:
    """Events of this process's runs: bounded in bytes (all runs; one run may hold at most a
    quarter), runs and events per run, and expiring. Over a bound, finished runs go first,
    oldest first; a run over its own share keeps only its last event (readers see the hole
    as ``events_lost``)."""

    def __init__(self, *, max_runs: int = 10_000, max_events_per_run: int = 100_000,
                 max_bytes: int = 64 * 1024 * 1024, ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.max_runs = max_runs
        self.max_events = max_events_per_run
        self.max_bytes = max(1, max_bytes)
        self.max_run_bytes = max(1, self.max_bytes // 4)
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_bytes = on_bytes or (lambda n: None)
        self._runs: OrderedDict[str, _RunEvents] = OrderedDict()
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self._bytes = 0
        self._reported = -1

    @property
    def bytes(self) -> int:
        """Estimated bytes of the events held (about their JSON length)."""
        return self._bytes

    def _get(self, run_id: str, create: bool) -> _RunEvents | None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None and run.finished_at is not None \
                    and self._clock() - run.finished_at > self.ttl_s:
                self._drop(run_id)  # expired: forgotten even if no new run swept it
                run = None
            if run is None and create:
                self._evict()
                run = self._runs[run_id] = _RunEvents()
            return run

    def _drop(self, run_id: str) -> None:
        """With the lock held: forget a run and its bytes."""
        self._bytes -= self._runs.pop(run_id).bytes

    def _evict(self) -> None:
        """Called with the lock held when a run is added: a full TTL sweep at most every
        few seconds (reads drop expired runs themselves), and the capacity bound."""
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + min(5.0, self.ttl_s)
            for run_id in [r for r, v in self._runs.items()
                           if v.finished_at is not None and now - v.finished_at > self.ttl_s]:
                self._drop(run_id)
        while len(self._runs) >= self.max_runs:
            self._drop(self._victim(None))

    def _victim(self, keep: str | None) -> str:
        """The run to evict: the oldest finished one among the oldest few, else the oldest
        (never ``keep``, the run being written to). Lock held; at least one other run."""
        first = None
        for i, (run_id, run) in enumerate(self._runs.items()):
            if run_id == keep:
                continue
            first = first or run_id
            if run.finished_at is not None or i >= _SCAN:
                return run_id
        return first  # type: ignore[return-value]

    def open(self, run_id: str, owner: str) -> None:
        self._get(run_id, create=True).owner = owner

    def owner(self, run_id: str) -> str | None:
        run = self._get(run_id, create=False)
        return run.owner if run is not None else None

    def append(self, run_id: str, event: RunEvent) -> None:
        blob, size = _encoded(event)
        run = self._get(run_id, create=True)
        while True:
            cond = run.cond or self._live(run)
            with cond:
                if run.cond is not cond:
                    continue  # another append packed it meanwhile: make it live again
                kept = event.type in TERMINAL or (
                    len(run.events) < self.max_events and run.bytes + size <= self.max_run_bytes)
                if kept:
                    run.add(event, blob, size)
                with self._lock:  # never at once with an unpack (_live)
                    if event.type in TERMINAL:
                        run.finished_at = self._clock()
                        run.pack()
                    report = self._account(run_id, run, size) if kept else None
                if run.waiting:
                    cond.notify_all()
                break
        if report is not None:
            self._on_bytes(report)

    def _live(self, run: _RunEvents) -> threading.Condition:
        """The condition of a packed run, for appending: made live again first."""
        with self._lock:
            if run.packed is not None:
                run.unpack()
            return run.cond

    def _account(self, run_id: str, run: _RunEvents, size: int) -> int | None:
        """With the lock held: count a kept event's bytes, evict over the bound; the bytes
        held, when they are worth reporting."""
        if self._runs.get(run_id) is not run:
            return None  # evicted meanwhile: its bytes went with it
        self._bytes += size
        evicted = False
        while self._bytes > self.max_bytes and len(self._runs) > 1:
            self._drop(self._victim(run_id))
            evicted = True
        if not evicted and abs(self._bytes - self._reported) < 65_536:
            return None
        self._reported = self._bytes
        return self._bytes

    def knows(self, run_id: str) -> bool:
        return self._get(run_id, create=False) is not None

    def finished(self, run_id: str) -> bool:
        run = self._get(run_id, create=False)
        return run is not None and run.finished_at is not None

    def read(self, run_id: str, after: int, timeout_s: float) -> list[RunEvent] | None:
        """Events with seq > ``after`` (waiting up to ``timeout_s``); None for an unknown run."""
        run = self._get(run_id, create=False)
        if run is None:
            return None
        while True:  # each read once: pack() sets packed before it drops cond
            packed, cond = run.packed, run.cond
            if packed is not None:  # finished and packed
                return _unpacked(packed, after)
            if cond is not None:
                break
        deadline = time.monotonic() + timeout_s
        with cond:
            while True:
                packed = run.packed
                if packed is not None:  # it finished while this reader waited
                    return _unpacked(packed, after)
                start = bisect.bisect_right(run.seqs, after)
                if start < len(run.events) or run.finished_at is not None:
                    return run.events[start:]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                run.waiting += 1  # appends notify only runs someone waits on
                try:
                    cond.wait(remaining)
                finally:
                    run.waiting -= 1


def event_size(event: RunEvent) -> int:
    """About the length of the event's JSON (strings by their length, every other scalar
    as 8, plus punctuation), walked without recursion, each container once: the size of an
    event whose data JSON cannot hold (a circular value, a non-string key)."""
    size, stack, seen = 32 + len(event.type), [event.data], set()
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            size += len(value) + 2
        elif isinstance(value, dict | list | tuple):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, dict):
                size += 2 + 4 * len(value)
                for key, item in value.items():
                    size += len(key) if isinstance(key, str) else 8
                    stack.append(item)
            else:
                size += 2 + len(value)
                stack.extend(value)
        else:
            size += 8
    return size


def lost_event(run_id: str, first: int, last: int | None) -> RunEvent:
    """The ``error`` that ends a read where events ``first``..``last`` are missing (``last``
    None: up to an unknown end). Its seq is 0: it is not one of the run's events."""
    missing = f"{first}-{last}" if last is not None and last != first else str(first)
    return RunEvent(0, "error", {
        "code": "events_lost", "node": None, "run_id": run_id,
        "message": f"events {missing} of run {run_id} were lost (the shared event log failed "
                   f"while the run went on); GET /api/v1/runs/{run_id} has its outcome",
        "first_lost": first, "last_lost": last})


def contiguous(run_id: str, after: int, events: list[RunEvent]) -> list[RunEvent]:
    """``events`` if they continue exactly after ``after``; else those before the first hole
    and then the ``events_lost`` error (see the module docstring)."""
    if events[0].seq == after + 1 and events[-1].seq == after + len(events):
        return events  # the usual case: one comparison per read
    checked, expected = [], after + 1
    for event in events:
        if event.seq < expected:
            continue  # already had it: not a hole
        if event.seq != expected:
            checked.append(lost_event(run_id, expected, event.seq - 1))
            break
        checked.append(event)
        expected += 1
    return checked


class RunEventLog:
    """What the engine uses: memory for this process's runs, Redis for everyone's."""

    def __init__(self, memory: MemoryEventLog, shared: RedisEventLog | None = None) -> None:
        self.memory = memory
        self.shared = shared

    def open(self, run_id: str, owner: str) -> None:
        """Before a run's first event: the tenant it belongs to."""
        self.memory.open(run_id, owner)
        if self.shared is not None:
            self.shared.open(run_id, owner)

    def owner(self, run_id: str) -> str | None:
        """The tenant of a run some log knows (None: unknown here, or logged without one).
        Raises EventLogUnavailable when only Redis could know and Redis is down."""
        if self.memory.knows(run_id) or self.shared is None:
            return self.memory.owner(run_id)
        return self.shared.owner(run_id)

    def append(self, run_id: str, event: RunEvent) -> None:
        self.memory.append(run_id, event)
        if self.shared is not None:
            self.shared.append(run_id, event)

    def finished(self, run_id: str) -> bool:
        """Has the run's last event been logged?"""
        if self.memory.knows(run_id) or self.shared is None:
            return self.memory.finished(run_id)
        return self.shared.finished(run_id)

    def read(self, run_id: str, after: int, timeout_s: float) -> list[RunEvent] | None:
        """Events after ``after``; None when no log knows the run (never ran, or expired).
        Raises EventLogUnavailable when only Redis could know and Redis is down. A hole
        after ``after`` ends the events with an ``events_lost`` error (:func:`contiguous`)."""
        if self.memory.knows(run_id) or self.shared is None:
            events = self.memory.read(run_id, after, timeout_s)
        else:
            events = self.shared.read(run_id, after, timeout_s)
        return contiguous(run_id, after, events) if events else events
