"""Drills: the engine is killed with SIGKILL (master and both workers) under a steady load
through the ambassador — once with only the load, once in the middle of a burst of
publishes — and restarted on the same port, store and Redis.

While it is down every request must still get an answer — the contract's 503 (connection
refused after the retries, or the open breaker) or 502/504 — within the ambassador's
deadline; no request may reach the LLM twice (the ambassador retries a broken keyed run, the
engine answers a retried key with the first run); once the engine is back and one run has
gone through, every request must succeed again (the breaker closes)."""

from __future__ import annotations

import threading

import pytest
from support.chaos import Load, Outcomes, Publisher, admin, flow, store_inconsistencies, verdict, wait_for

# bounded inside (loads, waits, budgets); past 120 s a failing drill still reports its numbers
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_engine_sigkill_under_load_then_restart(chaos):
    chaos.sim.configure(ttft_s=0.1, tokens_per_s=50, reply_tokens=8)
    stack = chaos.stack()
    calls = chaos.calls()
    outcomes = Outcomes()
    with Load(stack, outcomes) as load:
        load.wait_done(20)
        stack.kill_engine()
        killed_at = outcomes.done()
        load.wait_done(killed_at + 8)  # answered while the engine is down
        stack.restart_engine()
        recovery_s = stack.wait_recovered()
        healed = load.finish_after(25)
    calls.stop()

    v = verdict(outcomes.all(), calls, recovered_from_seq=healed, recoveries=[recovery_s])
    problems = chaos.report(v)
    assert v.sent_after_recovery == 25
    assert v.successes >= 20
    assert not problems, "\n".join(problems)


BURST_FLOWS = ("burst-a", "burst-b", "burst-c")


def test_engine_sigkill_during_a_burst_of_publishes(chaos):
    """kill -9 of the engine while three publishers add and publish versions as fast as the
    engine answers (and the load runs). After the restart each flow's store is consistent:
    versions contiguous from 1, every acknowledged version there with its own definition,
    the live version an existing one — the last acknowledged publish, or the publish that
    was in flight when the engine died."""
    chaos.sim.configure(ttft_s=0.1, tokens_per_s=50, reply_tokens=8)
    stack = chaos.stack()
    for flow_id in BURST_FLOWS:
        assert admin("POST", stack.engine_url + "/api/v1/flows", flow(flow_id, "v1")).status_code == 201
    calls = chaos.calls()
    outcomes = Outcomes()
    publishers = [Publisher(stack.engine_url, flow_id) for flow_id in BURST_FLOWS]
    with Load(stack, outcomes) as load:
        load.wait_done(10)
        threads = [threading.Thread(target=p.run, daemon=True) for p in publishers]
        for t in threads:
            t.start()
        wait_for(lambda: all(p.acked() >= 3 for p in publishers), 60, "a burst of publishes")
        stack.kill_engine()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a publisher never noticed the engine died"
        stack.restart_engine()
        recovery_s = stack.wait_recovered()
        healed = load.finish_after(20)
    calls.stop()

    inconsistent = store_inconsistencies(publishers)
    v = verdict(outcomes.all(), calls, recovered_from_seq=healed, recoveries=[recovery_s])
    problems = chaos.report(v, publishes_acked=[p.acked() for p in publishers],
                            stopped_by=[p.stopped_by for p in publishers])
    assert v.sent_after_recovery == 20
    assert not inconsistent, "\n".join(inconsistent)
    assert not problems, "\n".join(problems)
