"""Run requests end to end: pick the version, compile (cached), record the run, run it,
and honour ``Idempotency-Key``.

Records: a run without a key is written once, complete, when it ends (while it runs, this
process answers for it); a run with a key is inserted when it starts and updated at the end.

Idempotency: the first request with a key inserts the run record holding the key and a hash
of the request; the unique key makes concurrent duplicates lose that insert. A duplicate
with the same hash gets the first run's result — waiting for it while it runs — instead of
a second LLM call; a different hash is a 409. Keys older than the retention window are
forgotten. Flow rows and compiled graphs come from caches, so a plain run reads nothing.

A keyed run's process marks it alive every ``heartbeat_s`` while it runs. A duplicate that
finds it running with no heartbeat for ``stale_after_s`` (its engine crashed or was killed)
marks it failed (``run_abandoned``), which frees the key, and runs the request itself —
instead of waiting for a run that will never end and answering 409 until the key expires.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flow_engine.config import Settings
from flow_engine.errors import BadRequest, Conflict, FlowgateError, RunFailed, RunNotFound
from flow_engine.flows.compile import CompiledFlow
from flow_engine.metrics import EngineMetrics
from flow_engine.runs import runner
from flow_engine.runs.events import TERMINAL, EventLogUnavailable, MemoryEventLog, RunEventLog
from flow_engine.runs.runner import CancelToken, RunEvent, RunInput, RunResult
from flow_engine.service import FlowService
from flow_engine.signals import Signals
from flow_engine.store.base import ChatMessage, FlowStore, RunRecord

log = logging.getLogger(__name__)
_TYPES = ("chat", "text", "any")
MAX_INPUT_CHARS = 1_000_000


@dataclass(frozen=True)
class RunRequest:
    """LangFlow's run body plus Flowgate's ``version`` pin, validated."""

    input_value: str | None
    input_type: str
    output_type: str
    session_id: str | None
    tweaks: dict[str, Any] | None
    version: int | None

    @classmethod
    def from_body(cls, body: Any) -> RunRequest:
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise BadRequest("the run body must be a JSON object like "
                             '{"input_value": "hello", "session_id": "s1"}')
        value = body.get("input_value")
        if value is not None and not isinstance(value, str):
            raise BadRequest("input_value must be a string")
        if value is not None and len(value) > MAX_INPUT_CHARS:
            raise BadRequest(f"input_value is longer than {MAX_INPUT_CHARS} characters")
        kinds = {}
        for name in ("input_type", "output_type"):
            kind = body.get(name) or "chat"
            if kind == "debug":
                kind = "any"
            if kind not in _TYPES:
                raise BadRequest(f"{name} must be one of {', '.join(_TYPES)}")
            kinds[name] = kind
        session = body.get("session_id")
        if session is not None and (not isinstance(session, str) or not 0 < len(session) <= 200):
            raise BadRequest("session_id must be a string of 1-200 characters")
        tweaks = body.get("tweaks")
        if tweaks is not None and not isinstance(tweaks, dict):
            raise BadRequest("tweaks must be an object {node_id: {param: value}}")
        version = body.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                    or version < 1):
            raise BadRequest("version must be a positive integer")
        return cls(value, kinds["input_type"], kinds["output_type"], session, tweaks or None,
                   version)

    def run_input(self) -> RunInput:
        return RunInput(self.input_value, self.input_type, self.output_type, self.session_id)


@dataclass
class PreparedRun:
    run_id: str
    compiled: CompiledFlow
    request: RunRequest
    cancel: CancelToken
    replay: RunRecord | None = None  # set when an earlier run with this key answers
    record: RunRecord | None = None
    # When set, the end-of-run store write is handed to this (the API passes the response's
    # call_on_close, so the client has its answer before the write happens).
    defer: Callable[[Callable[[], None]], None] | None = None
    started_at: float = 0.0
    first_token_at: float | None = None


class RunService:
    heartbeat_s = 5.0  # how often a process marks its running keyed runs alive
    stale_after_s = 20.0  # a running keyed run not marked alive for this long is abandoned

    def __init__(self, flows: FlowService, store: FlowStore, settings: Settings,
                 metrics: EngineMetrics, events: RunEventLog | None = None,
                 signals: Signals | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.flows = flows
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.events = events or RunEventLog(MemoryEventLog())
        self.signals = signals
        self._now = clock or (lambda: datetime.now(UTC))
        self._active: dict[str, PreparedRun] = {}
        self._series: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._heartbeats: threading.Thread | None = None
        if signals is not None:
            signals.on("cancel", lambda message: self._cancel_local(message.get("run_id", "")))

    def prepare(self, id_or_name: str, request: RunRequest, *, idempotency_key: str | None,
                trace_id: str | None) -> PreparedRun:
        flow, version = self.flows.resolve(id_or_name, pinned=request.version,
                                           sticky_value=request.session_id)
        compiled = self.flows.compiled(flow, version, request.tweaks)
        prepared = PreparedRun(uuid.uuid4().hex, compiled, request, CancelToken())
        record = RunRecord(
            run_id=prepared.run_id, flow_id=flow.id, version=version, status="running",
            created_at=self._now(), session_id=request.session_id, trace_id=trace_id,
            idempotency_key=idempotency_key,
            request_hash=_request_hash(flow.id, request) if idempotency_key else None,
            heartbeat_at=self._now() if idempotency_key else None,
        )
        prepared.record = record
        if idempotency_key is None:
            return prepared  # recorded once, complete, when it ends: one write per run
        existing = self.store.insert_run(record)
        if existing is not None and self._expired(existing):
            self.store.delete_run(existing.run_id)
            existing = self.store.insert_run(record)
        if existing is not None and self._stale(existing):
            self._abandon(existing)
            existing = self._claim(prepared)
        if existing is not None:
            if existing.request_hash != record.request_hash:
                raise Conflict("this Idempotency-Key was used for a different request; "
                               "use a new key for a new request")
            prepared.replay = existing
        return prepared

    def _expired(self, record: RunRecord) -> bool:
        return record.created_at < self._now() - timedelta(seconds=self.settings.idempotency_ttl_s)

    # -- plain runs --------------------------------------------------------------------------

    def run(self, prepared: PreparedRun) -> tuple[dict[str, Any], bool]:
        """The run's response body and whether it was replayed from an earlier run."""
        while prepared.replay is not None:
            try:
                return self._replayed_result(prepared.replay), True
            except _Abandoned:  # the run it waited for will never end: run it here
                existing = self._claim(prepared)
                if existing is not None and existing.request_hash != prepared.record.request_hash:
                    raise Conflict("this Idempotency-Key was used for a different request; "
                                   "use a new key for a new request") from None
                prepared.replay = existing  # None: claimed; else another process took it over
        counter = itertools.count(1)

        def emit(kind: str, data: dict[str, Any]) -> None:
            self._log_event(prepared, RunEvent(next(counter), kind, data))

        result = self._execute(prepared, emit, stream_tokens=False)
        return result.as_dict(), False

    def _log_event(self, prepared: PreparedRun, event: RunEvent) -> None:
        """Every event goes to the event log (watchable, resumable); the first token of a
        run is its time to first token."""
        if event.type == "token" and prepared.first_token_at is None:
            prepared.first_token_at = time.perf_counter()
            self.metrics.ttft.labels(prepared.compiled.flow_id).observe(
                prepared.first_token_at - prepared.started_at)
        self.events.append(prepared.run_id, event)

    def _execute(self, prepared: PreparedRun, emit, *, stream_tokens: bool) -> RunResult:
        compiled = prepared.compiled
        with self._lock:
            self._active[prepared.run_id] = prepared
        if prepared.record is not None and prepared.record.idempotency_key is not None:
            self._start_heartbeats()
        self.metrics.active_runs.inc()
        started = prepared.started_at = time.perf_counter()
        try:
            result = runner.execute(
                compiled, prepared.request.run_input(), emit=emit, run_id=prepared.run_id,
                cancel=prepared.cancel, stream_tokens=stream_tokens)
        except FlowgateError as exc:
            exc.details.setdefault("run_id", prepared.run_id)  # so the caller can look it up
            status = "cancelled" if exc.code == "run_cancelled" else "failed"
            self._finish(prepared, status, time.perf_counter() - started, None,
                         {"status": exc.status, **exc.to_dict()})
            raise
        except BaseException as exc:
            self._finish(prepared, "failed", time.perf_counter() - started, None,
                         {"status": 500, "code": "internal", "message": "internal error"})
            raise RunFailed("the run failed unexpectedly") from exc
        self._finish(prepared, "succeeded", time.perf_counter() - started, result, None)
        return result

    def _finish(self, prepared: PreparedRun, status: str, seconds: float,
                result: RunResult | None, error: dict[str, Any] | None) -> None:
        compiled = prepared.compiled
        with self._lock:
            self._active.pop(prepared.run_id, None)
        m = self.metrics
        m.active_runs.dec()
        version = str(compiled.version)
        if (compiled.flow_id, version) not in self._series:
            # every outcome's series exists from a version's first run, so rate() sees the
            # first failure too (a series born at 1 has no increase to show)
            self._series.add((compiled.flow_id, version))
            for outcome in ("succeeded", "failed", "cancelled"):
                m.runs.labels(compiled.flow_id, version, outcome)
        m.runs.labels(compiled.flow_id, version, status).inc()
        m.run_duration.labels(compiled.flow_id).observe(seconds)
        if result is not None:
            for node, ms in result.nodes.items():
                m.node_duration.labels(compiled.flow_id, compiled.node_types[node]).observe(ms / 1000)
            m.llm_tokens.labels(compiled.flow_id, "input").inc(result.usage["input_tokens"])
            m.llm_tokens.labels(compiled.flow_id, "output").inc(result.usage["output_tokens"])
            self._remember_chat(prepared, result)
        duration_ms = round(seconds * 1000, 3)
        body = result.as_dict() if result else None
        if prepared.defer is not None:
            prepared.defer(lambda: self._record_end(prepared, status, duration_ms, body, error))
        else:
            self._record_end(prepared, status, duration_ms, body, error)

    def _record_end(self, prepared: PreparedRun, status: str, duration_ms: float,
                    body: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        try:
            record = prepared.record
            if record is not None and record.idempotency_key is None:
                record.status, record.duration_ms, record.result, record.error = (
                    status, duration_ms, body, error)
                record.finished_at = self._now()
                self.store.insert_run(record)
            else:
                self.store.finish_run(prepared.run_id, status=status, duration_ms=duration_ms,
                                      result=body, error=error)
        except FlowgateError:
            # The client still gets its answer; the record stays "running" and says so.
            log.exception("could not record the end of run %s", prepared.run_id)

    def _remember_chat(self, prepared: PreparedRun, result: RunResult) -> None:
        session = prepared.request.session_id
        if not session or "ChatHistory" not in prepared.compiled.node_types.values():
            return
        turn = [ChatMessage("human", prepared.request.input_value or ""),
                ChatMessage("ai", result.output or "")]
        try:
            self.store.append_chat(session, prepared.compiled.flow_id, turn)
        except FlowgateError:
            log.exception("could not store chat history for session %s", session)

    # -- keyed runs whose engine stopped ------------------------------------------------------

    def _stale(self, record: RunRecord) -> bool:
        """Running, and not marked alive for stale_after_s (no heartbeat at all: a record
        from before heartbeats, never judged)."""
        return (record.status == "running" and record.heartbeat_at is not None
                and (self._now() - record.heartbeat_at).total_seconds() > self.stale_after_s)

    def _abandon(self, record: RunRecord) -> None:
        silent = (self._now() - record.heartbeat_at).total_seconds()
        if self.store.abandon_run(record.run_id, record.heartbeat_at, {
                "status": 503, "code": "run_abandoned",
                "message": f"run {record.run_id} stopped without finishing (no sign of life "
                           f"from its engine for {silent:.0f} s); a retry runs it again"}):
            log.warning("run %s abandoned: no heartbeat for %.0f s; its Idempotency-Key is "
                        "free again", record.run_id, silent)
            self.metrics.runs.labels(record.flow_id, str(record.version), "failed").inc()

    def _claim(self, prepared: PreparedRun) -> RunRecord | None:
        """Insert the prepared run's record now (its key was freed): None when this request
        holds the key; else the record of whoever claimed it first."""
        record = prepared.record
        record.created_at = record.heartbeat_at = self._now()
        return self.store.insert_run(record)

    def _start_heartbeats(self) -> None:
        if self._heartbeats is not None:
            return
        with self._lock:
            if self._heartbeats is None:
                self._heartbeats = threading.Thread(target=self._beat, name="flowgate-heartbeat",
                                                    daemon=True)
                self._heartbeats.start()

    def _beat(self) -> None:
        """Every heartbeat_s, mark this process's running keyed runs alive (one write)."""
        while True:
            time.sleep(self.heartbeat_s)  # cooperative under gevent
            with self._lock:
                keyed = [run_id for run_id, p in self._active.items()
                         if p.record is not None and p.record.idempotency_key is not None]
            try:
                self.store.heartbeat(keyed)
            except Exception:  # the next beat tries again; a store outage is logged there
                log.warning("could not mark %d running run(s) alive", len(keyed))

    def _replayed_result(self, record: RunRecord) -> dict[str, Any]:
        self.metrics.idempotent_replays.inc()
        record = self._wait_until_finished(record)
        if record.status == "succeeded" and record.result is not None:
            return record.result
        error = record.error or {}
        raise _StoredError(error.get("status", 502), error.get("code", "run_failed"),
                           error.get("message", f"run {record.run_id} ended {record.status}"))

    def _wait_until_finished(self, record: RunRecord) -> RunRecord:
        deadline = time.monotonic() + self.settings.idempotency_wait_s
        delay = 0.01
        while record.status == "running":
            if self._stale(record):
                self._abandon(record)
                raise _Abandoned()
            if time.monotonic() > deadline:
                raise Conflict(f"run {record.run_id} with this Idempotency-Key is still running; "
                               "retry later", run_id=record.run_id)
            time.sleep(delay)  # cooperative under gevent
            delay = min(delay * 2, 0.2)
            record = self.store.get_run(record.run_id)
        return record

    # -- streamed runs ----------------------------------------------------------------------------

    def stream(self, prepared: PreparedRun, keepalive_s: float, *,
               cancel_on_disconnect: bool = True) -> Iterator[RunEvent | None]:
        """Events of the run as they happen (read in-process, not from the log, so nothing
        is added to the time to first token); ``None`` marks a quiet ``keepalive_s``.
        A replayed key streams the earlier run's events from the log."""
        if prepared.replay is not None:
            yield from self.watch(prepared.replay.run_id, 0, keepalive_s)
            return
        yield from runner.stream_with(
            lambda emit: self._execute(prepared, emit, stream_tokens=True),
            cancel=prepared.cancel, keepalive_s=keepalive_s,
            on_event=lambda event: self._log_event(prepared, event),
            cancel_on_close=cancel_on_disconnect)

    def watch(self, run_id: str, after: int, keepalive_s: float) -> Iterator[RunEvent | None]:
        """Replay the run's events after ``after`` and tail them until its last event.
        Raises RunNotFound / Conflict when no log has them (see ``_missing_events``)."""
        first = self.events.read(run_id, after, 0)
        if first is None:
            first = self._await_shared_events(run_id, after)
        if first is None:
            yield from self._missing_events(run_id)
            return
        pending = first
        while True:
            for event in pending:
                yield event
                after = event.seq
                if event.type in TERMINAL:
                    return
            if not pending and self.events.finished(run_id):
                return  # resumed at or past the last event: nothing more will come
            pending = self.events.read(run_id, after, keepalive_s)
            if pending is None:  # expired while we watched
                return
            if not pending and not self.events.finished(run_id):
                yield None

    def _await_shared_events(self, run_id: str, after: int) -> list[RunEvent] | None:
        """A run just started in another process may not have reached Redis yet (its events
        are written in the background): give it a moment before calling it unknown."""
        if self.events.shared is None:
            return None
        deadline = time.monotonic() + self.settings.shared_events_grace_s
        while time.monotonic() < deadline:
            try:
                self.store.get_run(run_id)
                return None  # on record: _missing_events knows what to say
            except RunNotFound:
                pass
            time.sleep(0.05)
            events = self.events.read(run_id, after, 0)
            if events is not None:
                return events
        return None

    def _missing_events(self, run_id: str) -> Iterator[RunEvent]:
        record = self.store.get_run(run_id)  # RunNotFound for a run that never existed
        if record.status == "running":
            raise Conflict(f"run {run_id} is running in another engine process and its events "
                           "are not shared; set REDIS_URL to watch runs from any process",
                           run_id=run_id)
        yield _final_event(record)  # the events expired; the outcome is still on record

    # -- records and cancellation ---------------------------------------------------------------

    def get(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            active = self._active.get(run_id)
        if active is not None and active.record is not None:
            return run_record_json(active.record)  # still running here: status "running"
        try:
            return run_record_json(self.store.get_run(run_id))
        except RunNotFound:
            started = self._started_elsewhere(run_id)
            if started is None:
                raise
            return started

    def _started_elsewhere(self, run_id: str) -> dict[str, Any] | None:
        """A run of another process that is not on record yet (plain runs are written when
        they end) but whose events are in the shared log."""
        try:
            events = self.events.read(run_id, 0, 0)
        except EventLogUnavailable:
            return None
        if not events or events[0].type != "run_started":
            return None
        head = events[0].data
        return {"run_id": run_id, "flow_id": head.get("flow_id"), "version": head.get("version"),
                "status": "running", "session_id": head.get("session_id")}

    def cancel(self, run_id: str) -> dict[str, Any]:
        if self._cancel_local(run_id):
            return {"run_id": run_id, "status": "cancelling"}
        try:
            record = self.store.get_run(run_id)
        except RunNotFound:
            if self._started_elsewhere(run_id) is None:  # plain runs are recorded at the end
                raise
        else:
            if record.status != "running":
                raise Conflict(f"run {run_id} already ended ({record.status})", run_id=run_id)
        if self.signals is not None and self.signals.publish("cancel", run_id=run_id):
            return {"run_id": run_id, "status": "cancelling"}
        raise Conflict(f"run {run_id} is running in another engine process; cancelling it "
                       "there needs REDIS_URL", run_id=run_id)

    def _cancel_local(self, run_id: str) -> bool:
        with self._lock:
            active = self._active.get(run_id)
        if active is None:
            return False
        active.cancel.cancel("cancelled by API request")
        return True


class _Abandoned(Exception):
    """The run a duplicate waited for was abandoned (its engine stopped)."""


class _StoredError(FlowgateError):
    """An error replayed from an earlier run's record (same status and code)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code  # type: ignore[misc]


def _final_event(record: RunRecord) -> RunEvent:
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


def _request_hash(flow_id: str, request: RunRequest) -> str:
    blob = json.dumps([flow_id, request.input_value, request.input_type, request.output_type,
                       request.session_id, request.tweaks, request.version],
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
