"""``Idempotency-Key``: the same key (from the same tenant) → the same run, not a second
LLM call.

The first request with a key inserts the run record holding the key and a hash of the
request; the unique key makes concurrent duplicates lose that insert. A duplicate with the
same hash gets the first run's result — waiting for it while it runs — instead of a second
LLM call; a different hash is a 409. Keys older than the retention window are forgotten.

Keys are per tenant: the stored key is ``<16 hex of sha256(tenant)>:<key>``, so two tenants
that pick the same key (``order-1001``) get two runs, and neither can replay, block or
learn about the other's.

A keyed run's process marks it alive every ``RunExecutor.heartbeat_s`` while it runs. A
duplicate that finds it running with no heartbeat for ``stale_after_s`` (its engine crashed
or was killed) marks it failed (``run_abandoned``), which frees the key, and runs the
request itself — instead of waiting for a run that will never end and answering 409 until
the key expires. A run this very process is running (or still recording) is never judged
by its heartbeat: its owner is right here, and a pause of the whole process (a long
collection, a starved CPU) that delayed the beat would have delayed the judge as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from flow_engine.config import Settings
from flow_engine.errors import Conflict, FlowgateError
from flow_engine.metrics import EngineMetrics
from flow_engine.runs.claims import ClaimWriter
from flow_engine.runs.request import PreparedRun, RunRequest
from flow_engine.store.base import FlowStore, RunRecord
from flowgate.common.backoff import Backoff

log = logging.getLogger(__name__)
_REUSED = ("this Idempotency-Key was used for a different request; use a new key for a new "
           "request")


def scoped_key(tenant: str, key: str) -> str:
    return f"{hashlib.sha256(tenant.encode()).hexdigest()[:16]}:{key}"


def request_hash(flow_id: str, request: RunRequest) -> str:
    blob = json.dumps([flow_id, request.input_value, request.input_type, request.output_type,
                       request.session_id, request.tweaks, request.version],
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Idempotency:
    stale_after_s = 20.0  # a running keyed run not marked alive for this long is abandoned

    def __init__(self, store: FlowStore, settings: Settings, metrics: EngineMetrics, *,
                 clock: Callable[[], datetime],
                 here: Callable[[str], bool] = lambda run_id: False) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._now = clock
        self._here = here  # is this run_id running (or being recorded) in this process?
        self.claims = ClaimWriter(store)  # concurrent claims share a transaction

    def claim(self, prepared: PreparedRun) -> None:
        """Insert the keyed run's record, or set ``prepared.replay`` to the run that holds
        the key (409 when it was used for another request)."""
        record = prepared.record
        existing = self.claims.claim(record)
        if existing is not None and self._expired(existing):
            self.store.delete_run(existing.run_id)
            existing = self.store.insert_run(record)
        if existing is not None and self._stale(existing):
            self._abandon(existing)
            existing = self._claim_again(prepared)
        if existing is not None:
            if existing.request_hash != record.request_hash:
                raise Conflict(_REUSED)
            prepared.replay = existing

    def replayed(self, prepared: PreparedRun) -> dict[str, Any] | None:
        """The earlier run's answer (waiting for it); None once this request holds the key
        (the run it waited for was abandoned) and must run itself."""
        while prepared.replay is not None:
            try:
                return self._replayed_result(prepared.replay)
            except _Abandoned:  # the run it waited for will never end: run it here
                existing = self._claim_again(prepared)
                if existing is not None and existing.request_hash != prepared.record.request_hash:
                    raise Conflict(_REUSED) from None
                prepared.replay = existing  # None: claimed; else another process took it over
        return None

    def _expired(self, record: RunRecord) -> bool:
        return record.created_at < self._now() - timedelta(seconds=self.settings.idempotency_ttl_s)

    def _stale(self, record: RunRecord) -> bool:
        """Running elsewhere, and not marked alive for stale_after_s (no heartbeat at all: a
        record from before heartbeats, never judged)."""
        return (record.status == "running" and record.heartbeat_at is not None
                and (self._now() - record.heartbeat_at).total_seconds() > self.stale_after_s
                and not self._here(record.run_id))

    def _abandon(self, record: RunRecord) -> None:
        silent = (self._now() - record.heartbeat_at).total_seconds()
        if self.store.abandon_run(record.run_id, record.heartbeat_at, {
                "status": 503, "code": "run_abandoned",
                "message": f"run {record.run_id} stopped without finishing (no sign of life "
                           f"from its engine for {silent:.0f} s); a retry runs it again"}):
            log.warning("run %s abandoned: no heartbeat for %.0f s; its Idempotency-Key is "
                        "free again", record.run_id, silent)
            self.metrics.runs.labels(record.flow_id, str(record.version), "failed").inc()

    def _claim_again(self, prepared: PreparedRun) -> RunRecord | None:
        """Insert the prepared run's record now (its key was freed): None when this request
        holds the key; else the record of whoever claimed it first."""
        record = prepared.record
        record.created_at = record.heartbeat_at = self._now()
        return self.store.insert_run(record)

    def _replayed_result(self, record: RunRecord) -> dict[str, Any]:
        self.metrics.idempotent_replays.inc()
        record = self._wait_until_finished(record)
        if record.status == "succeeded" and record.result is not None:
            return record.result
        error = record.error or {}
        raise StoredError(error.get("status", 502), error.get("code", "run_failed"),
                          error.get("message", f"run {record.run_id} ended {record.status}"))

    def _wait_until_finished(self, record: RunRecord) -> RunRecord:
        deadline = time.monotonic() + self.settings.idempotency_wait_s
        delays = Backoff(0.01, 0.2).delays()
        while record.status == "running":
            if self._stale(record):
                self._abandon(record)
                raise _Abandoned()
            if time.monotonic() > deadline:
                raise Conflict(f"run {record.run_id} with this Idempotency-Key is still running; "
                               "retry later", run_id=record.run_id)
            time.sleep(next(delays))  # cooperative under gevent
            record = self.store.get_run(record.run_id)
        return record


class _Abandoned(Exception):
    """The run a duplicate waited for was abandoned (its engine stopped)."""


class StoredError(FlowgateError):
    """An error replayed from an earlier run's record (same status and code)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code  # type: ignore[misc]
