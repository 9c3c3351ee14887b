"""The Redis Streams mirror of the run event log (``runs/events.py`` has the protocol).

Writing. ``append`` only queues; one writer thread (a greenlet under gevent) sends queued
events in order, in pipelined batches, so runs never wait for Redis. A batch that fails is
retried with backoff (50 ms doubling to 2 s) for up to ``retry_s``: a Redis restart or
failover loses nothing, and since the writer retries before it sends anything newer, each
run's stream stays in order (the queue buffers meanwhile). A batch still failing after
``retry_s`` is dropped and counted (``on_lost``); readers in other processes then find a
gap in the run's sequence numbers and end their stream with an ``events_lost`` error
instead of skipping it. So that such a reader is not left waiting, the owner records and
last events of dropped batches are sent again once Redis answers (a later id is always
accepted; one already there is refused harmlessly). Failures are logged once per interval.

Reading. Every command runs on a client whose socket timeout is short
(``FLOW_ENGINE_REDIS_TIMEOUT_S``), so a hung Redis costs a request that much, no more: a
blocking ``XREAD`` waits at most ``block_s`` per command (on a client whose timeout is
``block_s`` longer) and loops until the caller's timeout. A failed read raises
:class:`EventLogUnavailable` (503 ``event_log_unavailable``, with ``Retry-After``).
"""

from __future__ import annotations

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
from flowgate.common.backoff import Backoff
from flowgate.common.lograte import Throttled

log = logging.getLogger("flow_engine.runs.events")
TERMINAL = frozenset({"run_finished", "error"})
Item = tuple[str, "RunEvent | str"]  # (run id, event or — a str — the run's owner)
MAX_BATCH = 500
MAX_RESEND_RUNS = 10_000


class EventLogUnavailable(FlowgateError):
    """The shared (Redis) log could not be read and this process does not know the run."""

    status, code = 503, "event_log_unavailable"


def unavailable(exc: BaseException) -> EventLogUnavailable:
    return EventLogUnavailable(
        f"the shared event log (Redis) is unavailable ({type(exc).__name__}); retry shortly")


class RedisEventLog:
    """See the module docstring. ``reader`` is the client for blocking reads (socket timeout
    above ``block_s``); without one, ``client`` serves them too."""

    def __init__(self, client: Any, *, reader: Any | None = None, prefix: str = "flowgate:",
                 ttl_s: int = 3600, running_ttl_s: int = 86_400, max_len: int = 100_000,
                 block_s: float = 1.0, retry_s: float = 10.0,
                 on_error: Callable[[str], None] | None = None,
                 on_lost: Callable[[int], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.reader = reader if reader is not None else client
        self.prefix = prefix
        self.ttl_s, self.running_ttl_s = max(1, int(ttl_s)), max(1, int(running_ttl_s))
        self.max_len = max_len
        self.block_s = max(0.001, block_s)
        self.retry_s = retry_s
        self._on_error = on_error or (lambda op: None)
        self._on_lost = on_lost or (lambda n: None)
        self._sleep, self._clock = sleep, clock
        self._queue: queue.Queue = queue.Queue(maxsize=100_000)
        self._pending = 0  # queued or being written
        self._pending_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._resend: OrderedDict[str, list[Item]] = OrderedDict()  # of dropped batches
        self._resend_lock = threading.Lock()
        self._failing = False
        self._warn_write = Throttled(log)
        self._warn_read = Throttled(log)

    def key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def owner_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:owner"

    # -- writing --------------------------------------------------------------------------

    def open(self, run_id: str, owner: str) -> None:
        self.append(run_id, owner)  # queued before the run's first event

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
            self._on_error("append")  # memory still has it; watchers elsewhere see a gap
            self._lost([(run_id, event)])

    def _start_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_forever, daemon=True,
                                                name="flowgate-event-writer")
                self._writer.start()

    def _write_forever(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.write_with_retry(batch)
            except Exception:  # never let the writer die: later events must still go out
                log.exception("event log: the Redis writer failed")
            finally:
                with self._pending_lock:
                    self._pending -= len(batch)

    def write_with_retry(self, batch: list[Item]) -> bool:
        """Write ``batch``, retrying with backoff for up to ``retry_s``; False when it was
        dropped (counted, and what readers need to see the loss is kept for resending)."""
        deadline = self._clock() + self.retry_s
        delays = Backoff(0.05, 2.0).delays()
        delay = next(delays)
        while not self.write_batch(batch):
            if self._clock() + delay > deadline:
                self._lost(batch)
                return False
            self._sleep(delay)
            delay = next(delays)
        if self._resend:
            self._send_again()
        return True

    def write_batch(self, batch: list[Item]) -> bool:
        """One attempt to write ``batch`` (pipelined, not a transaction); False on failure.
        Per-command errors (an id already written by an earlier attempt) are ignored."""
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
            self._failing = True
            self._warn_write.warning("event log: writing %d events to Redis failed (%s); "
                                     "retrying with backoff", len(batch), type(exc).__name__)
            return False
        if self._failing:
            self._failing = False
            self._warn_write.reset()
            log.info("event log: writing to Redis works again")
        return True

    def _lost(self, batch: list[Item]) -> None:
        """Count a dropped batch; keep its owner records and last events for resending."""
        events = sum(1 for _, item in batch if not isinstance(item, str))
        if events:
            self._on_lost(events)
        self._warn_write.warning("event log: gave up writing %d events to Redis after %g s; "
                                 "watchers in other processes will be told they were lost",
                                 events, self.retry_s)
        with self._resend_lock:
            for run_id, item in batch:
                if isinstance(item, str) or item.type in TERMINAL:
                    self._resend.setdefault(run_id, []).append((run_id, item))
                    self._resend.move_to_end(run_id)
            while len(self._resend) > MAX_RESEND_RUNS:
                self._resend.popitem(last=False)

    def _send_again(self) -> None:
        with self._resend_lock:
            resend, self._resend = self._resend, OrderedDict()
        if not self.write_batch([item for items in resend.values() for item in items]):
            with self._resend_lock:  # next time, oldest first
                for run_id, items in resend.items():
                    self._resend.setdefault(run_id, []).extend(items)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued event is written or dropped (tests, graceful shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._pending > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._pending == 0

    # -- reading --------------------------------------------------------------------------

    def owner(self, run_id: str) -> str | None:
        try:
            return self.client.get(self.owner_key(run_id))
        except Exception as exc:
            raise self._read_failed(exc) from exc

    def finished(self, run_id: str) -> bool:
        try:
            last = self.client.xrevrange(self.key(run_id), count=1)
        except Exception as exc:
            raise self._read_failed(exc) from exc
        return bool(last) and _text(last[0][1].get("t", last[0][1].get(b"t", b""))) in TERMINAL

    def read(self, run_id: str, after: int, timeout_s: float) -> list[RunEvent] | None:
        """Events with seq > ``after`` as stored (``RunEventLog`` checks they are
        contiguous), waiting up to ``timeout_s`` in XREADs of at most ``block_s``; None
        when Redis has no stream for the run."""
        key, since = self.key(run_id), {self.key(run_id): f"{after}-0"}
        deadline = self._clock() + timeout_s
        try:
            answer = self.client.xread(since, count=1000)
            if not answer and not self.client.exists(key):
                return None
            while not answer:
                wait = deadline - self._clock()
                if wait <= 0:
                    break
                answer = self.reader.xread(since, count=1000,
                                           block=max(1, int(min(wait, self.block_s) * 1000)))
        except Exception as exc:
            raise self._read_failed(exc) from exc
        events = []
        for _key, entries in answer or ():
            for entry_id, fields in entries:
                seq = int(_text(entry_id).split("-", 1)[0])
                events.append(RunEvent(seq, _text(fields[b"t"] if b"t" in fields else fields["t"]),
                                       json.loads(fields[b"d"] if b"d" in fields else fields["d"])))
        return events

    def _read_failed(self, exc: BaseException) -> EventLogUnavailable:
        self._on_error("read")
        self._warn_read.warning("event log: reading from Redis failed (%s)", type(exc).__name__)
        return unavailable(exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
