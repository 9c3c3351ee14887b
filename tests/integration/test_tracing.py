"""OpenTelemetry spans as an SRE opens them: a real ambassador and a real engine (gunicorn +
gevent) exporting over OTLP/HTTP to a real receiver (tests/support/otlp.py: the protobuf a
collector's port 4318 takes, decoded with opentelemetry-proto), the LLM path through llm-sim.

One run through the ambassador is one trace, with the caller's trace id:
ambassador server span → upstream attempt → engine server span → run → each node → the
LLM call with its token counts. A collector that is down or refusing costs no request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import requests
import websocket
from support.otlp import OtlpReceiver, ReceivedSpan, otlp_receiver
from support.procs import free_port
from support.prom import metric_value as metric
from support.waiting import wait_until
from test_ambassador import (
    ENGINE_AUTH,
    FLOW_ID,
    Ambassadors,
    ensure_flow,
    quick_stop,
    start_engine,
    warm_up,
)

pytestmark = pytest.mark.integration

ROUTED = {  # a router that skips one branch: the skipped node still has its span
    "id": "routed",
    "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "route", "type": "ConditionalRouter",
         "params": {"operator": "contains", "pattern": "refund"}},
        {"id": "yes", "type": "ChatModel",
         "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
        {"id": "no", "type": "TextOutput"},
        {"id": "out", "type": "ChatOutput"},
    ],
    "edges": [{"source": "in", "target": "route"},
              {"source": "route", "source_output": "true", "target": "yes"},
              {"source": "route", "source_output": "false", "target": "no"},
              {"source": "yes", "target": "out"}],
}
ORDERS = {"id": "traced-orders", "nodes": [  # the flow the assistant's tool runs
    {"id": "in", "type": "ChatInput"},
    {"id": "llm", "type": "ChatModel",
     "params": {"provider": "openai", "model": "orders-model", "max_retries": 0}},
    {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}]}
ASSISTANT = {"id": "traced-assistant", "nodes": [
    {"id": "in", "type": "ChatInput"},
    {"id": "agent", "type": "Agent", "params": {
        "model": "flowgate-sim", "system_prompt": "Ask orders.", "max_retries": 0,
        "tools": ["orders"]}},
    {"id": "orders", "type": "FlowTool", "params": {
        "flow_id": "traced-orders", "name": "orders", "description": "Looks an order up."}},
    {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "agent", "target_input": "input"},
              {"source": "orders", "target": "agent", "target_input": "tools.orders"},
              {"source": "agent", "target": "out"}]}


def otel_env(endpoint: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced(tmp_path_factory, llm_sim, receiver):
    """An engine and an ambassador in front of it, both exporting to ``receiver``."""
    workdir = tmp_path_factory.mktemp("traced")
    engine = start_engine(workdir, llm_sim, env=otel_env(receiver.endpoint))
    ambassadors = Ambassadors(workdir)
    try:
        ensure_flow(engine.url)
        warm_up(engine.url, llm_sim)
        amb = ambassadors.start({}, engine.url, env=otel_env(receiver.endpoint))
        yield engine, amb
    finally:
        ambassadors.stop_all()
        quick_stop(engine)


def by_name(spans: list[ReceivedSpan], service: str, prefix: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == service and s.name.startswith(prefix)]


def whole(spans: list[ReceivedSpan]) -> bool:
    """Every span of one /run-flow request has arrived. Each service exports a span when it
    ends, in batches: the engine's request span ends after its response has gone out (a
    stream's last byte), later than the run span, and may come in a later batch."""
    return all(by_name(spans, service, prefix) for service, prefix in (
        ("flowgate-ambassador", "POST /run-flow"), ("flowgate-ambassador", "POST /api/v1/run/{flow}"),
        ("flowgate-engine", "POST /api/v1/run/"), ("flowgate-engine", "run ")))


def one(spans: list[ReceivedSpan], service: str, prefix: str) -> ReceivedSpan:
    found = by_name(spans, service, prefix)
    assert len(found) == 1, [(s.service, s.name) for s in spans]
    return found[0]


def test_one_run_through_the_ambassador_is_one_trace_down_to_the_llm_call(
        traced, receiver, fresh_llm_sim) -> None:
    _engine, amb = traced
    trace_id, caller_span = uuid.uuid4().hex, "b7ad6b7169203331"
    resp = amb.run("hello there", headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
                   session_id="order-1")
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["run_id"]

    spans = receiver.wait_for_trace(
        trace_id, whole, "the ambassador's and the run's spans")
    server = one(spans, "flowgate-ambassador", "POST /run-flow")
    attempt = one(spans, "flowgate-ambassador", "POST /api/v1/run/{flow}")
    engine = one(spans, "flowgate-engine", "POST /api/v1/run/")
    run = one(spans, "flowgate-engine", f"run {FLOW_ID}")
    nodes = {s.attributes["flowgate.node.id"]: s for s in by_name(spans, "flowgate-engine", "node ")}
    llm = one(spans, "flowgate-engine", "chat")

    # the tree, hop by hop, under the caller's own span
    assert server.parent_span_id == caller_span and server.kind == "server"
    assert attempt.parent_span_id == server.span_id and attempt.kind == "client"
    assert engine.parent_span_id == attempt.span_id and engine.kind == "server"
    assert run.parent_span_id == engine.span_id
    assert set(nodes) == {"in", "llm", "out"}
    assert all(n.parent_span_id == run.span_id for n in nodes.values())
    assert llm.parent_span_id == nodes["llm"].span_id and llm.kind == "client"

    # what each says
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["flowgate.flow.id"] == FLOW_ID
    assert server.attributes["flowgate.cache"] == "bypass"  # a conversation is never cached
    assert attempt.attributes["flowgate.attempt"] == 1
    assert attempt.attributes["url.path"] == f"/api/v1/run/{FLOW_ID}"
    assert engine.attributes["http.route"] == "/api/v1/run/<flow_ref>"
    assert run.attributes["flowgate.run.id"] == run_id
    assert run.attributes["flowgate.flow.version"] == 1
    assert run.attributes["session.id"] == "order-1"
    assert nodes["llm"].attributes["flowgate.node.type"] == "ChatModel"
    assert llm.attributes["gen_ai.operation.name"] == "chat"
    assert llm.attributes["gen_ai.request.model"] == "flowgate-sim"
    assert llm.attributes["gen_ai.usage.output_tokens"] > 0
    assert llm.attributes["gen_ai.usage.input_tokens"] > 0
    first = llm.event("gen_ai.first_token")
    assert first is not None and first["gen_ai.response.time_to_first_token"] >= 0
    # children inside their parents' time
    for child, parent in ((attempt, server), (run, engine), (llm, nodes["llm"])):
        assert parent.start_ns <= child.start_ns and child.end_ns <= parent.end_ns, child.name
    # across the hop only what causality orders: the engine's request began after the
    # attempt sent it, and its run ended before the answer the attempt waits for was sent.
    # The engine's server span ends once its answer is written, which can be after the
    # ambassador has read it and closed its attempt (it failed so once in CI, by 1.6 ms).
    assert attempt.start_ns <= engine.start_ns and run.end_ns <= attempt.end_ns
    assert not any(s.error for s in spans)


def test_a_streamed_run_and_a_skipped_branch(traced, receiver, fresh_llm_sim) -> None:
    engine, amb = traced
    resp = requests.post(engine.url + "/api/v1/flows", json=ROUTED, headers=ENGINE_AUTH,
                         timeout=10)
    assert resp.status_code in (201, 409), resp.text
    trace_id = uuid.uuid4().hex
    with requests.post(amb.url + "/run-flow", json={"flow_id": "routed", "input": "refund please",
                                                    "stream": True},
                       headers={"traceparent": f"00-{trace_id}-{'c' * 16}-01"}, stream=True,
                       timeout=30) as streamed:
        assert streamed.status_code == 200
        body = b"".join(streamed.iter_content(None))
    assert b"run_finished" in body

    spans = receiver.wait_for_trace(
        trace_id, whole, "a streamed run's spans")
    run = one(spans, "flowgate-engine", "run routed")
    nodes = {s.attributes["flowgate.node.id"]: s for s in by_name(spans, "flowgate-engine", "node ")}
    assert set(nodes) == {"in", "route", "yes", "no", "out"}
    assert nodes["no"].attributes["flowgate.node.skipped"] is True
    assert nodes["no"].start_ns == nodes["no"].end_ns
    assert nodes["yes"].attributes["flowgate.node.skipped"] is False
    assert all(n.parent_span_id == run.span_id for n in nodes.values())
    engine_span = one(spans, "flowgate-engine", "POST /api/v1/run/")
    assert run.parent_span_id == engine_span.span_id
    assert engine_span.end_ns >= run.end_ns  # the server span lasts until the stream ends


def test_a_flow_a_tool_runs_has_its_llm_call_under_the_tool_span(traced, receiver,
                                                                 fresh_llm_sim) -> None:
    engine, amb = traced
    for definition in (ORDERS, ASSISTANT):
        resp = requests.post(engine.url + "/api/v1/flows", json=definition, headers=ENGINE_AUTH,
                             timeout=10)
        assert resp.status_code in (201, 409), resp.text
    trace_id = uuid.uuid4().hex
    resp = amb.run("Where is order 42?", flow_id="traced-assistant",
                   headers={"traceparent": f"00-{trace_id}-{'f' * 16}-01"})
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]

    spans = receiver.wait_for_trace(
        trace_id, lambda s: whole(s) and bool(by_name(s, "flowgate-engine", "run traced-orders")),
        "the run's and its sub-flow's spans")
    tool = one(spans, "flowgate-engine", "execute_tool")
    sub = one(spans, "flowgate-engine", "run traced-orders")
    chats = by_name(spans, "flowgate-engine", "chat")
    [sub_chat] = [c for c in chats if c.attributes["gen_ai.request.model"] == "orders-model"]
    by_id = {s.span_id: s for s in spans}
    assert sub.parent_span_id == tool.span_id
    assert by_id[sub_chat.parent_span_id].parent_span_id == sub.span_id  # node llm
    # Tempo's token totals for the trace are the run's usage
    assert len(chats) == usage["llm_calls"] == 3
    for side in ("input", "output"):
        assert sum(c.attributes[f"gen_ai.usage.{side}_tokens"] for c in chats) \
            == usage[f"{side}_tokens"]


def test_probes_and_metric_scrapes_make_no_spans(traced, receiver, fresh_llm_sim) -> None:
    """Neither service traces /healthz, /readyz, /metrics — the ambassador's own probes of
    the engine's /readyz included, which it sends every half second. Each engine worker (one
    here) exports its spans in the order they ended, so once a later run's spans have
    arrived, the probes' would have too."""
    engine, amb = traced
    probe_trace = uuid.uuid4().hex
    for url in (engine.url, amb.url):
        for path in ("/healthz", "/readyz", "/metrics"):
            requests.get(url + path, timeout=10,
                         headers={"traceparent": f"00-{probe_trace}-{'1' * 16}-01"})
    trace_id = uuid.uuid4().hex
    assert amb.run("after the probes", headers={
        "traceparent": f"00-{trace_id}-{'2' * 16}-01"}).status_code == 200
    receiver.wait_for_trace(trace_id, whole, "the run's spans")
    probes = {"/healthz", "/readyz", "/metrics"}
    with receiver._lock:
        spans = list(receiver.spans)
    probed = [(s.service, s.name) for s in spans if s.trace_id == probe_trace
              or probes & {s.attributes.get("url.path"), s.attributes.get("http.route")}]
    assert probed == []


def test_a_failed_llm_call_marks_its_spans_and_the_answer_is_the_usual_error(
        traced, receiver, fresh_llm_sim) -> None:
    _engine, amb = traced
    fresh_llm_sim.configure(error_rate=1, error_kinds=["500"])
    trace_id = uuid.uuid4().hex
    resp = amb.run("this fails", headers={"traceparent": f"00-{trace_id}-{'d' * 16}-01"})
    assert resp.status_code >= 500, resp.text
    spans = receiver.wait_for_trace(
        trace_id, whole, "a failed run's spans")
    run = one(spans, "flowgate-engine", f"run {FLOW_ID}")
    assert run.error and run.attributes["flowgate.run.status"] == "failed"
    llm_node = next(s for s in by_name(spans, "flowgate-engine", "node ")
                    if s.attributes["flowgate.node.id"] == "llm")
    assert llm_node.error
    assert one(spans, "flowgate-ambassador", "POST /run-flow").error


def test_without_a_traceparent_the_trace_id_is_the_one_the_answer_and_logs_carry(
        traced, receiver, fresh_llm_sim) -> None:
    _engine, amb = traced
    resp = amb.run("no trace header")
    assert resp.status_code == 200
    trace_id = resp.headers["X-Trace-ID"]
    spans = receiver.wait_for_trace(
        trace_id, whole, "the run's spans")
    server = one(spans, "flowgate-ambassador", "POST /run-flow")
    assert server.parent_span_id == ""  # the root of its trace


def test_runs_over_the_websocket_bridge_are_spans_of_its_session(traced, receiver,
                                                                  fresh_llm_sim) -> None:
    _engine, amb = traced
    trace_id = uuid.uuid4().hex
    ws = websocket.create_connection(amb.url.replace("http", "ws") + "/ws/run-flow", timeout=30,
                                     header=[f"traceparent: 00-{trace_id}-{'a' * 16}-01"])
    try:
        for text in ("first", "second"):
            ws.send(json.dumps({"type": "run", "flow_id": FLOW_ID, "input": text}))
            while (message := json.loads(ws.recv()))["type"] not in ("run_finished", "error"):
                pass
            assert message["type"] == "run_finished", message
    finally:
        ws.close()
    spans = receiver.wait_for_trace(
        trace_id, lambda s: len(by_name(s, "flowgate-engine", "run ")) == 2
        and bool(by_name(s, "flowgate-ambassador", "GET /ws/run-flow"))
        and bool(by_name(s, "flowgate-engine", "GET /api/v1/ws/runs")), "the session's spans")
    session = one(spans, "flowgate-ambassador", "GET /ws/run-flow")
    engine_ws = one(spans, "flowgate-engine", "GET /api/v1/ws/runs")
    assert session.parent_span_id == "a" * 16
    assert engine_ws.parent_span_id == session.span_id
    runs = by_name(spans, "flowgate-engine", "run ")
    assert all(r.parent_span_id == engine_ws.span_id for r in runs)


def test_a_callers_unsampled_flag_does_not_turn_tracing_off(traced, receiver,
                                                             fresh_llm_sim) -> None:
    """Sampling is the services' decision by trace id (flowgate/common/otel.py: sampler): here
    every trace is recorded, a caller's "-00" included, and it cannot force one either."""
    _engine, amb = traced
    trace_id = uuid.uuid4().hex
    resp = amb.run("not sampled", headers={"traceparent": f"00-{trace_id}-{'e' * 16}-00"})
    assert resp.status_code == 200 and resp.headers["X-Trace-ID"] == trace_id
    spans = receiver.wait_for_trace(
        trace_id, whole, "the request's spans")
    assert one(spans, "flowgate-ambassador", "POST /run-flow").parent_span_id == "e" * 16


def test_a_collector_that_is_down_or_refusing_costs_no_request(tmp_path, llm_sim,
                                                                fresh_llm_sim) -> None:
    with otlp_receiver() as refusing:
        refusing.refusing = True
        down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        engine = start_engine(tmp_path, llm_sim, env=otel_env(down))
        ambassadors = Ambassadors(tmp_path)
        try:
            ensure_flow(engine.url)
            amb = ambassadors.start({}, engine.url, env=otel_env(refusing.endpoint))
            statuses = [amb.run(f"question {i}").status_code for i in range(20)]
            assert statuses == [200] * 20
            # what could not be delivered is counted, by each service
            wait_until(lambda: metric(amb.metrics(), "flowgate_ambassador_spans_dropped_total",
                                      reason="export_failed") > 0,
                       "the ambassador counts the spans the collector refused")
            wait_until(lambda: metric(requests.get(engine.url + "/metrics", timeout=10).text,
                                      "flowgate_engine_spans_dropped_total",
                                      reason="export_failed") > 0,
                       "the engine counts the spans it could not send")
            assert refusing.refused > 0 and refusing.spans == []  # it was asked, and refused
        finally:
            ambassadors.stop_all()
            quick_stop(engine)
