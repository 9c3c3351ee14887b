"""Issue #14: fault drills against real processes — a real `flowgate ambassador` (gunicorn +
gevent) with a YAML config in front of a real `flowgate engine` and the llm-sim.

- ``flows.<id>.fault.abort`` at 100 % is an engine failure to the ambassador's own filters:
  retried (503 with Retry-After is load shedding), counted by the breaker until it opens,
  answered by the flow's fallback — and not one run reaches the engine; /metrics shows it
  all, ``faults_injected_total`` included;
- an edit of the config file that turns the fault off is in force without a restart;
- ``X-Flowgate-Fault`` from an API key allowed to send it: an abort, a delay as long as the
  per-try limit (the upstream's own timeout, retried), and the refusals (403, 400); each
  injection one JSON log line with the request's trace id.

Processes and helpers are those of test_ambassador.py. Nothing depends on timing: waits are
bounded loops on a condition, and what a test proves is read from answers and metrics.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
import yaml
from test_ambassador import (
    BASE_CONFIG,
    FLOW_ID,
    Ambassador,
    assert_error_contract,
    expected_output,
    merged,
    wait_for,
)

pytestmark = pytest.mark.integration
WAIT_S = 15
FAULTS = "flowgate_ambassador_faults_injected_total"
DRILL_KEY = "drill-secret-0001"
APP_KEY = "orders-secret-0001"
PER_TRY_S = 5.0  # the header drill's per-try limit, and the delay that uses it up


def test_an_injected_abort_is_retried_opens_the_breaker_and_the_fallback_answers(
        engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({
        "flows": {FLOW_ID: {"fault": {"abort": {"percent": 100, "status": 503}},
                            "fallback": {"output": "drill: the assistant is away"}}},
        "retry": {"max_attempts": 2, "budget_min_per_s": 10},
        # open after 3 failed requests and stay open for the rest of the test
        "breaker": {"consecutive_failures": 3, "backoff_base_s": 600, "open_s": 600},
    }, engine.url)

    reasons = []

    def circuit_opened() -> bool:
        resp = amb.run("drill")
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Fallback"] == "true"
        body = resp.json()
        assert body["fallback"] is True and body["output"] == "drill: the assistant is away"
        reasons.append(body["fallback_reason"])
        return body["fallback_reason"] == "circuit_open"

    wait_for(circuit_opened, WAIT_S, interval_s=0, what="the breaker opens on injected 503s")
    # open: answered at once by the breaker, the fault filter behind it is not reached
    assert all(circuit_opened() for _ in range(3))
    aborted = reasons.count("fault_injected")

    assert reasons == ["fault_injected"] * 3 + ["circuit_open"] * 4, reasons
    assert amb.metric(FAULTS, flow=FLOW_ID, kind="abort") == 2 * aborted  # every attempt
    assert amb.metric(FAULTS, flow=FLOW_ID, kind="delay") == 0
    assert amb.metric("flowgate_ambassador_retries_total", reason="unavailable") == aborted
    assert amb.metric("flowgate_ambassador_breaker_transitions_total", to="open") == 1
    assert amb.metric("flowgate_ambassador_breaker_state", state="open") == 1
    assert amb.metric("flowgate_ambassador_fallbacks_total", flow=FLOW_ID) == len(reasons)
    # the engine never saw a run: no attempt went upstream, the LLM was never called
    assert amb.metric("flowgate_ambassador_upstream_attempts_total", outcome="ok") == 0
    assert fresh_llm_sim.stats()["chat_completions_started"] == 0
    ready = requests.get(amb.url + "/readyz?verbose=1", timeout=5).json()
    assert ready["upstream"]["breaker"] == "open"


def test_turning_the_fault_off_in_the_config_file_needs_no_restart(engine, start_ambassador,
                                                                    fresh_llm_sim):
    faulty = {"flows": {FLOW_ID: {"fault": {"abort": {"percent": 100, "status": 502}}}}}
    amb = start_ambassador(faulty, engine.url)
    pid = amb.proc.proc.pid
    error = assert_error_contract(amb.run("before"), 502, "fault_injected")
    assert "fault" in error["message"]
    assert amb.metric(FAULTS, flow=FLOW_ID, kind="abort") == 1  # a 502 is not retried

    amb.write_config(yaml.safe_dump(merged(BASE_CONFIG, {"flows": {FLOW_ID: {}}})))

    def fault_off() -> bool:
        resp = amb.run("after")
        if resp.status_code == 502:  # the old config, until the edit is read
            assert resp.json()["error"]["code"] == "fault_injected", resp.text
            return False
        assert resp.status_code == 200, resp.text
        return True

    wait_for(fault_off, WAIT_S, interval_s=0.1, what="the edited config (no fault) is in force")
    injected = amb.metric(FAULTS, flow=FLOW_ID, kind="abort")
    resp = amb.run("after the edit")
    assert resp.status_code == 200 and resp.json()["output"] == expected_output("after the edit")
    assert amb.metric(FAULTS, flow=FLOW_ID, kind="abort") == injected  # nothing more injected
    assert amb.metric("flowgate_ambassador_config_reload_errors_total") == 0
    assert amb.proc.alive() and amb.proc.proc.pid == pid  # the same process: no restart

    # and back on, the same way
    amb.write_config(yaml.safe_dump(merged(BASE_CONFIG, faulty)))
    wait_for(lambda: amb.run("on again").status_code == 502, WAIT_S, interval_s=0.1,
             what="the fault is back on")
    assert amb.metric(FAULTS, flow=FLOW_ID, kind="abort") > injected


def fault_log_lines(amb: Ambassador) -> list[dict[str, Any]]:
    assert amb.proc.log_path is not None
    entries = []
    for line in amb.proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"fault injected"' in line:
            entries.append(json.loads(line))
    return entries


def test_the_fault_header_from_an_allowed_key(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({
        "inbound_auth": {"mode": "api_keys", "api_keys": [
            {"key": DRILL_KEY, "identity": "drill-app", "flows": [FLOW_ID],
             "allow_fault_header": True},
            {"key": APP_KEY, "identity": "orders-app", "flows": [FLOW_ID]}]},
        # per_try_s bounds the plain run at the end too: generous, so that a slow machine
        # never decides it; total_s leaves the delayed drill's second attempt one second
        "upstream": {"timeouts": {"per_try_s": PER_TRY_S, "total_s": PER_TRY_S + 1}},
        "retry": {"max_attempts": 2, "budget_min_per_s": 10},
        "breaker": {"consecutive_failures": 100},
    }, engine.url)

    def run(key: str, fault: str | None = None, text: str = "hello") -> requests.Response:
        headers = {"x-api-key": key, **({"X-Flowgate-Fault": fault} if fault else {})}
        return amb.run(text, headers=headers)

    # refused: another identity (403), a malformed value (400) — nothing reaches the engine
    assert_error_contract(run(APP_KEY, "abort=503"), 403, "fault_not_allowed")
    for bad in ("abort=200", "delay=-1", "delay=60001", "abort=503;abort=503", "crash=1",
                "delay=" + "1" * 70):
        assert_error_contract(run(DRILL_KEY, bad), 400, "bad_request")

    # an abort at 100 %, every attempt: 503 with Retry-After is retried, then answered
    resp = run(DRILL_KEY, "abort=503")
    error = assert_error_contract(resp, 503, "fault_injected")
    assert resp.headers["X-Upstream-Attempts"] == "2" and resp.headers["Retry-After"] == "1"

    # a delay as long as the per-try limit is the upstream's own timeout, retried (the
    # ambassador's Idempotency-Key makes a timed-out run safe to retry)
    resp = run(DRILL_KEY, f"delay={int(PER_TRY_S * 1000)}")
    assert_error_contract(resp, 504, ("upstream_timeout", "timeout"))
    assert int(resp.headers["X-Upstream-Attempts"]) >= 1
    assert fresh_llm_sim.stats()["chat_completions_started"] == 0

    # without the header, the same key runs the flow as usual
    ok = run(DRILL_KEY, text="no drill")
    assert ok.status_code == 200 and ok.json()["output"] == expected_output("no drill")

    assert amb.metric(FAULTS, flow=FLOW_ID, kind="abort") == 2
    assert amb.metric(FAULTS, flow=FLOW_ID, kind="delay") == int(resp.headers["X-Upstream-Attempts"])
    assert amb.metric("flowgate_ambassador_retries_total", reason="unavailable") == 1

    # one JSON log line per injected attempt, with the request's trace id
    def logged() -> list[dict[str, Any]]:
        lines = fault_log_lines(amb)
        return lines if len(lines) == 2 + int(resp.headers["X-Upstream-Attempts"]) else []

    lines = wait_for(logged, WAIT_S, what="the fault log lines are written")
    aborts = [e for e in lines if e.get("abort_status") == 503]
    assert len(aborts) == 2 and {e["trace_id"] for e in aborts} == {error["trace_id"]}
    assert {e["identity"] for e in lines} == {"drill-app"}
    assert {e["fault_source"] for e in lines} == {"header"}
    delays = [e for e in lines if e.get("delay_ms") == PER_TRY_S * 1000]
    assert {e["trace_id"] for e in delays} == {resp.headers["X-Trace-ID"]}
