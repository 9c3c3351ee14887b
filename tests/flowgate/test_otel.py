"""flowgate/common/otel.py: when spans are exported at all, the parent and trace id a span takes,
and the spans that are counted as dropped. The exporters here are the SDK's in-memory one
and ones that fail or block on purpose; tests/integration/test_tracing.py sends over OTLP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowgate.common import otel, tracing

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, False),
    (ENDPOINT, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
    ({**ENDPOINT, "OTEL_SDK_DISABLED": "false"}, True),
    ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),  # no endpoint
])
def test_spans_are_exported_only_when_an_endpoint_is_set(environ, expected) -> None:
    assert otel.enabled(environ) is expected
    assert (otel.from_env("flowgate-engine", environ=environ) is not None) is expected


def telemetry(exporter: SpanExporter, dropped: list | None = None,
              environ: dict[str, str] | None = None) -> otel.Telemetry:
    def on_dropped(reason: str, n: int) -> None:
        if dropped is not None:
            dropped.append((reason, n))

    return otel.Telemetry("flowgate-test", exporter, on_dropped=on_dropped,
                          environ=environ or {})


def test_a_server_span_continues_the_callers_trace() -> None:
    exporter = InMemorySpanExporter()
    t = telemetry(exporter)
    header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    span = t.server_span("POST /run-flow", tracing.from_headers(header, None), header)
    child = t.client(span, "POST /api/v1/run/faq")
    assert otel.traceparent_of(child).startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    child.end()
    span.end()
    t.flush()
    server, = (s for s in exporter.get_finished_spans() if s.name == "POST /run-flow")
    assert f"{server.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert f"{server.parent.span_id:016x}" == "00f067aa0ba902b7" and server.parent.is_remote
    assert server.resource.attributes["service.name"] == "flowgate-test"
    client, = (s for s in exporter.get_finished_spans() if s.name == "POST /api/v1/run/faq")
    assert client.parent.span_id == server.context.span_id


def test_without_a_valid_traceparent_the_root_span_takes_the_trace_id_of_the_logs() -> None:
    exporter = InMemorySpanExporter()
    t = telemetry(exporter)
    for bad in (None, "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01"):
        trace = tracing.from_headers(bad, None)
        t.server_span("GET /x", trace, bad).end()
        t.flush()
        span = exporter.get_finished_spans()[-1]
        assert f"{span.context.trace_id:032x}" == trace.trace_id
        assert span.parent is None
    other = t.client(None, "unrelated")  # ids are random again afterwards
    assert f"{other.get_span_context().trace_id:032x}" != trace.trace_id


def test_sampling_off_records_nothing() -> None:
    exporter = InMemorySpanExporter()
    t = telemetry(exporter, environ={"OTEL_TRACES_SAMPLER": "always_off"})
    header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    span = t.server_span("POST /run-flow", tracing.from_headers(header, None), header)
    assert not span.is_recording()
    span.end()
    t.flush()
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize("variable", ["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"])
def test_the_service_name_of_the_environment_wins(monkeypatch, variable) -> None:
    value = "orders-sidecar" if variable == "OTEL_SERVICE_NAME" else \
        "service.name=orders-sidecar,deployment.environment=prod"
    monkeypatch.setenv(variable, value)
    t = telemetry(InMemorySpanExporter(), environ=dict(os.environ))
    assert t.provider.resource.attributes["service.name"] == "orders-sidecar"
    assert telemetry(InMemorySpanExporter()).provider.resource.attributes[
        "service.name"] == "flowgate-test"  # the default when the environment names none


class Failing(SpanExporter):
    def export(self, spans):
        return SpanExportResult.FAILURE


class Raising(SpanExporter):
    def export(self, spans):
        raise ConnectionError("collector down")


@pytest.mark.parametrize("exporter", [Failing(), Raising()])
def test_spans_a_collector_did_not_take_are_counted(exporter) -> None:
    dropped: list[tuple[str, int]] = []
    t = telemetry(exporter, dropped)
    for i in range(3):
        t.client(None, f"call {i}").end()
    t.flush()
    assert sum(n for reason, n in dropped if reason == "export_failed") == 3


class Blocking(SpanExporter):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans):
        self.release.wait(30)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


def test_a_full_queue_drops_spans_without_waiting_and_counts_them(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    exporter, dropped = Blocking(), []
    t = telemetry(exporter, dropped)
    try:
        for i in range(20):  # the exporter is stuck: nothing here may wait for it
            t.client(None, f"call {i}").end()
        lost = sum(n for reason, n in dropped if reason == "queue_full")
        assert 20 - 4 - 2 <= lost <= 20 - 4  # the queue holds 4; the stuck export took ≤ 2
    finally:
        exporter.release.set()
    t.flush()
    # every span not exported was counted; a span is counted once too often when the
    # exporter made room at the very moment it was queued (at most one batch: 2)
    assert 20 - exporter.exported <= lost <= 20 - exporter.exported + 2


def test_a_stalled_collector_does_not_hold_up_the_exit_nor_the_run_records_flush() -> None:
    """At exit the run records (and events, outcomes) are flushed first, then the spans —
    for 2 s at most. The SDK's own exit hook would wait 30 s for a collector that accepted
    the connection and never answers: past a worker's graceful timeout, the records lost."""
    script = textwrap.dedent("""
        import socket
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from flowgate.common.at_exit import flush_at_exit
        from flowgate.common.otel import Telemetry

        stalled = socket.socket()
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(64)  # connections are accepted by the kernel; nothing ever answers
        url = f"http://127.0.0.1:{stalled.getsockname()[1]}/v1/traces"
        telemetry = Telemetry("x", OTLPSpanExporter(endpoint=url, timeout=60), environ={})

        class Runs:
            def flush(self):
                print("runs flushed", flush=True)

        runs = Runs()
        flush_at_exit(telemetry.flush)  # as create_app registers them: spans first ...
        flush_at_exit(runs.flush)  # ... so they are flushed last
        for i in range(10):
            telemetry.client(None, f"call {i}").end()
        print("exiting", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=25)  # the SDK's hook alone took 30 s, a stalled export 60
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["exiting", "runs flushed"]


@pytest.mark.parametrize(("flag", "low_bits"), [("01", "ffffffffffffffff"), ("00", "0000000000000000"),
                                                ("01", "0000000000000000"), ("00", "ffffffffffffffff")])
def test_the_callers_sampled_flag_neither_forces_nor_stops_tracing(flag, low_bits) -> None:
    """Sampled at 50 %: a trace is recorded by its id (the same on every hop), whatever the
    caller's traceparent flag says — a tenant cannot turn on 100 % tracing at will."""
    exporter = InMemorySpanExporter()
    t = telemetry(exporter, environ={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                     "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    trace_id = "4bf92f3577b34da6" + low_bits
    header = f"00-{trace_id}-00f067aa0ba902b7-{flag}"
    span = t.server_span("POST /run-flow", tracing.from_headers(header, None), header)
    assert span.is_recording() is (low_bits == "0000000000000000")
    assert t.child(span, "run").is_recording() is span.is_recording()  # children follow
    span.end()


def test_the_engines_request_span_starts_when_the_request_arrived(tmp_path, monkeypatch) -> None:
    """A request whose head arrived 5 s ago (the gevent worker notes it; here it is set) and
    waited for a busy worker since: the engine's span, received over OTLP, shows the wait."""
    from prometheus_client import CollectorRegistry
    from support.keys import KEYS, as_
    from support.otlp import otlp_receiver

    from flow_engine.app import create_app
    from flow_engine.metrics import EngineMetrics
    from flowgate.common import gevent_worker

    trace_id = "5" * 32
    with otlp_receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        app = create_app({"database_url": f"sqlite:///{tmp_path / 'engine.db'}",
                          "api_keys": KEYS, "maintenance_interval_s": 0,
                          "rollout_interval_s": 0}, metrics=EngineMetrics(CollectorRegistry()))
        eng = app.extensions["flowgate"]
        try:
            token = gevent_worker._ARRIVED.set(time.perf_counter() - 5)
            sent = time.time_ns()
            try:
                resp = app.test_client().get("/api/v1/flows", headers={
                    **as_("editor"), "traceparent": f"00-{trace_id}-{'6' * 16}-01"})
                resp.close()
            finally:
                gevent_worker._ARRIVED.reset(token)
            assert resp.status_code == 200
            [span] = receiver.wait_for_trace(trace_id, bool, "the request's span")
        finally:
            eng.maintenance.stop()
            eng.runs.executor.close()
            eng.store.close()
    assert span.name == "GET /api/v1/flows"
    assert span.start_ns <= sent - 4_000_000_000 < span.end_ns
