"""Every ambassador metric, defined once. Registry injectable for tests; multiprocess mode
under gunicorn when ``PROMETHEUS_MULTIPROC_DIR`` is set (as for the engine)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flowgate.common import gc_pauses
from flowgate.common.prometheus import ServiceMetrics

STREAM = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
BREAKER_STATES = ("closed", "open", "half_open")


class AmbassadorMetrics(ServiceMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry, prefix="flowgate_ambassador")
        kw = self.options
        self.gc_pause = Histogram(
            "flowgate_ambassador_gc_pause_seconds", "Garbage-collection pauses by generation.",
            ["generation"], buckets=gc_pauses.BUCKETS, **kw)
        self.gc_pause_max = Gauge(
            "flowgate_ambassador_gc_pause_max_seconds",
            "The longest garbage-collection pause since the process started.",
            multiprocess_mode="max", **kw)
        gc_pauses.watch(self.gc_pause, self.gc_pause_max)
        self.spans_dropped = Counter(
            "flowgate_ambassador_spans_dropped_total",
            "OpenTelemetry spans not delivered to the collector, by reason (queue_full: the "
            "export queue was full; export_failed: the collector did not take them).",
            ["reason"], **kw)
        for reason in ("queue_full", "export_failed"):
            self.spans_dropped.labels(reason)
        self.requests = Counter(
            "flowgate_ambassador_requests_total", "Requests by route, flow, status and cache result.",
            ["route", "flow", "status", "cache"], **kw)
        self.request_duration = Histogram(
            "flowgate_ambassador_request_duration_seconds",
            "Time to answer, by route and flow (a stream: until its first event reached the "
            "app).", ["route", "flow"], buckets=LATENCY, **kw)
        self.stream_duration = Histogram(
            "flowgate_ambassador_stream_duration_seconds",
            "Whole streamed answers relayed to apps, start to end, by route and flow.",
            ["route", "flow"], buckets=STREAM, **kw)
        self.upstream_duration = Histogram(
            "flowgate_ambassador_upstream_duration_seconds",
            "Time per upstream attempt, by route and flow (bounded: ambassador/labels.py).",
            ["route", "flow"], buckets=LATENCY, **kw)
        self.overhead = Histogram(
            "flowgate_ambassador_overhead_seconds",
            "Time spent outside upstream calls, by route and flow (bounded: "
            "ambassador/labels.py).", ["route", "flow"], buckets=OVERHEAD, **kw)
        self.in_flight = Gauge(
            "flowgate_ambassador_in_flight_requests", "Requests being answered.",
            multiprocess_mode="livesum", **kw)
        self.upstream_attempts = Counter(
            "flowgate_ambassador_upstream_attempts_total", "Upstream attempts by outcome.",
            ["outcome"], **kw)
        self.retries = Counter(
            "flowgate_ambassador_retries_total", "Retries by reason.", ["reason"], **kw)
        self.retry_budget_exhausted = Counter(
            "flowgate_ambassador_retry_budget_exhausted_total",
            "Retries not made because the retry budget was spent.", **kw)
        self.breaker_state = Gauge(
            "flowgate_ambassador_breaker_state", "1 for the breaker's current state.",
            ["state"], multiprocess_mode="livemax", **kw)
        self.breaker_transitions = Counter(
            "flowgate_ambassador_breaker_transitions_total", "Breaker state changes by new state.",
            ["to"], **kw)
        self.breaker_probes = Counter(
            "flowgate_ambassador_breaker_probes_total",
            "Readiness probes of the engine while the breaker was open, by result "
            "(ready: a trial followed).", ["result"], **kw)
        self.cache = Counter(
            "flowgate_ambassador_cache_total",
            "Cache lookups by result (hit|miss|bypass|stale|coalesced: answered by an "
            "identical request in flight).",
            ["result"], **kw)
        self.cache_errors = Counter(
            "flowgate_ambassador_cache_errors_total",
            "Cache store failures (requests still served) by operation.", ["op"], **kw)
        self.cache_fallback = Counter(
            "flowgate_ambassador_cache_fallback_total",
            "Cache operations done in process memory because Redis failed (or was paused "
            "after a failure), by operation.", ["op"], **kw)
        self.cache_memory_bytes = Gauge(
            "flowgate_ambassador_cache_memory_bytes",
            "Estimated bytes of answers cached in this process (the in-memory cache, or "
            "Redis's local fallback).", multiprocess_mode="livesum", **kw)
        self.cache_memory_entries = Gauge(
            "flowgate_ambassador_cache_memory_entries",
            "Answers cached in this process (the in-memory cache, or Redis's local fallback).",
            multiprocess_mode="livesum", **kw)
        self.ratelimited = Counter(
            "flowgate_ambassador_ratelimited_total", "Requests refused with 429, by scope.",
            ["scope"], **kw)
        self.ratelimit_errors = Counter(
            "flowgate_ambassador_ratelimit_errors_total",
            "Shared rate-limit store failures (local limits applied instead).", **kw)
        self.redis_failures = Counter(
            "flowgate_ambassador_redis_failures_total",
            "Calls to Redis that failed; each starts a pause (redis_pause_s) in which the "
            "cache and rate limits use local fallbacks without calling Redis.", **kw)
        self.auth_failures = Counter(
            "flowgate_ambassador_auth_failures_total", "Refused callers by reason.", ["reason"], **kw)
        self.upstream_up = Gauge(
            "flowgate_ambassador_upstream_up",
            "1 when the last upstream attempt reached the engine, else 0.",
            multiprocess_mode="livemax", **kw)
        self.fallbacks = Counter(
            "flowgate_ambassador_fallbacks_total",
            "Run requests answered with the flow's configured fallback, by flow.", ["flow"], **kw)
        self.faults_injected = Counter(
            "flowgate_ambassador_faults_injected_total",
            "Faults injected by the fault filter (drills: flows.<id>.fault, X-Flowgate-Fault), "
            "by flow and kind (delay|abort); each attempt counts.", ["flow", "kind"], **kw)
        self.config_reload_errors = Counter(
            "flowgate_ambassador_config_reload_errors_total",
            "Config reloads rejected (the last good config stays).", **kw)
        # streams are few: their series exist from the start, so rate() sees the first one
        for route in ("/run-flow", "/runs/<id>/events"):
            self.stream_duration.labels(route, "")
        for state in BREAKER_STATES:
            self.breaker_state.labels(state).set(1 if state == "closed" else 0)
            self.breaker_transitions.labels(state)
        for result in ("hit", "miss", "bypass", "stale", "coalesced"):
            self.cache.labels(result)
        for op in ("get", "set"):
            self.cache_errors.labels(op)
            self.cache_fallback.labels(op)
        for result in ("ready", "not_ready"):
            self.breaker_probes.labels(result)
        for outcome in ("ok", "error", "connect_error", "timeout"):
            self.upstream_attempts.labels(outcome)
        for reason in ("connect_error", "unavailable", "timeout", "upstream_error"):
            self.retries.labels(reason)
        self.upstream_up.set(1)
