"""The ends of runs, written to the store in small batches off the request path.

Writing a run's record after its answer (0.4–0.6 ms on SQLite) used to happen in the
connection's own greenlet, after the response: the client had its answer, but the next
request on that keep-alive connection waited for the write. Now the executor hands each
ended run here and moves on; one background writer takes whatever has queued, waits
``batch_s`` (a few ms) for more, and writes them all in one transaction
(``store.record_run_ends``).

- Until its batch is written, a run stays in the executor's ``unrecorded`` view, so
  ``GET /runs/{id}`` in this process answers it and heartbeats keep a keyed run alive.
- A keyed (idempotent) run's *claim* is not here: it is inserted before the run starts,
  synchronously (runs/idempotency.py). Only its end is batched.
- A batch that fails (a duplicate run id, the store down) is written again one run at a
  time through ``write_alone``, which retries a run the store cannot take in the
  background (RunExecutor): one bad record never costs the others theirs.
- ``flush()`` writes everything queued before returning; the engine calls it at exit
  (SIGTERM: gunicorn stops a worker gracefully, and atexit runs), so no ended run is lost
  to a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flow_engine.store.base import RunRecord

log = logging.getLogger(__name__)


@dataclass
class RunEnd:
    run_id: str
    insert: RunRecord | None  # an unkeyed run: its whole record
    finish: dict[str, Any] | None  # a keyed run: its end (status, duration_ms, result, error)
    write_alone: Callable[[], None]  # this end on its own, with retries (RunExecutor)


class RecordWriter:
    def __init__(self, store: Any, *, on_written: Callable[[list[str]], None],
                 batch_s: float = 0.002, max_batch: int = 500) -> None:
        self.store = store
        self.batch_s = batch_s
        self.max_batch = max_batch
        self._on_written = on_written  # run ids the store now has
        self._queue: list[RunEnd] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._writing = threading.Lock()  # one batch at a time (the writer, or a flush)
        self._thread: threading.Thread | None = None

    def submit(self, end: RunEnd) -> None:
        with self._lock:
            self._queue.append(end)
            if self._thread is None:
                self._thread = threading.Thread(target=self._forever, daemon=True,
                                                name="flowgate-record-writer")
                self._thread.start()
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def flush(self) -> None:
        """Write everything queued now, in this thread."""
        while self._write_batch():
            pass

    def _forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self.batch_s)  # cooperative under gevent: more ends join the batch
            try:
                while self._write_batch():
                    pass
            except Exception:  # never let the writer die; what failed was written alone
                log.exception("run record writer: a batch failed")

    def _write_batch(self) -> bool:
        """One batch; False when nothing was queued."""
        with self._writing:
            with self._lock:
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            if not batch:
                return False
            try:
                self.store.record_run_ends([e.insert for e in batch if e.insert is not None],
                                           [e.finish for e in batch if e.finish is not None])
            except Exception as exc:
                log.info("a batch of %d run records failed (%s); writing them one by one",
                         len(batch), type(exc).__name__)
                for end in batch:
                    end.write_alone()
            else:
                self._on_written([e.run_id for e in batch])
            return True
