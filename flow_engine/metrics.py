"""Every engine metric, defined once.

Under gunicorn each worker is a process, so the engine uses prometheus_client's
multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (``flowgate engine`` sets it):
``/metrics`` then aggregates all workers. Gauges sum over live workers. Tests pass their
own ``CollectorRegistry``.

Per-version figures (runs, failures, duration, time to first token, tokens) carry a
``version`` label kept bounded by :class:`VersionLabels`: a flow's versions that served in
the last hour, at most ``MAX_VERSIONS`` of them by number, any more as ``other``. A version
idle for an hour loses its series (in multiprocess mode a worker's files keep them until it
restarts).

Counters that alerts and Grafana annotations take ``increase()`` or ``rate()`` of must exist
before their first increment (a series born at 1 shows no increase): the failures of a
version, the calls of a model by outcome and the changes of a flow by action are
:class:`FromZero` — all the known values of their last label appear at 0 together.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flowgate.common import gc_pauses
from flowgate.common.prometheus import ServiceMetrics

RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
NODE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# the known values of the last label of the FromZero counters (others still count, from 1)
RUN_FAILURE_REASONS = ("llm_error", "run_timeout", "run_failed", "run_cancelled", "internal")
LLM_CALL_OUTCOMES = ("ok", "error", "rate_limited", "timeout", "cancelled")
FLOW_CHANGE_ACTIONS = ("create", "new_version", "publish", "rollback", "routing", "delete",
                       "canary_step", "canary_promoted", "canary_aborted", "auto_rollback",
                       "publish_verified")


class FromZero:
    """A labelled counter whose series start together at 0: the first time a key (every
    label but the last) is used — or :meth:`start` names it ahead — its series for each of
    ``values`` are created, so ``increase()`` sees the first increment of each (a series born
    at 1 shows none). Keys are only as many as the labels before the last allow (flows,
    bounded versions, bounded models), and at most ``max_keys`` get their zeros: past that
    (flows created by the thousand) a key's series are born when first used, as any
    counter's. Everything else is the counter's own."""

    def __init__(self, counter: Counter, values: tuple[str, ...], max_keys: int = 1000) -> None:
        self.counter = counter
        self.values = values
        self.max_keys = max_keys
        self._seen: dict[tuple[str, ...], set[str]] = {}  # key → its last-label values
        self._lock = threading.Lock()

    def start(self, *key: str) -> None:
        if key not in self._seen:
            self._add(key, None)

    def _add(self, key: tuple[str, ...], last: str | None) -> None:
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) >= self.max_keys:
                    return
                seen = self._seen[key] = set()
                for value in self.values:
                    self.counter.labels(*key, value)
                    seen.add(value)
            if last is not None:
                seen.add(last)

    def forget(self, *key: str) -> None:
        """Drop a key's series (every value of its last label) from this registry."""
        with self._lock:
            seen = self._seen.pop(key, set())
        for value in seen:
            self.counter.remove(*key, value)

    def forget_zeros(self, *key: str) -> None:
        """Drop the series of a key that are still 0 (made ahead, never used): a deleted
        flow's counts stay, its placeholders go. Not in multiprocess mode, where
        prometheus_client cannot remove a series (a worker's files keep them until it
        restarts)."""
        if _multiprocess():
            return
        with self._lock:  # _add() cannot make placeholders again between look and drop
            seen = self._seen.pop(key, set())
            for value in seen:
                if self.counter.labels(*key, value)._value.get() == 0:
                    self.counter.remove(*key, value)

    def labels(self, *labels: str):
        key, last = labels[:-1], labels[-1]
        seen = self._seen.get(key)
        if seen is None or last not in seen:
            self._add(key, last)
        return self.counter.labels(*labels)

    def __getattr__(self, name: str):
        return getattr(self.counter, name)


class EngineMetrics(ServiceMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry, prefix="flowgate_engine")
        kw = self.options

        self.gc_pause = Histogram(
            "flowgate_engine_gc_pause_seconds", "Garbage-collection pauses by generation.",
            ["generation"], buckets=gc_pauses.BUCKETS, **kw)
        self.gc_pause_max = Gauge(
            "flowgate_engine_gc_pause_max_seconds",
            "The longest garbage-collection pause since the process started.",
            multiprocess_mode="max", **kw)
        gc_pauses.watch(self.gc_pause, self.gc_pause_max)
        self.spans_dropped = Counter(
            "flowgate_engine_spans_dropped_total",
            "OpenTelemetry spans not delivered to the collector, by reason (queue_full: the "
            "export queue was full; export_failed: the collector did not take them).",
            ["reason"], **kw)
        for reason in ("queue_full", "export_failed"):
            self.spans_dropped.labels(reason)
        self.http_requests = Counter(
            "flowgate_engine_http_requests_total", "HTTP requests by route, method and status.",
            ["route", "method", "status"], **kw)
        self.http_duration = Histogram(
            "flowgate_engine_http_request_duration_seconds", "HTTP request latency by route.",
            ["route", "method"], buckets=HTTP_BUCKETS, **kw)
        self.runs = Counter(
            "flowgate_engine_runs_total", "Finished runs by flow, version and status.",
            ["flow", "version", "status"], **kw)
        self.run_duration = Histogram(
            "flowgate_engine_run_duration_seconds", "Run duration by flow and version.",
            ["flow", "version"], buckets=RUN_BUCKETS, **kw)
        self.node_duration = Histogram(
            "flowgate_engine_node_duration_seconds", "Node duration by flow and node type.",
            ["flow", "node_type"], buckets=NODE_BUCKETS, **kw)
        self.llm_tokens = Counter(
            "flowgate_engine_llm_tokens_total",
            "LLM tokens by flow, version and direction (input|output).",
            ["flow", "version", "direction"], **kw)
        # each LLM call (flow_engine/components/llm_calls.py: LlmCall; a sub-flow's too), by
        # the model it was sent to
        self.llm_calls = FromZero(Counter(
            "flowgate_engine_llm_calls_total",
            "LLM calls by provider (the endpoint's host), model and outcome (ok, error, "
            "rate_limited, timeout, cancelled).",
            ["provider", "model", "outcome"], **kw), LLM_CALL_OUTCOMES)
        self.llm_call_duration = Histogram(
            "flowgate_engine_llm_call_duration_seconds",
            "LLM call latency, from the request to its last token, by provider and model.",
            ["provider", "model"], buckets=RUN_BUCKETS, **kw)
        self.llm_model_tokens = Counter(
            "flowgate_engine_llm_model_tokens_total",
            "LLM tokens by provider, model and direction (input|output).",
            ["provider", "model", "direction"], **kw)
        self.run_failures = FromZero(Counter(
            "flowgate_engine_run_failures_total",
            "Runs that did not succeed, by flow, version and reason (the error code: "
            "llm_error, run_timeout, run_failed, run_cancelled, ...).",
            ["flow", "version", "reason"], **kw), RUN_FAILURE_REASONS)
        self.active_runs = Gauge(
            "flowgate_engine_active_runs", "Runs in progress.", multiprocess_mode="livesum", **kw)
        self.compile_cache_bytes = Gauge(
            "flowgate_engine_compile_cache_bytes",
            "Estimated bytes of compiled flows held, by cache (versions|tweaked: callers' "
            "tweak sets, at most half of FLOW_ENGINE_COMPILE_CACHE_BYTES).",
            ["cache"], multiprocess_mode="livesum", **kw)
        self.compile_cache = Counter(
            "flowgate_engine_compile_cache_total", "Compile-cache lookups by result (hit|miss).",
            ["result"], **kw)
        self.store_errors = Counter(
            "flowgate_engine_store_errors_total", "Flow store failures by operation.",
            ["op"], **kw)
        self.idempotent_replays = Counter(
            "flowgate_engine_idempotent_replays_total",
            "Run requests answered from an earlier run with the same Idempotency-Key.", **kw)
        self.ttft = Histogram(
            "flowgate_engine_time_to_first_token_seconds",
            "Time from a run's start to its first LLM token, by flow and version.",
            ["flow", "version"], buckets=RUN_BUCKETS, **kw)
        self.active_streams = Gauge(
            "flowgate_engine_active_streams", "Open event streams by transport (sse|ws).",
            ["transport"], multiprocess_mode="livesum", **kw)
        self.events_sent = Counter(
            "flowgate_engine_stream_events_total", "Run events sent to stream clients.",
            ["transport"], **kw)
        self.stream_disconnects = Counter(
            "flowgate_engine_stream_disconnects_total",
            "Streams whose client went away before the run's last event.", ["transport"], **kw)
        self.event_log_errors = Counter(
            "flowgate_engine_event_log_errors_total",
            "Shared (Redis) state failures by operation (event log, signals, tenant limits); "
            "local fallbacks serve.",
            ["op"], **kw)
        self.event_log_lost = Counter(
            "flowgate_engine_event_log_lost_total",
            "Run events never written to the shared (Redis) log: dropped after retries or a "
            "full queue. Watchers in other processes get an events_lost error for them.", **kw)
        self.event_memory_bytes = Gauge(
            "flowgate_engine_event_memory_bytes",
            "Estimated bytes (JSON length) of run events held in memory.",
            multiprocess_mode="livesum", **kw)
        self.store_reconnects = Counter(
            "flowgate_engine_store_reconnects_total",
            "Statements run again on a fresh connection because the pooled one had died "
            "while idle (before the statement ran), by operation.", ["op"], **kw)
        self.record_retries = Counter(
            "flowgate_engine_run_record_retries_total",
            "Ends of runs the store refused at first, by outcome of the background retries "
            "(recorded|given_up).", ["outcome"], **kw)
        self.runs_reaped = Counter(
            "flowgate_engine_runs_reaped_total",
            "Run records marked failed by the maintenance job because no process owned them "
            "any more.", **kw)
        self.retention_deleted = Counter(
            "flowgate_engine_retention_deleted_total",
            "Rows deleted by the retention job, by kind (runs|chat_messages|outcomes).", ["kind"], **kw)
        self.maintenance_runs = Counter(
            "flowgate_engine_maintenance_runs_total",
            "Maintenance job passes by result (done|skipped: another process had it|failed).",
            ["result"], **kw)
        self.tenant_runs = Counter(
            "flowgate_engine_tenant_runs_total",
            "Finished runs by tenant (known tenants by name, others as 'other') and status.",
            ["tenant", "status"], **kw)
        self.tenant_tokens = Counter(
            "flowgate_engine_tenant_llm_tokens_total",
            "LLM tokens by tenant (known tenants by name, others as 'other') and direction.",
            ["tenant", "direction"], **kw)
        self.tenant_limited = Counter(
            "flowgate_engine_tenant_limited_total",
            "Runs refused with 429 tenant_limit, by tenant and limit (runs|tokens).",
            ["tenant", "limit"], **kw)
        self.ws_rejected = Counter(
            "flowgate_engine_ws_rejected_total", "WebSocket connections refused, by reason.",
            ["reason"], **kw)
        self.rollout_errors = Counter(
            "flowgate_engine_rollout_errors_total",
            "Passes of the rollout controller that could not judge a guarded flow (the store "
            "down, an odd routing): it is judged again next pass; by flow.", ["flow"], **kw)
        self.rollout_actions = Counter(
            "flowgate_engine_rollout_actions_total",
            "Changes the rollout controller made, by flow and action (canary_step|"
            "canary_promoted|canary_aborted|auto_rollback|publish_verified).",
            ["flow", "action"], **kw)
        self.flow_changes = FromZero(Counter(
            "flowgate_engine_flow_changes_total",
            "Changes to flows (audit log entries) made through this process, by flow and "
            "action: Grafana's annotations of the Rollouts row.", ["flow", "action"], **kw),
            FLOW_CHANGE_ACTIONS)
        self.canary_percent = Gauge(
            "flowgate_engine_canary_percent",
            "The percent of a flow's runs its routing sends to its canary version (0: no "
            "canary), as the last change made through any process set it.",
            ["flow"], multiprocess_mode="mostrecent", **kw)
        self.outcome_flush_errors = Counter(
            "flowgate_engine_outcome_flush_errors_total",
            "Failed additions of run outcomes to the shared window (kept for the next try).",
            **kw)
        for transport in ("sse", "ws"):
            self.active_streams.labels(transport)
            self.events_sent.labels(transport)
            self.stream_disconnects.labels(transport)
        for reason in ("capacity", "origin"):
            self.ws_rejected.labels(reason)
        for op in ("append", "read", "publish", "subscribe", "tenants"):
            self.event_log_errors.labels(op)
        for result in ("hit", "miss"):
            self.compile_cache.labels(result)
        for op in ("read", "write"):
            self.store_errors.labels(op)
            self.store_reconnects.labels(op)
        for outcome in ("recorded", "given_up"):
            self.record_retries.labels(outcome)
        for kind in ("runs", "chat_messages", "outcomes"):
            self.retention_deleted.labels(kind)
        for result in ("done", "skipped", "failed"):
            self.maintenance_runs.labels(result)

    def audited(self, entry: Any) -> None:
        """A committed change to a flow (the store's ``on_audit``, an AuditEntry): counted,
        and the flow's canary percent set from the routing it left (a new version leaves
        the routing as it was)."""
        self.flow_changes.labels(entry.flow_id, entry.action).inc()
        if entry.action == "delete":  # its placeholders and gauge go; its counts stay
            self.flow_changes.forget_zeros(entry.flow_id)
            if _multiprocess():  # a series cannot be removed there: it says no canary
                self.canary_percent.labels(entry.flow_id).set(0)
            else:
                with contextlib.suppress(KeyError):
                    self.canary_percent.remove(entry.flow_id)
        elif entry.action != "new_version":
            self.canary_percent.labels(entry.flow_id).set(canary_percent(entry.routing))


def canary_percent(routing: dict[str, Any] | None) -> float:
    canary = (routing or {}).get("canary") or {}
    return float(canary.get("percent") or 0)


MAX_VERSIONS = 10  # per flow, within VERSION_TTL_S
VERSION_TTL_S = 3600.0


class VersionLabels:
    """The ``version`` label of a run's figures: its number while the flow has served at
    most ``MAX_VERSIONS`` versions in the last hour, else ``other``. ``on_expire(flow,
    version)`` is called for a version that has not served for an hour."""

    def __init__(self, on_expire: Callable[[str, str], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._seen: dict[str, dict[int, float]] = {}
        self._on_expire = on_expire
        self._clock = clock
        self._lock = threading.Lock()

    def __call__(self, flow_id: str, version: int) -> str:
        now = self._clock()
        with self._lock:
            seen = self._seen.setdefault(flow_id, {})
            if version in seen:
                seen[version] = now
                return str(version)
            expired = [v for v, at in seen.items() if now - at > VERSION_TTL_S]
            for old in expired:
                del seen[old]
            if len(seen) >= MAX_VERSIONS:
                label = "other"
            else:
                seen[version] = now
                label = str(version)
        for old in expired:
            self._on_expire(flow_id, str(old))
        return label


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def forget_version(metrics: EngineMetrics, flow_id: str, version: str) -> None:
    """Drop a version's series from this process's registry (not in multiprocess mode,
    where prometheus_client cannot: the worker's files keep them until it restarts)."""
    if _multiprocess():
        return
    for metric, extra in ((metrics.runs, ("succeeded", "failed", "cancelled")),
                          (metrics.llm_tokens, ("input", "output")),
                          (metrics.run_duration, None), (metrics.ttft, None)):
        for last in extra or (None,):
            labels = (flow_id, version) if last is None else (flow_id, version, last)
            metric.remove(*labels)
    metrics.run_failures.forget(flow_id, version)


MAX_MODELS = 50  # distinct (provider, model) label pairs a process reports; then "other"
MAX_MODEL_CHARS = 80


class ModelLabels:
    """The ``provider`` (the endpoint: bounded by the provider origins the engine allows) and
    ``model`` labels of LLM figures. A model name can come from a tweak (a caller's string
    when a flow lists ``model`` as tweakable): a name becomes a label value only once a call
    to it succeeded (a provider refuses models it does not serve), and only the first
    ``MAX_MODELS`` of those; the others are ``other``."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, provider: str, model: str, succeeded: bool = True) -> tuple[str, str]:
        pair = (provider[:MAX_MODEL_CHARS], model[:MAX_MODEL_CHARS])
        if pair in self._seen:
            return pair
        if not succeeded:
            return pair[0], "other"
        with self._lock:
            if len(self._seen) >= MAX_MODELS:
                return pair[0], "other"
            self._seen.add(pair)
        return pair
