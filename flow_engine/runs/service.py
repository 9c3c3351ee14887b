"""Run requests end to end, for the API: route and compile (cached), claim the
``Idempotency-Key``, run or stream, watch, read and cancel — each for one caller.

The ideas live in their own modules, and calls go one way (service → the rest):

    request.py       the validated request and the prepared run
    idempotency.py   same key, same run (per tenant); abandoned runs
    execute.py       admission, running, recording, heartbeats
    watch.py         records and events, and who may see them

Every tenant rule is applied here or in ``watch.ensure_visible``: a run, its events, its
chat history and its idempotency key belong to the tenant that started it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flow_engine.auth import Principal
from flow_engine.config import Settings
from flow_engine.errors import Conflict, RunNotFound
from flow_engine.metrics import EngineMetrics
from flow_engine.rollouts.outcomes import OutcomeRecorder
from flow_engine.runs.events import EventLogUnavailable, MemoryEventLog, RunEventLog
from flow_engine.runs.execute import RunExecutor
from flow_engine.runs.idempotency import Idempotency, request_hash, scoped_key
from flow_engine.runs.request import PreparedRun, RunRequest, known_run_id
from flow_engine.runs.runner import CancelToken, RunEvent
from flow_engine.runs.watch import RunWatcher, ensure_visible, run_record_json
from flow_engine.service import FlowService
from flow_engine.store.base import FlowStore, RunRecord
from flow_engine.tenants import TenantLimits, TenantPolicy
from flowgate.common.signals import Signals

if TYPE_CHECKING:
    from flowgate.common.otel import Telemetry

log = logging.getLogger(__name__)

__all__ = ["PreparedRun", "RunRequest", "RunService"]


class RunService:
    def __init__(self, flows: FlowService, store: FlowStore, settings: Settings,
                 metrics: EngineMetrics, events: RunEventLog | None = None,
                 signals: Signals | None = None, limits: TenantLimits | None = None,
                 clock: Callable[[], datetime] | None = None,
                 outcomes: OutcomeRecorder | None = None,
                 telemetry: Telemetry | None = None) -> None:
        self.flows = flows
        self.telemetry = telemetry
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.events = events or RunEventLog(MemoryEventLog())
        self.signals = signals
        self._now = clock or (lambda: datetime.now(UTC))
        limits = limits or TenantLimits(TenantPolicy.parse(0, 0, ""))
        self.executor = RunExecutor(store, metrics, self.events, limits, clock=self._now,
                                    record_retry_s=settings.record_retry_s,
                                    record_batch_s=settings.record_batch_s, outcomes=outcomes,
                                    telemetry=telemetry)
        self.idempotency = Idempotency(store, settings, metrics, clock=self._now,
                                       here=self._here)
        self.watcher = RunWatcher(store, self.events, settings)
        if signals is not None:
            signals.on("cancel", lambda message: self.executor.cancel_local(message.get("run_id", "")))

    def prepare(self, id_or_name: str, request: RunRequest, *, caller: Principal,
                idempotency_key: str | None, trace_id: str | None) -> PreparedRun:
        flow, version = self.flows.resolve(id_or_name, pinned=request.version,
                                           sticky_value=request.session_id, caller=caller)
        compiled = self.flows.compiled(flow, version, request.tweaks)
        prepared = PreparedRun(uuid.uuid4().hex, compiled, request, CancelToken(), caller)
        if self.telemetry is not None:  # the request's span, if recorded: the run's parent
            prepared.span_parent = self.telemetry.current()
        keyed = idempotency_key is not None
        prepared.record = RunRecord(
            run_id=prepared.run_id, flow_id=flow.id, version=version, status="running",
            created_at=self._now(), session_id=request.session_id, trace_id=trace_id,
            idempotency_key=scoped_key(caller.tenant, idempotency_key) if keyed else None,
            request_hash=request_hash(flow.id, request) if keyed else None,
            heartbeat_at=self._now() if keyed else None, tenant=caller.tenant,
        )
        if keyed:  # plain runs are recorded once, complete, when they end: one write per run
            claiming = time.perf_counter()
            self.idempotency.claim(prepared)
            prepared.claim_s = time.perf_counter() - claiming
        return prepared

    def run(self, prepared: PreparedRun) -> tuple[dict[str, Any], bool]:
        """The run's response body and whether it was replayed from an earlier run."""
        replayed = self.idempotency.replayed(prepared)
        if replayed is not None:
            return replayed, True
        return self.executor.run(prepared), False

    def stream(self, prepared: PreparedRun, keepalive_s: float, *,
               cancel_on_disconnect: bool = True) -> Iterator[RunEvent | None]:
        """The run's events as they happen; a replayed key streams the earlier run's."""
        if prepared.replay is not None:
            return self.watcher.watch(prepared.replay.run_id, 0, keepalive_s, prepared.caller)
        return self.executor.stream(prepared, keepalive_s,
                                    cancel_on_disconnect=cancel_on_disconnect)

    def watch(self, run_id: str, after: int, keepalive_s: float,
              caller: Principal) -> Iterator[RunEvent | None]:
        _known(run_id)
        return self.watcher.watch(run_id, after, keepalive_s, caller)

    def _here(self, run_id: str) -> bool:
        """This process is running the run, or writing its end."""
        return (self.executor.active(run_id) or self.executor.unrecorded(run_id)) is not None

    def get(self, run_id: str, caller: Principal) -> dict[str, Any]:
        _known(run_id)
        here = self.executor.active(run_id) or self.executor.unrecorded(run_id)
        if here is not None and here.record is not None:
            ensure_visible(caller, here.tenant, run_id)
            return run_record_json(here.record)  # running here, or ended and being recorded
        return self.watcher.record(run_id, caller)

    def cancel(self, run_id: str, caller: Principal) -> dict[str, Any]:
        _known(run_id)
        active = self.executor.active(run_id)
        if active is not None:
            ensure_visible(caller, active.tenant, run_id)
            active.cancel.cancel("cancelled by API request")
            return {"run_id": run_id, "status": "cancelling"}
        try:
            record = self.store.get_run(run_id)
        except RunNotFound:
            started = self.watcher.started_elsewhere(run_id)  # plain runs are recorded at the end
            if started is None:
                raise
            ensure_visible(caller, started[1], run_id)
        else:
            ensure_visible(caller, record.tenant, run_id)
            if record.status != "running":
                raise Conflict(f"run {run_id} already ended ({record.status})", run_id=run_id)
        if self.signals is not None:
            if self.signals.publish("cancel", run_id=run_id):
                return {"run_id": run_id, "status": "cancelling"}
            raise EventLogUnavailable(f"run {run_id} is running in another engine process, and "
                                      "the shared Redis that would reach it is unavailable; "
                                      "retry shortly", run_id=run_id)
        raise Conflict(f"run {run_id} is running in another engine process; cancelling it "
                       "there needs REDIS_URL", run_id=run_id)


def _known(run_id: str) -> None:
    if not known_run_id(run_id):
        raise RunNotFound(f"no run '{run_id[:64]}'" if run_id.isprintable() and run_id.isascii()
                          else "no such run")
