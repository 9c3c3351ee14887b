"""Per-version run outcomes shared by every engine process: what canary analysis reads.

Each run's end is recorded here (``record``: a dict update under a lock, a few µs — the
run does not wait for any I/O). A background thread adds what was recorded to a shared
window every ``flush_s``:

- with ``REDIS_URL``: one hash per (flow, version, 5-second slot),
  ``flowgate:outcomes2:<flow>:<version>:<slot>`` with fields ``ok``, ``failed`` and ``h0``..
  ``h63`` (the duration histogram of flow_engine/rollouts/analysis.py; only the buckets a
  run fell in are there), added with HINCRBY in one pipeline and expiring after the
  longest window a guard may ask for. (``flowgate:outcomes:`` held 12 coarser buckets: an
  engine of that layout and one of this never add into each other's hashes.)
- without: rows of the store's ``run_outcome_slots`` table (one upsert per flow, version
  and slot, a column per bucket), deleted by the maintenance job past the same age.
  (``run_outcomes`` held the 12 coarser buckets: likewise never shared with an engine of
  that layout — flow_engine/store/schema.py, migration 9.)

Reading a window sums its slots (``window``). A failure is a run that failed with a 5xx
(LLM error, timeout, node error); runs refused for bad input (4xx) and cancelled runs are
not outcomes. A flush that fails keeps its counts for the next one (bounded: counts older
than the longest window are dropped), so a Redis blip loses nothing a guard would read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flow_engine.rollouts.analysis import BUCKETS, Outcomes
from flowgate.common.lograte import Throttled

log = logging.getLogger(__name__)
SLOT_S = 5
MAX_WINDOW_S = 3600  # the longest guard window (flow_engine/rollouts/analysis.py)
KEEP_S = MAX_WINDOW_S + 2 * SLOT_S
PREFIX = "flowgate:outcomes2:"  # the 64 buckets of analysis.BUCKETS ("flowgate:outcomes:": 12)
MAX_PENDING = 50_000  # (flow, version, slot) counts held while the shared window is down

Key = tuple[str, int, int]  # flow id, version, slot


def slot_of(at: float) -> int:
    return int(at // SLOT_S)


def counts_failure(status: str, error: dict[str, Any] | None) -> bool | None:
    """Whether a run's end is a failure for canary analysis; None: not an outcome."""
    if status == "succeeded":
        return False
    if status != "failed":
        return None  # cancelled
    code = (error or {}).get("status", 500)
    return None if isinstance(code, int) and 400 <= code < 500 else True


class RedisWindow:
    def __init__(self, client: Any) -> None:
        self.client = client

    def add(self, batch: dict[Key, Outcomes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for (flow_id, version, slot), o in batch.items():
            key = f"{PREFIX}{flow_id}:{version}:{slot}"
            if o.ok:
                pipe.hincrby(key, "ok", o.ok)
            if o.failed:
                pipe.hincrby(key, "failed", o.failed)
            for i, n in enumerate(o.histogram):
                if n:
                    pipe.hincrby(key, f"h{i}", n)
            pipe.expire(key, KEEP_S)
        pipe.execute()

    def read(self, flow_id: str, version: int, first: int, last: int) -> Outcomes:
        pipe = self.client.pipeline(transaction=False)
        for slot in range(first, last + 1):
            pipe.hgetall(f"{PREFIX}{flow_id}:{version}:{slot}")
        total = Outcomes()
        for fields in pipe.execute():  # only the buckets a run fell in: a few of the 64
            for name, value in fields.items():
                name = _text(name)
                if name == "ok":
                    total.ok += int(value)
                elif name == "failed":
                    total.failed += int(value)
                elif name[1:].isdigit() and int(name[1:]) < len(BUCKETS):
                    total.histogram[int(name[1:])] += int(value)
        return total


def _text(key: str | bytes) -> str:
    return key.decode() if isinstance(key, bytes) else key


class StoreWindow:
    def __init__(self, store: Any) -> None:
        self.store = store

    def add(self, batch: dict[Key, Outcomes]) -> None:
        self.store.add_outcomes([(f, v, s, o.ok, o.failed, o.histogram)
                                 for (f, v, s), o in batch.items()])

    def read(self, flow_id: str, version: int, first: int, last: int) -> Outcomes:
        ok, failed, histogram = self.store.read_outcomes(flow_id, version, first, last)
        return Outcomes(ok, failed, histogram)


class OutcomeRecorder:
    """Records run outcomes in this process and adds them to the shared window."""

    def __init__(self, window: RedisWindow | StoreWindow, *, flush_s: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 on_error: Callable[[], None] | None = None) -> None:
        self.shared = window
        self.flush_s = flush_s
        self._clock = clock
        self._on_error = on_error or (lambda: None)
        self._pending: dict[Key, Outcomes] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._warn = Throttled(log)

    def record(self, flow_id: str, version: int, failed: bool, seconds: float) -> None:
        key = (flow_id, version, slot_of(self._clock()))
        with self._lock:
            outcomes = self._pending.get(key)
            if outcomes is None:
                outcomes = self._pending[key] = Outcomes()
            outcomes.add(failed, seconds)

    def flush(self) -> bool:
        """Add what this process recorded to the shared window; False when that failed
        (the counts are kept for the next flush)."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return True
            try:
                self.shared.add(batch)
                return True
            except Exception as exc:
                self._on_error()
                self._warn.warning("outcomes: could not add %d counts to the shared window "
                                   "(%s); keeping them for the next try", len(batch),
                                   type(exc).__name__)
                self._keep(batch)
                return False

    def _keep(self, batch: dict[Key, Outcomes]) -> None:
        oldest = slot_of(self._clock() - KEEP_S)
        with self._lock:
            for key, outcomes in batch.items():
                if key[2] < oldest:
                    continue
                mine = self._pending.get(key)
                if mine is None:
                    if len(self._pending) >= MAX_PENDING:
                        continue
                    self._pending[key] = outcomes
                else:
                    mine.merge(outcomes)

    def window(self, flow_id: str, version: int, since: float, until: float) -> Outcomes:
        """Outcomes of a version from every process, in the slots from ``since`` to
        ``until`` (this process's own recent ones flushed first)."""
        self.flush()
        return self.shared.read(flow_id, version, slot_of(max(since, until - KEEP_S)),
                                slot_of(until))

    # -- in the background ------------------------------------------------------------------

    def start(self) -> None:
        """Flush every ``flush_s`` (0: only when a window is read, and at stop)."""
        if self._thread is None and self.flush_s > 0:
            self._thread = threading.Thread(target=self._forever, name="flowgate-outcomes",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self.flush()

    def _forever(self) -> None:
        while not self._stopped.wait(self.flush_s):
            self.flush()
