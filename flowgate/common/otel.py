"""OpenTelemetry spans of both services, exported over OTLP/HTTP when asked for.

:func:`from_env` reads the standard variables: nothing is exported, and nothing is built,
unless ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(and ``OTEL_SDK_DISABLED`` is not ``true``, ``OTEL_TRACES_EXPORTER`` not ``none``). Then it
returns a :class:`Telemetry`; otherwise None, and every caller's ``if telemetry`` is the
whole cost of tracing on the hot path. ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` / ``_ARG``, ``OTEL_EXPORTER_OTLP_HEADERS`` / ``_TIMEOUT`` and the
``OTEL_BSP_*`` batch settings are the SDK's own. Only ``http/protobuf`` is spoken (the
collector's port 4318); a ``grpc`` protocol setting is reported and ignored.

Spans are batched and sent by a background thread (a greenlet under gevent): a request only
appends its ended span to a bounded queue. A collector that is down or slow never delays
or fails a request; what cannot be queued (the queue is full) or sent (the export failed)
is counted in ``flowgate_<service>_spans_dropped_total{reason}``.

Trace ids are Flowgate's own (``flowgate/common/tracing.py``): a span continues the caller's
``traceparent`` when it sent a valid one, and a new trace otherwise starts with the trace id
the logs already carry, so a log line and its spans always share one id. Which traces are
recorded is this service's decision alone (:func:`sampler`), never the caller's flag.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from flowgate.common import tracing

log = logging.getLogger(__name__)
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
FLUSH_AT_EXIT_S = 2.0
EXPORT_TIMEOUT_S = 3.0  # per export, unless OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT says otherwise
MAX_ATTRIBUTE_CHARS = 512  # unless OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT says otherwise

OnDropped = Callable[[str, int], None]  # (reason, spans)

# the trace id a new root span must take (the one the logs carry): read by _FlowgateIds
_next_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "flowgate_otel_trace_id", default=None)


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Do the standard variables ask for spans to be exported?"""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARS)


def from_env(service_name: str, *, on_dropped: OnDropped | None = None,
             environ: Mapping[str, str] = os.environ) -> Telemetry | None:
    """The service's :class:`Telemetry` when exporting is configured, else None."""
    if not enabled(environ):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    protocol = next((environ[v] for v in PROTOCOL_VARS if environ.get(v)), "http/protobuf")
    if protocol.strip().lower() != "http/protobuf":
        log.error("%s=%s is not supported: spans are sent as OTLP http/protobuf (a "
                  "collector's port 4318)", next(v for v in PROTOCOL_VARS if environ.get(v)),
                  protocol)
    timeout = None if any(environ.get(v) for v in (
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")) else EXPORT_TIMEOUT_S
    return Telemetry(service_name, OTLPSpanExporter(timeout=timeout), on_dropped=on_dropped,
                     environ=environ)


def sampler(environ: Mapping[str, str] = os.environ) -> Sampler:
    """``OTEL_TRACES_SAMPLER`` as a ratio, applied to every trace by its id — new ones and
    those a caller continues alike. A caller's ``traceparent`` gives the trace id, never the
    decision: its sampled flag can neither force tracing (the cost of 100 % at will) nor turn
    it off, and every hop decides the same for the same trace id. Spans inside a process
    follow their parent."""
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    base = name.removeprefix("parentbased_")
    if base == "always_off":
        ratio = 0.0
    elif base == "traceidratio":
        try:
            ratio = min(1.0, max(0.0, float(environ.get("OTEL_TRACES_SAMPLER_ARG") or 1.0)))
        except ValueError:
            log.error("OTEL_TRACES_SAMPLER_ARG=%s is not a number: sampling every trace",
                      environ.get("OTEL_TRACES_SAMPLER_ARG"))
            ratio = 1.0
    else:
        if base != "always_on":
            log.error("OTEL_TRACES_SAMPLER=%s is not supported here (always_on, always_off, "
                      "traceidratio, with or without parentbased_): sampling every trace", name)
        ratio = 1.0
    by_id = TraceIdRatioBased(ratio)
    return ParentBased(root=by_id, remote_parent_sampled=by_id, remote_parent_not_sampled=by_id)


def _limits(environ: Mapping[str, str]) -> SpanLimits:
    """At most MAX_ATTRIBUTE_CHARS characters an attribute (a path, an id a caller sent)."""
    if environ.get("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT") or environ.get(
            "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"):
        return SpanLimits()
    return SpanLimits(max_attribute_length=MAX_ATTRIBUTE_CHARS)


class Telemetry:
    """A tracer provider of this service's own (never the global one: a process may hold
    several apps, as the tests do) with a bounded batch processor in front of ``exporter``."""

    def __init__(self, service_name: str, exporter: SpanExporter, *,
                 on_dropped: OnDropped | None = None,
                 environ: Mapping[str, str] = os.environ) -> None:
        on_dropped = on_dropped or (lambda reason, n: None)
        named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", "")
        resource = Resource.create({} if named else {"service.name": service_name})
        # no exit hook of the SDK's own (it waits up to 30 s for a stalled collector, before
        # the run records are written): flush() is bounded and runs last (flowgate/common/at_exit.py)
        self.provider = TracerProvider(resource=resource, id_generator=_FlowgateIds(),
                                       sampler=sampler(environ), shutdown_on_exit=False,
                                       span_limits=_limits(environ))
        self.processor = _CountingBatch(_CountingExporter(exporter, on_dropped), on_dropped)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("flowgate")

    def server_span(self, name: str, trace_ctx: tracing.TraceContext, incoming: str | None,
                    attributes: Mapping[str, Any] | None = None,
                    arrived: float | None = None) -> Span:
        """The span of a request this service received: a child of the caller's
        ``traceparent`` (``incoming``) when it is valid, else the root of the trace whose id
        ``trace_ctx`` (the one the logs carry) holds. It starts when the request ``arrived``
        (a ``time.perf_counter()`` reading, ``gevent_worker.request_arrived``) when known:
        the time it waited for a busy worker is the service's, and shows."""
        start = epoch_ns(arrived)
        parsed = tracing.parse_traceparent(incoming)
        if parsed is not None:
            return self.tracer.start_span(name, remote_parent(*parsed), SpanKind.SERVER,
                                          attributes, start_time=start)
        token = _next_trace_id.set(int(trace_ctx.trace_id, 16))
        try:
            return self.tracer.start_span(name, Context(), SpanKind.SERVER, attributes,
                                          start_time=start)
        finally:
            _next_trace_id.reset(token)

    def child(self, parent: Span | Context | None, name: str, kind: SpanKind = SpanKind.INTERNAL,
              attributes: Mapping[str, Any] | None = None,
              start_time: int | None = None) -> Span:
        context = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
        return self.tracer.start_span(name, context, kind, attributes, start_time=start_time)

    def client(self, parent: Span | Context | None, name: str,
               attributes: Mapping[str, Any] | None = None) -> Span:
        """A call this service makes (an upstream attempt, an LLM request)."""
        return self.child(parent, name, SpanKind.CLIENT, attributes)

    @staticmethod
    def activate(span: Span) -> object:
        """Make ``span`` current (spans started later in this greenlet are its children);
        the token is for :meth:`deactivate`."""
        return otel_context.attach(trace.set_span_in_context(span))

    @staticmethod
    def deactivate(token: object) -> None:
        otel_context.detach(token)

    @staticmethod
    def current() -> Context | None:
        """The current context when its span is recorded (sampled): a span started in it
        later (a streamed run's, in another greenlet) is a child of the span current now.
        None when it is not: nothing below it will be recorded either."""
        context = otel_context.get_current()
        return context if trace.get_current_span(context).is_recording() else None

    def flush(self, timeout_s: float = FLUSH_AT_EXIT_S) -> bool:
        """Send what is queued; gives up after ``timeout_s`` (the SDK's own flush ignores its
        timeout and waits for a stalled collector): False when it did not finish."""
        done = threading.Event()

        def send() -> None:
            self.provider.force_flush()
            done.set()

        threading.Thread(target=send, name="otel-flush", daemon=True).start()
        return done.wait(timeout_s)


def epoch_ns(perf: float | None) -> int | None:
    """A ``time.perf_counter()`` reading of a moment just past as a span's time (Unix ns)."""
    if perf is None:
        return None
    return time.time_ns() - max(0, int((time.perf_counter() - perf) * 1e9))


def remote_parent(trace_id: str, span_id: str, flags: str) -> Context:
    """A context whose current span is the caller's (from its ``traceparent``)."""
    parent = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                         trace_flags=TraceFlags(int(flags, 16) & 0x01))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def traceparent_of(span: Span) -> str:
    """The ``traceparent`` that makes the next hop's span a child of ``span``."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def ended_with(span: Span, status: int | None = None, error: str | None = None,
               **attributes: Any) -> None:
    """Set ``attributes`` (None values left out), mark a 5xx ``status`` or an ``error`` as
    the span's failure, and end it."""
    if not span.is_recording():  # not sampled: nothing to describe
        span.end()
        return
    values = {k: v for k, v in attributes.items() if v is not None}
    if status is not None:
        values["http.response.status_code"] = status
    if error is not None or (status is not None and status >= 500):
        kind = values["error.type"] = error or str(status)
        span.set_status(Status(StatusCode.ERROR, kind))
    span.set_attributes(values)
    span.end()


class _FlowgateIds(RandomIdGenerator):
    """Random ids, except that a new root span takes the trace id set for it."""

    def generate_trace_id(self) -> int:
        wanted = _next_trace_id.get()
        return wanted if wanted is not None else super().generate_trace_id()


class _CountingBatch(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans it drops because its queue is full
    (the SDK only logs them). The count can be one batch high: a span is counted when the
    queue was full as it was checked, even if the exporter took a batch just before the
    span went in (the SDK's own check has the same race)."""

    def __init__(self, exporter: SpanExporter, on_dropped: OnDropped) -> None:
        super().__init__(exporter)
        self._on_dropped = on_dropped

    def on_end(self, span: ReadableSpan) -> None:
        # the SDK's queue (a bounded deque); an SDK without it counts nothing, fails nothing
        batch = getattr(self, "_batch_processor", None)
        queue, limit = getattr(batch, "_queue", None), getattr(batch, "_max_queue_size", None)
        if span.context.trace_flags.sampled and queue is not None and limit is not None \
                and len(queue) >= limit:
            self._on_dropped("queue_full", 1)
        super().on_end(span)


class _CountingExporter(SpanExporter):
    """Counts the spans of every export that failed (after the exporter's own retries)."""

    def __init__(self, inner: SpanExporter, on_dropped: OnDropped) -> None:
        self._inner, self._on_dropped = inner, on_dropped

    def export(self, spans) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            log.warning("exporting %d spans failed", len(spans), exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._on_dropped("export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
