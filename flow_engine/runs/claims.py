"""Keyed runs' claims, inserted together: one transaction for every claim that is waiting.

A run with an ``Idempotency-Key`` must hold its key in the store before it starts
(runs/idempotency.py): the claim is synchronous, and the ambassador puts a key on every run,
so every run through it pays for one write transaction before its first node. On SQLite, a
transaction of its own per run costs 0.3–0.8 ms of CPU under concurrency (two workers
taking the file's write lock in turn, a WAL frame per page per commit) — measured at c16,
a keyed run cost the engine as much as a third of its throughput.

So when claims have company, they go through one writer: a request queues its record and
waits; the writer takes everything queued and inserts it in one transaction
(``store.claim_runs``), then wakes each request. A request still waits for its own claim to
be committed before its run starts — the claim stays synchronous — but concurrent requests
share the commit: under gevent, every request that became ready in the same turn of the
event loop joins the batch.

Alone (concurrency 1), the hand-off to the writer costs more than it saves (0.15–0.2 ms a
claim), so a claim is written inline by its own request (``store.insert_run``, as before)
while the last batch held a single claim. Every ``probe_every``-th claim goes to the writer
anyway, and any claim that finds a batch forming or being written joins it: when load
comes, the probe's batch fills and batching is back on.

``claim_runs`` skips a record whose key (or run id) is taken instead of failing the batch;
only those few go on to ``store.insert_run``, which finds the key's holder (a replay, a
409) as a lone claim always did. When the store is unavailable (no connection, a lock or
pool wait ran out), every request of the batch gets that error at once — trying each claim
again alone would make each wait as long again. Any other failure of the batch is written
claim by claim, so one record the store refuses never costs another caller its run.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, TimeoutError

from flow_engine.store.base import RunRecord, StoreError

log = logging.getLogger(__name__)


class _Waiting:
    __slots__ = ("done", "error", "inserted", "record")

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.done = threading.Event()
        self.inserted = False
        self.error: StoreError | None = None  # the store is unavailable: this request's answer


class ClaimWriter:
    def __init__(self, store: Any, *, max_batch: int = 64, probe_every: int = 8) -> None:
        self.store = store
        self.max_batch = max_batch
        self.probe_every = probe_every
        self._queue: list[_Waiting] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._writing = False  # a batch is being written: newcomers join the next one
        self._company = False  # the last batch held more than one claim
        self._claims = 0

    def claim(self, record: RunRecord) -> RunRecord | None:
        """Insert ``record``; None when it now holds its key, else the record that holds it
        (``store.insert_run``'s answer)."""
        with self._lock:
            self._claims += 1
            batched = (self._company or self._writing or bool(self._queue)
                       or (self._claims - 1) % self.probe_every == 0)  # 1st, 9th, 17th, …
            if batched:
                waiting = _Waiting(record)
                self._queue.append(waiting)
                if self._thread is None:  # started on first use: after gunicorn forked
                    self._thread = threading.Thread(target=self._forever, daemon=True,
                                                    name="flowgate-claim-writer")
                    self._thread.start()
        if not batched:
            return self.store.insert_run(record)
        self._wake.set()
        waiting.done.wait()
        if waiting.inserted:
            return None
        if waiting.error is not None:
            raise waiting.error
        return self.store.insert_run(record)  # taken, or the batch failed: as a lone claim

    def _forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                while self._write_batch():
                    pass
            except Exception:  # never let the writer die: every claim waits on it
                log.exception("run claim writer: a batch failed")

    def _write_batch(self) -> bool:
        with self._lock:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            self._writing = bool(batch)
        if not batch:
            return False
        inserted: set[str] = set()
        unavailable: StoreError | None = None
        try:
            inserted = self.store.claim_runs([w.record for w in batch])
        except Exception as exc:
            if isinstance(exc, StoreError) and _unavailable(exc):
                unavailable = exc
            else:
                log.info("a batch of %d run claims failed (%s); each is written alone",
                         len(batch), type(exc).__name__)
        finally:  # whatever happened, no request is left waiting
            with self._lock:
                self._writing = False
                self._company = len(batch) > 1
            for waiting in batch:
                waiting.inserted = waiting.record.run_id in inserted
                waiting.error = unavailable
                waiting.done.set()
        return True


def _unavailable(exc: StoreError) -> bool:
    """The store could not be reached or waited on (as opposed to refusing a record)."""
    cause = exc.__cause__
    return isinstance(cause, OperationalError | DisconnectionError | TimeoutError) or (
        isinstance(cause, DBAPIError) and cause.connection_invalidated)
