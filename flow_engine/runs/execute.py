"""Execute prepared runs in this process and record them: admission by the tenant's limits,
the event log, metrics, the run record, chat memory, and the heartbeat of running runs.

Records: a run without an ``Idempotency-Key`` is written once, complete, when it ends
(while it runs, this process answers for it); a keyed run was inserted when it was claimed
(``runs/idempotency.py``) and is updated at the end. An end the store refuses (it is down
for a moment) is written again in the background, with backoff, for up to
``record_retry_s``; meanwhile this process still answers for the run and keeps a keyed
one marked alive. If it never gets written, the maintenance job marks the run failed
(``flow_engine/maintenance.py``): no record stays ``running`` for ever. Calls go one way: the run service
calls this module, which calls the runner (``runs/runner.py``), the event log, the store
and the tenant limits — none of them calls back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from flow_engine.components.llm_calls import LlmCall
from flow_engine.errors import Conflict, FlowgateError, RunFailed, TenantLimited
from flow_engine.metrics import EngineMetrics, ModelLabels, VersionLabels, forget_version
from flow_engine.rollouts.outcomes import OutcomeRecorder, counts_failure
from flow_engine.runs import runner
from flow_engine.runs.events import RunEventLog
from flow_engine.runs.record_writer import RecordWriter, RunEnd
from flow_engine.runs.request import PreparedRun
from flow_engine.runs.runner import RunEvent, RunResult
from flow_engine.runs.spans import RunSpans
from flow_engine.store.base import ChatMessage, FlowStore, RunRecord
from flow_engine.tenants import TenantLimits
from flowgate.common.backoff import Backoff
from flowgate.common.otel import Telemetry

log = logging.getLogger(__name__)
OUTCOMES = ("succeeded", "failed", "cancelled")


class RunExecutor:
    heartbeat_s = 5.0  # how often running keyed runs are marked alive and leases renewed

    def __init__(self, store: FlowStore, metrics: EngineMetrics, events: RunEventLog,
                 limits: TenantLimits, *, clock: Callable[[], datetime],
                 record_retry_s: float = 60.0, record_batch_s: float = 0.002,
                 outcomes: OutcomeRecorder | None = None,
                 telemetry: Telemetry | None = None) -> None:
        self.store = store
        self.telemetry = telemetry  # the runs' spans, when the engine exports them
        self.outcomes = outcomes  # per-version outcomes for canary analysis (rollouts/)
        self.version_label = VersionLabels(self._forget_version)
        self.model_label = ModelLabels()  # bounded: a tweak may name any model
        self.metrics = metrics
        self.events = events
        self.limits = limits
        self.record_retry_s = record_retry_s
        self._now = clock
        self._active: dict[str, PreparedRun] = {}
        self._unrecorded: dict[str, PreparedRun] = {}  # ended; the store has not taken it yet
        self._closed = threading.Event()
        self._retrying: set[threading.Thread] = set()  # _record_later threads, joined at close
        self._series: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._heartbeats: threading.Thread | None = None
        self.records = RecordWriter(store, on_written=self._recorded, batch_s=record_batch_s)

    # -- running ------------------------------------------------------------------------------

    def run(self, prepared: PreparedRun) -> dict[str, Any]:
        """Run to the end; the response body. Events go to the event log only."""
        self._admit(prepared)
        counter = itertools.count(1)

        def emit(kind: str, data: dict[str, Any]) -> None:
            self._log_event(prepared, RunEvent(next(counter), kind, data))

        return self._execute(prepared, emit, stream_tokens=False).as_dict()

    def stream(self, prepared: PreparedRun, keepalive_s: float, *,
               cancel_on_disconnect: bool = True) -> Iterator[RunEvent | None]:
        """Events of the run as they happen (read in-process, not from the log, so nothing
        is added to the time to first token); ``None`` marks a quiet ``keepalive_s``.
        A refused admission raises at the first ``next()``, before any event."""
        self._admit(prepared)
        yield from runner.stream_with(
            lambda emit: self._execute(prepared, emit, stream_tokens=True),
            cancel=prepared.cancel, keepalive_s=keepalive_s,
            on_event=lambda event: self._log_event(prepared, event),
            cancel_on_close=cancel_on_disconnect)

    def _admit(self, prepared: PreparedRun) -> None:
        try:
            self.limits.admit(prepared.tenant, prepared.run_id, prepared.caller.group)
        except TenantLimited as exc:
            label = self.limits.policy.label(prepared.tenant)
            self.metrics.tenant_limited.labels(label, exc.details["limit"]).inc()
            if prepared.keyed:  # it never ran: free its Idempotency-Key for the retry
                with contextlib.suppress(FlowgateError):
                    self.store.delete_run(prepared.run_id)
            raise

    def _log_event(self, prepared: PreparedRun, event: RunEvent) -> None:
        """Every event goes to the event log (watchable, resumable); the first token of a
        run is its time to first token."""
        if event.type == "token" and prepared.first_token_at is None:
            prepared.first_token_at = time.perf_counter()
            compiled = prepared.compiled
            self.metrics.ttft.labels(
                compiled.flow_id, self.version_label(compiled.flow_id, compiled.version)
            ).observe(prepared.first_token_at - prepared.started_at)
        self.events.append(prepared.run_id, event)

    def _execute(self, prepared: PreparedRun, emit, *, stream_tokens: bool) -> RunResult:
        """Run an admitted run; its slot is given back whatever happens."""
        with self._lock:
            self._active[prepared.run_id] = prepared
        self._start_heartbeats()
        self.metrics.active_runs.inc()
        self.events.open(prepared.run_id, prepared.tenant)
        # the run's spans, when its request's span is recorded (flowgate/common/otel.py)
        spans = self._spans(prepared) if prepared.span_parent is not None else None
        started = prepared.started_at = time.perf_counter()
        try:
            result = runner.execute(
                prepared.compiled,
                prepared.request.run_input(prepared.tenant, prepared.caller.identity,
                                           prepared.record.trace_id if prepared.record else None),
                emit=emit, run_id=prepared.run_id, cancel=prepared.cancel,
                stream_tokens=stream_tokens, observer=spans)
        except FlowgateError as exc:
            exc.details.setdefault("run_id", prepared.run_id)  # so the caller can look it up
            status = "cancelled" if exc.code == "run_cancelled" else "failed"
            _end_spans(spans, status, exc.code, getattr(exc, "usage", None))
            self._finish(prepared, status, time.perf_counter() - started, None,
                         {"status": exc.status, **exc.to_dict()}, getattr(exc, "usage", None),
                         getattr(exc, "llm_calls", ()))
            raise
        except BaseException as exc:
            _end_spans(spans, "failed", "internal")
            self._finish(prepared, "failed", time.perf_counter() - started, None,
                         {"status": 500, "code": "internal", "message": "internal error"})
            raise RunFailed("the run failed unexpectedly") from exc
        _end_spans(spans, "succeeded", usage=result.usage)
        self._finish(prepared, "succeeded", time.perf_counter() - started, result, None)
        return result

    def _spans(self, prepared: PreparedRun) -> RunSpans | None:
        """The run's spans; None (and a log line) if they cannot be made: tracing never
        fails a run."""
        compiled = prepared.compiled
        try:
            return RunSpans(self.telemetry, prepared.span_parent, flow_id=compiled.flow_id,
                            version=compiled.version, run_id=prepared.run_id,
                            node_types=compiled.node_types,
                            session_id=prepared.request.session_id, tenant=prepared.tenant)
        except Exception:
            log.exception("the run's spans could not be started")
            return None

    def _finish(self, prepared: PreparedRun, status: str, seconds: float,
                result: RunResult | None, error: dict[str, Any] | None,
                spent: dict[str, int] | None = None, calls: Sequence[LlmCall] = ()) -> None:
        """``spent``, ``calls``: the usage and LLM calls of a run that failed or was
        cancelled (they still count)."""
        with self._lock:  # "here" (unrecorded) with no gap until the store has the run's end
            self._active.pop(prepared.run_id, None)
            self._unrecorded[prepared.run_id] = prepared
        # neither is in the way of the record: unrecorded, the run would stay "here" for good
        try:
            self.limits.release(prepared.run_id)
        except Exception:
            log.exception("could not release the tenant slot of run %s", prepared.run_id)
        try:
            self._account(prepared, status, seconds, result, error, spent, calls)
        except Exception:
            log.exception("could not account for run %s", prepared.run_id)
        duration_ms = round(seconds * 1000, 3)
        self._record_end(prepared, status, duration_ms, result.as_dict() if result else None,
                         error)

    def _account(self, prepared: PreparedRun, status: str, seconds: float,
                 result: RunResult | None, error: dict[str, Any] | None,
                 spent: dict[str, int] | None, calls: Sequence[LlmCall]) -> None:
        """The run's metrics, outcome (for canary analysis), tokens and chat turn."""
        compiled = prepared.compiled
        m = self.metrics
        m.active_runs.dec()
        flow_id, version = compiled.flow_id, self.version_label(compiled.flow_id, compiled.version)
        if (flow_id, version) not in self._series:
            # every outcome's series exists from a version's first run, so rate() sees the
            # first failure too (a series born at 1 has no increase to show)
            self._series.add((flow_id, version))
            for outcome in OUTCOMES:
                m.runs.labels(flow_id, version, outcome)
            m.run_failures.start(flow_id, version)
        m.runs.labels(flow_id, version, status).inc()
        if error is not None:
            m.run_failures.labels(flow_id, version, str(error.get("code", "internal"))).inc()
        for call in (result.llm_calls if result is not None else calls):
            provider, model = self.model_label(call.provider, call.model, call.outcome == "ok")
            m.llm_calls.labels(provider, model, call.outcome).inc()
            m.llm_call_duration.labels(provider, model).observe(call.seconds)
            m.llm_model_tokens.labels(provider, model, "input").inc(call.input_tokens)
            m.llm_model_tokens.labels(provider, model, "output").inc(call.output_tokens)
        tenant = self.limits.policy.label(prepared.tenant)
        m.tenant_runs.labels(tenant, status).inc()
        m.run_duration.labels(flow_id, version).observe(seconds)
        if self.outcomes is not None:
            failed = counts_failure(status, error)
            if failed is not None:
                self.outcomes.record(flow_id, compiled.version, failed, seconds)
        usage = result.usage if result is not None else spent
        if usage:
            m.llm_tokens.labels(flow_id, version, "input").inc(usage["input_tokens"])
            m.llm_tokens.labels(flow_id, version, "output").inc(usage["output_tokens"])
            m.tenant_tokens.labels(tenant, "input").inc(usage["input_tokens"])
            m.tenant_tokens.labels(tenant, "output").inc(usage["output_tokens"])
            self.limits.add_tokens(prepared.tenant, usage["input_tokens"] + usage["output_tokens"],
                                   prepared.caller.group)
        if result is not None:
            for node, ms in result.nodes.items():
                m.node_duration.labels(compiled.flow_id, compiled.node_types[node]).observe(ms / 1000)
            self._remember_chat(prepared, result)

    def _record_end(self, prepared: PreparedRun, status: str, duration_ms: float,
                    body: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        """Hand the run's end to the batch writer (runs/record_writer.py); until the store
        has it, this process answers for the run from ``unrecorded`` (``_finish`` put it
        there)."""
        record = prepared.record
        if record is not None:  # what this process answers for the run until it is written
            record.status, record.duration_ms, record.result, record.error = (
                status, duration_ms, body, error)
            record.finished_at = self._now()
        whole = record is not None and record.idempotency_key is None
        finish = {"run_id": prepared.run_id, "status": status, "duration_ms": duration_ms,
                  "result": body, "error": error}

        def write() -> None:
            if whole:
                with contextlib.suppress(Conflict):  # an earlier attempt was committed after all
                    self.store.insert_run(record)
            else:
                self.store.finish_run(prepared.run_id, status=status, duration_ms=duration_ms,
                                      result=body, error=error)

        def write_alone() -> None:
            try:
                write()
            except FlowgateError as exc:
                # The client has its answer; the record is written again in the background.
                log.warning("could not record the end of run %s (%s); retrying for up to %g s",
                            prepared.run_id, exc.code, self.record_retry_s)
                retry = threading.Thread(target=self._record_later,
                                         args=(prepared.run_id, write, record if whole else None),
                                         name="flowgate-record-retry", daemon=True)
                with self._lock:
                    self._retrying.add(retry)
                retry.start()
            else:
                self._recorded([prepared.run_id])

        self.records.submit(RunEnd(prepared.run_id, record if whole else None,
                                   None if whole else finish, write_alone))

    def _recorded(self, run_ids: list[str]) -> None:
        with self._lock:
            for run_id in run_ids:
                self._unrecorded.pop(run_id, None)

    def _record_later(self, run_id: str, write: Callable[[], None],
                      whole: RunRecord | None) -> None:
        """Retry the write for up to record_retry_s. A keyed run's record is in the store
        already (``running``): given up, the maintenance job marks it failed. A plain run's
        (``whole``) is written only at its end: given up, the store never has it, so the
        record — flow, version, tenant, status, duration, usage, error — goes into the error
        log line instead."""
        deadline = time.monotonic() + self.record_retry_s
        delays = Backoff(0.25, 10.0).delays()
        delay = next(delays)
        why = f"after {self.record_retry_s:g} s"
        try:
            while time.monotonic() + delay <= deadline:
                if self._closed.wait(delay):  # cooperative under gevent
                    why = "as the engine stopped"
                    break
                delay = next(delays)
                try:
                    write()
                except FlowgateError:
                    continue
                self.metrics.record_retries.labels("recorded").inc()
                log.info("recorded the end of run %s after all", run_id)
                return
            self.metrics.record_retries.labels("given_up").inc()
            if whole is None:
                log.error("gave up recording the end of run %s %s; the maintenance job will "
                          "mark it failed", run_id, why)
            else:
                log.error("gave up recording run %s %s: the store never got it, so this line "
                          "holds its record", run_id, why, extra={
                              "run_id": run_id, "flow_id": whole.flow_id,
                              "version": whole.version, "tenant": whole.tenant,
                              "run_status": whole.status, "duration_ms": whole.duration_ms,
                              "usage": (whole.result or {}).get("usage"),
                              "error": whole.error})
        finally:
            with self._lock:
                self._unrecorded.pop(run_id, None)
                self._retrying.discard(threading.current_thread())

    def _remember_chat(self, prepared: PreparedRun, result: RunResult) -> None:
        session = prepared.request.session_id
        if not session or "ChatHistory" not in prepared.compiled.node_types.values():
            return
        turn = [ChatMessage("human", prepared.request.input_value or ""),
                ChatMessage("ai", result.output or "")]
        try:
            self.store.append_chat(prepared.tenant, session, prepared.compiled.flow_id, turn)
        except FlowgateError:
            log.exception("could not store chat history for session %s", session)

    def _forget_version(self, flow_id: str, version: str) -> None:
        """A version that has not run here for an hour: its series go."""
        self._series.discard((flow_id, version))
        forget_version(self.metrics, flow_id, version)

    # -- runs in progress here ------------------------------------------------------------------

    def active(self, run_id: str) -> PreparedRun | None:
        with self._lock:
            return self._active.get(run_id)

    def flush(self) -> None:
        """Write the ends of runs still queued (at exit, and by tests that read the store)."""
        self.records.flush()

    def close(self, wait_s: float = 2.0) -> None:
        """Write what is queued, then stop retrying records (the store is going away) and
        wait up to ``wait_s`` for the retries to log what they gave up: the process may exit
        right after, and a plain run's record is in that log line only."""
        self.flush()
        self._closed.set()
        with self._lock:
            retrying = list(self._retrying)
        deadline = time.monotonic() + wait_s
        for thread in retrying:
            thread.join(max(0.0, deadline - time.monotonic()))

    def unrecorded(self, run_id: str) -> PreparedRun | None:
        """A run of this process that has ended but whose record is still being written."""
        with self._lock:
            return self._unrecorded.get(run_id)

    def cancel_local(self, run_id: str) -> bool:
        """Cancel a run of this process (from a signal another process sent)."""
        active = self.active(run_id)
        if active is None:
            return False
        active.cancel.cancel("cancelled by API request")
        return True

    def _start_heartbeats(self) -> None:
        if self._heartbeats is not None:
            return
        with self._lock:
            if self._heartbeats is None:
                self._heartbeats = threading.Thread(target=self._beat, name="flowgate-heartbeat",
                                                    daemon=True)
                self._heartbeats.start()

    def _beat(self) -> None:
        """Every heartbeat_s: mark this process's running keyed runs alive (one write) and
        renew its runs' tenant leases (one Redis call)."""
        while True:
            time.sleep(self.heartbeat_s)  # cooperative under gevent
            with self._lock:  # and the ended ones whose end is still to be written
                keyed = [run_id for run_id, p in [*self._active.items(), *self._unrecorded.items()]
                         if p.keyed]
            try:
                self.store.heartbeat(keyed)
            except Exception:  # the next beat tries again; a store outage is logged there
                log.warning("could not mark %d running run(s) alive", len(keyed))
            self.limits.renew()


def _end_spans(spans: RunSpans | None, status: str, error: str | None = None,
               usage: dict[str, int] | None = None) -> None:
    """End the run's spans, if any; a failure here is logged, never the run's."""
    if spans is None:
        return
    try:
        spans.end(status, error, usage)
    except Exception:
        log.exception("the run's spans could not be ended")
