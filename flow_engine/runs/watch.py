"""Reading runs: their records, their events (replay + live tail), and who may see them.

Every read of a run goes through :func:`ensure_visible`: a run belongs to the tenant that
started it (``flow_engine/auth.py``), and any other tenant gets exactly the answer a run
that never existed gets — ``404 run_not_found``, same message — so ids cannot be probed.
The tenant comes from the event log (``owner``, written before a run's first event, shared
through Redis) or, for a run whose events are gone or not yet written, from its record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flow_engine.auth import Principal
from flow_engine.config import Settings
from flow_engine.errors import Conflict, RunNotFound
from flow_engine.runs.events import TERMINAL, EventLogUnavailable, RunEventLog
from flow_engine.runs.runner import RunEvent
from flow_engine.store.base import FlowStore, RunRecord


def ensure_visible(caller: Principal, tenant: str | None, run_id: str) -> None:
    if not caller.owns(tenant):
        raise RunNotFound(f"no run '{run_id}'")


class RunWatcher:
    def __init__(self, store: FlowStore, events: RunEventLog, settings: Settings) -> None:
        self.store = store
        self.events = events
        self.settings = settings

    # -- events ---------------------------------------------------------------------------------

    def watch(self, run_id: str, after: int, keepalive_s: float,
              caller: Principal) -> Iterator[RunEvent | None]:
        """Replay the run's events after ``after`` and tail them until its last event.
        Raises RunNotFound (also for another tenant's run) / Conflict when no log has them
        (see ``_missing_events``), at the first ``next()``, before any event."""
        first = self.events.read(run_id, after, 0)
        if first is None:
            first = self._await_shared_events(run_id, after)
        if first is None:
            yield from self._missing_events(run_id, after, caller)
            return
        ensure_visible(caller, self._owner(run_id), run_id)
        pending: list[RunEvent] | None = first
        while True:
            for event in pending:
                yield event
                after = event.seq or after
                if event.type in TERMINAL:
                    return
            try:
                if not pending and self.events.finished(run_id):
                    # The last event is logged — but it may have landed after the read that
                    # came back empty: read once more before concluding the watcher is at
                    # or past the end (else a resume could miss the run's last events).
                    pending = self.events.read(run_id, after, 0)
                    if not pending:
                        return
                    continue
                pending = self.events.read(run_id, after, keepalive_s)
                if pending is None:  # expired while we watched
                    return
                if not pending and not self.events.finished(run_id):
                    yield None
            except EventLogUnavailable:  # mid-stream: say so, never just stop
                yield log_unavailable_event(run_id, after)
                return

    def _owner(self, run_id: str) -> str | None:
        """The run's tenant: from the event log, else from its record (None: unknown)."""
        owner = self.events.owner(run_id)
        if owner is not None:
            return owner
        try:
            return self.store.get_run(run_id).tenant
        except RunNotFound:
            return None

    def _await_shared_events(self, run_id: str, after: int) -> list[RunEvent] | None:
        """A run just started in another process may not have reached Redis yet (its events
        are written in the background): give it a moment before calling it unknown."""
        if self.events.shared is None:
            return None
        deadline = time.monotonic() + self.settings.shared_events_grace_s
        while True:  # a last look at the deadline, however late: a late wake-up is no miss
            time.sleep(max(0.0, min(0.05, deadline - time.monotonic())))
            try:
                self.store.get_run(run_id)
                return None  # on record: _missing_events knows what to say
            except RunNotFound:
                pass
            events = self.events.read(run_id, after, 0)
            if events is not None:
                return events
            if time.monotonic() >= deadline:
                return None

    def _missing_events(self, run_id: str, after: int, caller: Principal) -> Iterator[RunEvent]:
        record = self.store.get_run(run_id)  # RunNotFound for a run that never existed
        ensure_visible(caller, record.tenant, run_id)
        if (after > 0 and record.status != "running" and self.events.shared is not None
                and record.finished_at is not None and self._recent(record.finished_at)):
            # A resumer already has events of a run that ended moments ago, yet Redis has
            # none: they are still queued in the writer of the process that ran it (Redis
            # was away a moment ago). "Retry shortly" gets them all; the outcome alone
            # now would skip the ones in between.
            raise EventLogUnavailable(
                f"the events of run {run_id} after {after} have not reached the shared event "
                "log yet; retry shortly", run_id=run_id)
        if record.status == "running" and self.events.shared is not None:
            raise EventLogUnavailable(
                f"run {run_id} is running in another engine process, but the shared event log "
                "(Redis) has none of its events: they were lost or have not arrived yet; "
                "retry shortly", run_id=run_id)
        if record.status == "running":
            raise Conflict(f"run {run_id} is running in another engine process and its events "
                           "are not shared; set REDIS_URL to watch runs from any process",
                           run_id=run_id)
        yield final_event(record)  # the events expired; the outcome is still on record

    def _recent(self, finished_at: datetime) -> bool:
        """Ended within the time a writer keeps retrying events (plus a margin)?"""
        window = self.settings.event_write_retry_s + 5.0
        return (datetime.now(UTC) - finished_at).total_seconds() < window

    # -- records --------------------------------------------------------------------------------

    def record(self, run_id: str, caller: Principal) -> dict[str, Any]:
        """The run's record as JSON, or a run of another process not on record yet."""
        try:
            record = self.store.get_run(run_id)
        except RunNotFound:
            started = self.started_elsewhere(run_id)
            if started is None:
                raise
            ensure_visible(caller, started[1], run_id)
            return started[0]
        ensure_visible(caller, record.tenant, run_id)
        return run_record_json(record)

    def started_elsewhere(self, run_id: str) -> tuple[dict[str, Any], str | None] | None:
        """A run of another process that is not on record yet (plain runs are written when
        they end) but whose events are in the shared log: its summary and its tenant.
        Raises EventLogUnavailable when that log cannot be asked: "no such run" would be
        a guess."""
        events = self.events.read(run_id, 0, 0)
        owner = self.events.owner(run_id) if events else None
        if not events or events[0].type != "run_started":
            return None
        head = events[0].data
        return ({"run_id": run_id, "flow_id": head.get("flow_id"), "version": head.get("version"),
                 "status": "running", "session_id": head.get("session_id")}, owner)


def log_unavailable_event(run_id: str, after: int) -> RunEvent:
    """The ``error`` that ends a watch whose shared event log stopped answering mid-stream;
    the run itself may go on, so the message says how to resume. Seq 0: not a run event."""
    return RunEvent(0, "error", {
        "code": "event_log_unavailable", "node": None, "run_id": run_id, "last_event_id": after,
        "message": f"the shared event log (Redis) stopped answering while run {run_id} was "
                   f"followed; reconnect with Last-Event-ID: {after} to resume"})


def final_event(record: RunRecord) -> RunEvent:
    """The outcome of a run whose events are gone, as its last event. Its seq is 0: the
    real number is unknown, so SSE sends it without an ``id:``."""
    if record.status == "succeeded" and record.result is not None:
        return RunEvent(0, "run_finished", record.result)
    error = dict(record.error or {"code": "run_failed", "message": f"run ended {record.status}"})
    error.pop("status", None)
    error.pop("run_id", None)
    error.setdefault("node", None)
    return RunEvent(0, "error", error)


def run_record_json(record: RunRecord) -> dict[str, Any]:
    body = {
        "run_id": record.run_id, "flow_id": record.flow_id, "version": record.version,
        "status": record.status, "session_id": record.session_id, "trace_id": record.trace_id,
        "created_at": record.created_at.isoformat(),
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        "duration_ms": record.duration_ms,
    }
    if record.result is not None:
        body["output"] = record.result.get("output")
        body["result"] = record.result
    if record.error is not None:
        body["error"] = {k: v for k, v in record.error.items() if k != "status"}
    return body
