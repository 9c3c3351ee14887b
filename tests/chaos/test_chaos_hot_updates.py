"""Drill (issue 13's proof): 5,000 runs through the ambassador — plain, streamed, WebSocket
and cached — while 20 publishes, rollbacks and routing changes land on the two flows they
run. The deployment is production's shape: an engine with two gevent workers on PostgreSQL
and Redis, an ambassador sharing that Redis (its cache follows routing through the engine's
signals), llm-sim behind.

What must hold: no request fails; every answer's version is one that routing allowed while
the request was under way (``Timeline``) and its output is that version's (each version's
prompt carries its label, which llm-sim quotes); a stream or WebSocket run finishes on the
version it started on; a cached answer is never one of a version routing no longer sends
the request to; and the audit log holds exactly the 20 changes, in order, by their actor."""

from __future__ import annotations

import time

import pytest
from support.chaos import CACHED_FLOW_ID, FLOW_ID, Load, Outcomes, Timeline, admin, flow, verdict

from ambassador.routing_view import CHECK_S

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
RUNS = 5000
# How long an engine worker may serve a routing it read before a change: its copy expires
# FLOW_CACHE_TTL_S after the moment it began reading (flow_engine/service.py), so no
# scheduling delay can stretch that past the change's acknowledgement + FLOW_CACHE_TTL_S.
FLOW_CACHE_TTL_S = 0.25
# The ambassador's view of routing (ambassador/routing_view.py) is dropped by the engine's
# signal at once; whatever happens to the signal, it serves hits for at most CHECK_S from the
# moment its read *began* (a read that fails makes the routing unknown: no hits), and a read
# that still got the old routing began within FLOW_CACHE_TTL_S of the change. So the latest
# moment the ambassador could have known is the change's acknowledgement + FLOW_CACHE_TTL_S +
# CHECK_S, however late a loaded machine runs its timers; a cache that ignored routing would
# serve the old version for its whole ttl (600 s).
AMBASSADOR_SLACK_S = FLOW_CACHE_TTL_S + CHECK_S + 0.35

# (flow, what): 20 changes, each kind on both flows; versions 2-4 are stored before the load
PLAN = [
    (FLOW_ID, ("publish", 2)), (CACHED_FLOW_ID, ("publish", 2)),
    (FLOW_ID, ("canary", 3, 30, False)), (CACHED_FLOW_ID, ("canary", 3, 50, True)),
    (FLOW_ID, ("publish", 3)), (CACHED_FLOW_ID, ("publish", 3)),
    (FLOW_ID, ("rollback",)), (CACHED_FLOW_ID, ("rollback",)),
    (FLOW_ID, ("live", 4)), (CACHED_FLOW_ID, ("live", 4)),
    (FLOW_ID, ("canary", 2, 50, True)), (CACHED_FLOW_ID, ("canary", 1, 30, False)),
    (FLOW_ID, ("off",)), (CACHED_FLOW_ID, ("off",)),
    (FLOW_ID, ("rollback",)), (CACHED_FLOW_ID, ("rollback",)),
    (FLOW_ID, ("publish", 4)), (CACHED_FLOW_ID, ("publish", 1)),
    (FLOW_ID, ("rollback",)), (CACHED_FLOW_ID, ("publish", 4)),
]
ACTIONS = {"publish": "publish", "canary": "routing", "live": "routing", "off": "routing",
           "rollback": "rollback"}


def change(engine_url: str, flow_id: str, what: tuple) -> tuple[int, dict]:
    base = f"{engine_url}/api/v1/flows/{flow_id}"
    kind = what[0]
    if kind == "publish":
        resp = admin("POST", base + "/publish", {"version": what[1], "message": "drill"})
    elif kind == "rollback":
        resp = admin("POST", base + "/rollback", {"message": "drill"})
    elif kind == "canary":
        body = {"canary": {"version": what[1], "percent": what[2]}, "message": "drill"}
        if what[3]:
            body["sticky_key"] = "session_id"
        resp = admin("PUT", base + "/routing", body)
    elif kind == "live":
        resp = admin("PUT", base + "/routing", {"live": what[1], "message": "drill"})
    else:  # off: the canary ends, live stays
        resp = admin("PUT", base + "/routing", {"message": "drill"})
    return resp.status_code, resp.json()


def audit_tail(engine_url: str, since: int) -> list[dict]:
    entries = []
    while True:
        page = admin("GET", f"{engine_url}/api/v1/audit?since={since}&limit=500").json()
        entries += page["entries"]
        if not page["entries"]:
            return entries
        since = page["next_since"]


def test_five_thousand_runs_through_twenty_changes(chaos):
    chaos.sim.configure(reply_tokens=6)
    stack = chaos.stack(engine_env={"FLOW_ENGINE_FLOW_CACHE_TTL_S": str(FLOW_CACHE_TTL_S)})
    for flow_id in (FLOW_ID, CACHED_FLOW_ID):
        for label in ("v2", "v3", "v4"):
            resp = admin("PUT", f"{stack.engine_url}/api/v1/flows/{flow_id}", flow(flow_id, label))
            assert resp.status_code == 201, resp.text
    before = audit_tail(stack.engine_url, 0)
    since = before[-1]["seq"]
    timelines = {FLOW_ID: Timeline(live=1, slack_s=FLOW_CACHE_TTL_S + 0.35),
                 CACHED_FLOW_ID: Timeline(live=1, slack_s=AMBASSADOR_SLACK_S)}
    outcomes = Outcomes()
    with Load(stack, outcomes, threads=10, max_requests=RUNS, rate_per_s=400,
              mix={"run": 0.5, "stream": 0.2, "ws": 0.1, "cached": 0.2}) as load:
        for i, (flow_id, what) in enumerate(PLAN):
            load.wait_done((i + 1) * RUNS // (len(PLAN) + 1), timeout_s=180)
            sent = time.monotonic()
            status, body = change(stack.engine_url, flow_id, what)
            assert status == 200, (flow_id, what, status, body)
            timelines[flow_id].record(sent, time.monotonic(), body)

    everything = outcomes.all()
    failed = [f"{o.kind} {o.tag}: {o.status} {o.code} {o.error}" for o in everything if not o.ok]
    wrong, stale_hits = [], []
    for o in everything:
        flow_id = CACHED_FLOW_ID if o.kind == "cached" else FLOW_ID
        allowed = timelines[flow_id].allowed(o.started, o.ended)
        if o.ok and o.version not in allowed:
            where = stale_hits if o.detail.get("cache") == "HIT" else wrong
            where.append(f"{o.kind} {o.tag}: version {o.version}, routing allowed {sorted(allowed)}")
    entries = audit_tail(stack.engine_url, since)
    v = verdict(everything, None)
    by_kind = {k: sum(1 for o in everything if o.kind == k) for k in ("run", "stream", "ws", "cached")}
    hits = sum(1 for o in everything if o.detail.get("cache") == "HIT")
    problems = chaos.report(v, changes=len(entries), by_kind=by_kind, cache_hits=hits,
                            versions_seen=sorted({o.version for o in everything if o.ok}))

    assert len(everything) >= RUNS
    assert not failed, f"{len(failed)} failed:\n" + "\n".join(failed[:10]) + "\n" + stack.logs(25)
    assert not wrong, "\n".join(wrong[:10])
    assert not stale_hits, "\n".join(stale_hits[:10])
    assert [(e["flow_id"], e["action"], e["actor"]) for e in entries] == [
        (flow_id, ACTIONS[what[0]], "admin") for flow_id, what in PLAN]
    assert hits > 0 and all(by_kind.values()), (hits, by_kind)
    assert not problems, "\n".join(problems)
