"""Issue #14 against real processes: a real `flowgate ambassador` (gunicorn + gevent, the
flow's cache configured) in front of a real `flowgate engine` and the llm-sim.

Fifty identical `/run-flow` requests sent at once make one LLM call; the leader's answer is
every answer, 49 of them `X-Cache: COALESCED`, each with its own trace id. Nothing here
depends on timing: the llm-sim holds the LLM call (its `hold` setting) until the test
releases it, and the test releases it only once the llm-sim holds the one call and the
ambassador has logged each follower joining the flight (a DEBUG line per follower, carrying
its trace id and the leader's). So every follower has joined before the answer exists —
none can arrive after the store and be a HIT instead.

Processes and helpers are those of test_ambassador.py; every wait is bounded.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from test_ambassador import (
    FLOW_ID,
    Ambassador,
    assert_error_contract,
    engine_run_record,
    expected_output,
    wait_for,
)

pytestmark = pytest.mark.integration
WAIT_S = 30
N = 50
JOINED = "waiting for an identical request in flight"  # the cache filter's DEBUG line
CONFIG: dict[str, Any] = {
    "flows": {FLOW_ID: {"cache": {"ttl_s": 60, "stale_if_error_s": 600}}},
    # the held call must not meet a deadline while the test lines the followers up
    "upstream": {"timeouts": {"per_try_s": 60, "total_s": 120}},
}
DEBUG = {"AMBASSADOR_LOG_LEVEL": "DEBUG"}


@pytest.fixture
def held_sim(fresh_llm_sim):
    """The llm-sim holding every chat completion until ``configure(hold=False)`` (and at the
    end of the test whatever happens: fresh_llm_sim restores the defaults)."""
    fresh_llm_sim.configure(hold=True)
    yield fresh_llm_sim


def joined(amb: Ambassador) -> list[dict[str, Any]]:
    """The ambassador's log lines of followers joining a flight, so far."""
    assert amb.proc.log_path is not None
    lines = []
    for line in amb.proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and JOINED in line:
            entry = json.loads(line)
            if entry.get("msg") == JOINED:
                lines.append(entry)
    return lines


def send_together(amb: Ambassador, sim, calls: list[dict[str, Any]], held: int,
                  followers: int) -> list[requests.Response]:
    """Send every call at once; release the llm-sim once it holds ``held`` LLM calls and the
    ambassador logged ``followers`` followers waiting; the answers, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(amb.run, timeout=90, **call) for call in calls]
        try:
            wait_for(lambda: sim.stats()["held"] == held, WAIT_S,
                     what=f"the llm-sim holds {held} LLM call(s)")
            wait_for(lambda: len(joined(amb)) == followers, WAIT_S,
                     what=lambda: f"{followers} followers wait (the ambassador logged "
                                  f"{len(joined(amb))})")
            # everyone is in: nothing else reached the LLM, and nothing will
            assert sim.stats()["held"] == held
            assert len(sim.requests()) == held
        finally:
            sim.configure(hold=False)
        return [future.result() for future in futures]


def test_fifty_identical_requests_make_one_llm_call(engine, start_ambassador, held_sim):
    amb = start_ambassador(CONFIG, engine.url, env=DEBUG)
    text = f"coalesce me {uuid.uuid4().hex[:8]}"

    answers = send_together(amb, held_sim, [{"text": text}] * N, held=1, followers=N - 1)

    assert [r.status_code for r in answers] == [200] * N, [r.text for r in answers]
    assert len(held_sim.requests()) == 1  # exactly one LLM call, at the llm-sim
    assert held_sim.stats()["chat_completions_started"] == 1
    assert len({r.content for r in answers}) == 1  # the same answer, byte for byte
    body = answers[0].json()
    assert body["output"] == expected_output(text)
    assert Counter(r.headers["X-Cache"] for r in answers) == {"COALESCED": N - 1, "MISS": 1}
    # one run answered everyone: the followers carry the leader's X-Run-ID
    assert {r.headers["X-Run-ID"] for r in answers} == {body["run_id"]}
    assert {r.headers["X-Flow-Version"] for r in answers} == {"1"}
    # ...but each answer has its own trace
    traces = [r.headers["X-Trace-ID"] for r in answers]
    assert len(set(traces)) == N
    [leader] = [r for r in answers if r.headers["X-Cache"] == "MISS"]
    followers = [r for r in answers if r.headers["X-Cache"] == "COALESCED"]
    for r in followers:
        assert r.headers["traceparent"].split("-")[1] == r.headers["X-Trace-ID"]
        assert "X-Upstream-Attempts" not in r.headers  # a follower made no attempt itself
    assert leader.headers["X-Upstream-Attempts"] == "1"
    # the log says which request each follower waited for, under the follower's own trace
    lines = joined(amb)
    assert sorted(line["trace_id"] for line in lines) == sorted(
        r.headers["X-Trace-ID"] for r in followers)
    assert {line["leader_trace_id"] for line in lines} == {leader.headers["X-Trace-ID"]}
    # the engine ran that one run under the leader's trace
    assert engine_run_record(engine.url, body["run_id"])["trace_id"] == leader.headers[
        "X-Trace-ID"]
    assert amb.metric("flowgate_ambassador_cache_total", result="coalesced") == N - 1
    assert amb.metric("flowgate_ambassador_cache_total", result="miss") == 1

    # the leader stored the answer before the followers woke: the next one is a hit
    hit = amb.run(text)
    assert (hit.headers["X-Cache"], hit.content) == ("HIT", answers[0].content)
    assert len(held_sim.requests()) == 1


def test_the_leaders_error_is_every_followers_error(engine, start_ambassador, held_sim):
    """The LLM fails (502): every follower gets that 502 — in the error contract, with its
    own trace id in the body — and nobody calls the LLM a second time."""
    held_sim.configure(error_rate=1.0, error_kinds=["500"])
    amb = start_ambassador(CONFIG, engine.url, env=DEBUG)
    text = f"fail me {uuid.uuid4().hex[:8]}"

    answers = send_together(amb, held_sim, [{"text": text}] * 10, held=1, followers=9)

    codes = {assert_error_contract(r, 502, ("llm_error", "run_failed"))["code"]
             for r in answers}
    assert len(codes) == 1
    assert len({r.json()["error"]["message"] for r in answers}) == 1
    assert len({r.headers["X-Trace-ID"] for r in answers}) == 10
    assert Counter(r.headers["X-Cache"] for r in answers) == {"COALESCED": 9, "MISS": 1}
    assert held_sim.stats()["errors_injected"]["500"] == 1
    assert len(held_sim.requests()) == 1


def test_tenants_never_share_a_flight(engine, start_ambassador, held_sim):
    """Two tenants send the same input at once: one LLM call each, and each tenant's
    answers come from its own run only."""
    keys = [{"key": "shop-key-00001", "identity": "shop-orders", "tenant": "shop"},
            {"key": "shop-key-00002", "identity": "shop-reports", "tenant": "shop"},
            {"key": "bank-key-00001", "identity": "bank-app", "tenant": "bank"}]
    amb = start_ambassador({**CONFIG, "inbound_auth": {"mode": "api_keys", "api_keys": keys}},
                           engine.url, env=DEBUG)
    text = f"tenant {uuid.uuid4().hex[:8]}"
    callers = ["shop-key-00001", "shop-key-00002", "bank-key-00001"] * 4
    calls = [{"text": text, "headers": {"x-api-key": key}} for key in callers]

    answers = send_together(amb, held_sim, calls, held=2, followers=len(calls) - 2)

    assert [r.status_code for r in answers] == [200] * len(calls)
    run_of: dict[str, set[str]] = {"shop": set(), "bank": set()}
    for key, r in zip(callers, answers, strict=True):
        run_of["bank" if key.startswith("bank") else "shop"].add(r.json()["run_id"])
    assert all(len(runs) == 1 for runs in run_of.values())
    assert run_of["shop"] != run_of["bank"]
    assert Counter(r.headers["X-Cache"] for r in answers) == {"COALESCED": 10, "MISS": 2}
    assert len(held_sim.requests()) == 2
