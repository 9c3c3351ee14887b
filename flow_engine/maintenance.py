"""The maintenance job: what keeps the store true and bounded over time.

Each pass, in this order:

1. **Reap** run records no process will finish: keyed runs still ``running`` whose owner has
   not marked them alive for ``run_stale_s`` (its engine died, or its end could not be
   written), and runs ``running`` without a heartbeat for longer than ``run_max_s``. They
   become ``failed`` with code ``run_abandoned`` and their ``Idempotency-Key`` is freed, so
   readers get an outcome instead of "running" (or a 409) for ever.
2. **Retention**: delete finished runs older than ``run_retention_s`` (but never before their
   ``Idempotency-Key`` expires), chat messages older than ``chat_retention_s``, and run
   outcomes (canary analysis, flow_engine/rollouts/outcomes.py) older than the longest window.

Every process starts the job (at start, then every ``maintenance_interval_s``; 0 turns it
off), but a pass runs in one process at a time: it first claims the job in the store
(``SqlFlowStore.claim_job``: a row lock on PostgreSQL, the write lock on SQLite), which
fails while another process ran it less than half an interval ago. Deletes go in batches of
``BATCH`` rows, each its own short transaction. Metrics: ``runs_reaped``,
``retention_deleted{kind}``, ``maintenance_runs{result}``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from flow_engine.config import Settings
from flow_engine.errors import FlowgateError
from flow_engine.metrics import EngineMetrics
from flow_engine.rollouts.outcomes import KEEP_S, slot_of

log = logging.getLogger(__name__)
JOB = "maintenance"
BATCH = 1000
MAX_BATCHES = 1000  # per kind and pass: a huge backlog is worked off over several passes


class Maintenance:
    def __init__(self, store: Any, settings: Settings, metrics: EngineMetrics, *,
                 clock: Callable[[], datetime] | None = None, batch: int = BATCH) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.batch = batch
        self._now = clock or (lambda: datetime.now(UTC))
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[str, int] | None:
        """One pass, if this process gets the job; what it did, or None (another had it)."""
        at = self._now()
        if not self.store.claim_job(JOB, self.settings.maintenance_interval_s / 2, at):
            self.metrics.maintenance_runs.labels("skipped").inc()
            return None
        done = {"reaped": self._reap(at)}
        runs_kept = max(self.settings.run_retention_s, self.settings.idempotency_ttl_s)
        done["runs"] = self._delete("runs", self.store.delete_runs_before,
                                    at - timedelta(seconds=runs_kept))
        done["chat_messages"] = self._delete("chat_messages", self.store.delete_chat_before,
                                             at - timedelta(seconds=self.settings.chat_retention_s))
        done["outcomes"] = self._delete("outcomes", self.store.delete_outcomes_before,
                                        slot_of(at.timestamp() - KEEP_S))
        self.metrics.maintenance_runs.labels("done").inc()
        if any(done.values()):
            log.info("maintenance: %d runs marked failed, %d runs and %d chat messages deleted",
                     done["reaped"], done["runs"], done["chat_messages"])
        return done

    def _reap(self, at: datetime) -> int:
        stale_s, max_s = self.settings.run_stale_s, self.settings.run_max_s
        error = {"status": 503, "code": "run_abandoned",
                 "message": "the run stopped without its end being recorded (its engine "
                            f"process gave no sign of life for {stale_s:g} s, or it ran longer "
                            f"than {max_s:g} s); a retry runs it again"}
        total = 0
        for _ in range(MAX_BATCHES):
            reaped = self.store.reap_runs(stale_before=at - timedelta(seconds=stale_s),
                                          running_before=at - timedelta(seconds=max_s),
                                          error=error, at=at, batch=self.batch)
            for run_id, flow_id, version in reaped:
                log.warning("run %s marked failed: no process owns it any more", run_id)
                self.metrics.runs.labels(flow_id, str(version), "failed").inc()
            self.metrics.runs_reaped.inc(len(reaped))
            total += len(reaped)
            if len(reaped) < self.batch:
                break
        return total

    def _delete(self, kind: str, delete: Callable[..., int], cutoff: datetime) -> int:
        total = 0
        for _ in range(MAX_BATCHES):
            deleted = delete(cutoff, batch=self.batch)
            self.metrics.retention_deleted.labels(kind).inc(deleted)
            total += deleted
            if deleted < self.batch:
                break
        return total

    # -- in the background ------------------------------------------------------------------

    def start(self) -> None:
        """Run a pass now and then every ``maintenance_interval_s`` (a thread; a greenlet
        under gevent). A failed pass is logged and tried again at the next interval."""
        if self._thread is None and self.settings.maintenance_interval_s > 0:
            self._thread = threading.Thread(target=self._forever, name="flowgate-maintenance",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _forever(self) -> None:
        while not self._stopped.is_set():
            try:
                self.run_once()
            except FlowgateError as exc:
                self.metrics.maintenance_runs.labels("failed").inc()
                log.warning("maintenance: pass failed (%s); next try in %g s", exc.code,
                            self.settings.maintenance_interval_s)
            except Exception:
                self.metrics.maintenance_runs.labels("failed").inc()
                log.exception("maintenance: pass failed")
            self._stopped.wait(self.settings.maintenance_interval_s)
