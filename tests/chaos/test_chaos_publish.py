"""Drill: 20 publishes, canaries and rollbacks of the flow that a steady load is running.

Every version's prompt carries its label (``[vN]``), which llm-sim quotes back, so each
answer shows which definition really ran. A run must finish on the version it started on:
its answer's ``version`` is one that was live or canary while it was under way (see
``Timeline``), its output is that version's, and a stream's ``run_started`` and
``run_finished`` name the same version. The usual four hold as well: nothing lost or run
twice, no 5xx, no answer late; and here, with no fault at all, every request succeeds."""

from __future__ import annotations

import time

import pytest
from support.chaos import FLOW_ID, Load, Outcomes, Timeline, admin, flow, verdict

# bounded inside (loads, waits, budgets); past 120 s a failing drill still reports its numbers
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CHANGES = 20
# How long a worker may serve a live pointer it read before a change. Its copy expires
# FLOW_CACHE_TTL_S after the moment it *began* reading (flow_engine/service.py), so however
# late the machine lets a worker run, an old version cannot serve past the change's
# acknowledgement + FLOW_CACHE_TTL_S; the timeline adds 0.35 s on top of that.
FLOW_CACHE_TTL_S = 0.25


def test_twenty_publishes_and_rollbacks_under_load(chaos):
    chaos.sim.configure(ttft_s=0.3, tokens_per_s=50, reply_tokens=8)  # runs overlap changes
    stack = chaos.stack(engine_env={"FLOW_ENGINE_FLOW_CACHE_TTL_S": str(FLOW_CACHE_TTL_S)})
    base = f"{stack.engine_url}/api/v1/flows/{FLOW_ID}"
    timeline = Timeline(live=1, slack_s=FLOW_CACHE_TTL_S + 0.35)
    calls = chaos.calls()
    outcomes = Outcomes()
    applied: list[str] = []
    latest = 1
    with Load(stack, outcomes, mix={"run": 0.6, "stream": 0.4}) as load:
        for i in range(CHANGES):
            load.wait_done(5 + 6 * i)  # a change every 6 answers
            sent = time.monotonic()
            if i % 4 == 3:
                resp = admin("POST", base + "/rollback")
                what = "rollback"
            else:
                created = admin("PUT", base, flow(FLOW_ID, f"v{latest + 1}"))
                assert created.status_code == 201, created.text
                latest = created.json()["version"]
                if i % 4 == 1:
                    resp = admin("PUT", base + "/routing",
                                 {"canary": {"version": latest, "percent": 50}})
                    what = f"canary v{latest}"
                else:
                    resp = admin("POST", base + "/publish", {"version": latest})
                    what = f"publish v{latest}"
            assert resp.status_code == 200, (what, resp.status_code, resp.text)
            timeline.record(sent, time.monotonic(), resp.json())
            applied.append(what)
        healed = load.finish_after(15)
    calls.stop()

    all_outcomes = outcomes.all()
    wrong = []
    for o in all_outcomes:
        if o.ok and o.version not in timeline.allowed(o.started, o.ended):
            wrong.append(f"{o.kind} {o.tag}: version {o.version}, while only "
                         f"{sorted(timeline.allowed(o.started, o.ended))} served")
    versions_seen = sorted({o.version for o in all_outcomes if o.ok})
    v = verdict(all_outcomes, calls, recovered_from_seq=0)
    problems = chaos.report(v, changes=len(applied), versions_seen=versions_seen)
    assert len(applied) == CHANGES
    assert not wrong, "\n".join(wrong[:10])
    assert len(versions_seen) >= 5, versions_seen  # the load did see the changes
    assert healed > 0
    assert not problems, "\n".join(problems)
