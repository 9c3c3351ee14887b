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
- The in-memory log (always on) is the authority for runs of this process. With
  ``REDIS_URL``, every event is also mirrored to a Redis Stream ``flowgate:run:<id>`` (entry
  id ``<seq>-0``) by a background writer, and runs of other processes are read from there
  with ``XREAD BLOCK``. If Redis fails, runs of this process are still served from memory
  and the failure is counted (``flowgate_engine_event_log_errors_total``).
"""

from __future__ import annotations

import bisect
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from flow_engine.errors import FlowgateError
from flow_engine.runs.runner import RunEvent

log = logging.getLogger(__name__)
TERMINAL = frozenset({"run_finished", "error"})


class EventLogUnavailable(FlowgateError):
    """The shared (Redis) log could not be read and this process does not know the run."""

    status, code = 503, "event_log_unavailable"


class _RunEvents:
    __slots__ = ("cond", "events", "finished_at", "owner", "seqs")

    def __init__(self) -> None:
        self.events: list[RunEvent] = []
        self.seqs: list[int] = []
        self.cond = threading.Condition()
        self.finished_at: float | None = None
        self.owner: str | None = None


class MemoryEventLog:
    """Events of this process's runs: bounded (runs, events per run) and expiring."""

    def __init__(self, *, max_runs: int = 10_000, max_events_per_run: int = 100_000,
                 ttl_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_runs = max_runs
        self.max_events = max_events_per_run
        self.ttl_s = ttl_s
        self._clock = clock
        self._runs: OrderedDict[str, _RunEvents] = OrderedDict()
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def _get(self, run_id: str, create: bool) -> _RunEvents | None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None and run.finished_at is not None \
                    and self._clock() - run.finished_at > self.ttl_s:
                del self._runs[run_id]  # expired: forgotten even if no new run swept it
                run = None
            if run is None and create:
                self._evict()
                run = self._runs[run_id] = _RunEvents()
            return run

    def _evict(self) -> None:
        """Called with the lock held when a run is added: a full TTL sweep at most every
        few seconds (reads drop expired runs themselves), and the capacity bound by evicting
        from the oldest end, finished runs first."""
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + min(5.0, self.ttl_s)
            for run_id in [r for r, v in self._runs.items()
                           if v.finished_at is not None and now - v.finished_at > self.ttl_s]:
                del self._runs[run_id]
        while len(self._runs) >= self.max_runs:
            victim = None
            for i, (run_id, run) in enumerate(self._runs.items()):
                if run.finished_at is not None or i >= 64:  # oldest first; bounded scan
                    victim = run_id
                    break
            del self._runs[victim if victim is not None else next(iter(self._runs))]

    def open(self, run_id: str, owner: str) -> None:
        self._get(run_id, create=True).owner = owner

    def owner(self, run_id: str) -> str | None:
        run = self._get(run_id, create=False)
        return run.owner if run is not None else None

    def append(self, run_id: str, event: RunEvent) -> None:
        run = self._get(run_id, create=True)
        with run.cond:
            if len(run.events) < self.max_events or event.type in TERMINAL:
                run.events.append(event)
                run.seqs.append(event.seq)
            if event.type in TERMINAL:
                run.finished_at = self._clock()
            run.cond.notify_all()

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
        deadline = time.monotonic() + timeout_s
        with run.cond:
            while True:
                start = bisect.bisect_right(run.seqs, after)
                if start < len(run.events) or run.finished_at is not None:
                    return run.events[start:]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                run.cond.wait(remaining)


class RedisEventLog:
    """The Redis Streams mirror. ``append`` only queues; a writer thread (a greenlet under
    gevent) sends queued events in pipelined batches, so runs never wait for Redis."""

    def __init__(self, client: Any, *, prefix: str = "flowgate:", ttl_s: int = 3600,
                 running_ttl_s: int = 86_400, max_len: int = 100_000,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s, self.running_ttl_s = max(1, int(ttl_s)), max(1, int(running_ttl_s))
        self.max_len = max_len
        self._on_error = on_error or (lambda op: None)
        self._queue: queue.Queue = queue.Queue(maxsize=100_000)
        self._pending = 0  # queued or being written
        self._pending_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    def key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def owner_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:owner"

    def open(self, run_id: str, owner: str) -> None:
        self.append(run_id, owner)  # queued before the run's first event

    def owner(self, run_id: str) -> str | None:
        try:
            return self.client.get(self.owner_key(run_id))
        except Exception as exc:
            self._on_error("read")
            raise EventLogUnavailable(f"the shared event log is unavailable ({type(exc).__name__})") from exc

    def append(self, run_id: str, event: RunEvent | str) -> None:
        """Queue an event (or, as a str, the run's owner) for the writer."""
        if self._writer is None:
            self._start_writer()
        with self._pending_lock:
            self._pending += 1
        try:
            self._queue.put_nowait((run_id, event))
        except queue.Full:
            with self._pending_lock:
                self._pending -= 1
            self._on_error("append")  # memory still has it; watchers elsewhere miss it

    def _start_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_forever, daemon=True,
                                                name="flowgate-event-writer")
                self._writer.start()

    def _write_forever(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.write_batch(batch)
            finally:
                with self._pending_lock:
                    self._pending -= len(batch)

    def write_batch(self, batch: list[tuple[str, RunEvent | str]]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            touched: dict[str, bool] = {}
            for run_id, event in batch:
                if isinstance(event, str):
                    pipe.set(self.owner_key(run_id), event, ex=self.running_ttl_s)
                    continue
                pipe.xadd(self.key(run_id), {"t": event.type, "d": json.dumps(event.data, default=str)},
                          id=f"{event.seq}-0", maxlen=self.max_len, approximate=True)
                touched[run_id] = touched.get(run_id, False) or event.type in TERMINAL
            for run_id, finished in touched.items():
                ttl = self.ttl_s if finished else self.running_ttl_s
                pipe.expire(self.key(run_id), ttl)
                pipe.expire(self.owner_key(run_id), ttl)
            pipe.execute(raise_on_error=False)
        except Exception as exc:
            self._on_error("append")
            log.warning("event log: could not write %d events to Redis: %s", len(batch),
                        type(exc).__name__)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued event is written (tests, graceful shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._pending > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._pending == 0

    def finished(self, run_id: str) -> bool:
        try:
            last = self.client.xrevrange(self.key(run_id), count=1)
        except Exception as exc:
            self._on_error("read")
            raise EventLogUnavailable(f"the shared event log is unavailable ({type(exc).__name__})") from exc
        return bool(last) and _text(last[0][1].get("t", last[0][1].get(b"t", b""))) in TERMINAL

    def read(self, run_id: str, after: int, timeout_s: float) -> list[RunEvent] | None:
        key = self.key(run_id)
        try:
            answer = self.client.xread({key: f"{after}-0"}, count=1000,
                                       block=max(1, int(timeout_s * 1000)))
            if not answer and not self.client.exists(key):
                return None
        except Exception as exc:
            self._on_error("read")
            raise EventLogUnavailable(f"the shared event log is unavailable ({type(exc).__name__})") from exc
        events = []
        for _key, entries in answer or ():
            for entry_id, fields in entries:
                seq = int(_text(entry_id).split("-", 1)[0])
                events.append(RunEvent(seq, _text(fields[b"t"] if b"t" in fields else fields["t"]),
                                       json.loads(fields[b"d"] if b"d" in fields else fields["d"])))
        return events


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        Raises EventLogUnavailable when only Redis could know and Redis is down."""
        if self.memory.knows(run_id) or self.shared is None:
            return self.memory.read(run_id, after, timeout_s)
        return self.shared.read(run_id, after, timeout_s)
