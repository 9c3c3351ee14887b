"""Drill: the Redis both services use is killed (SIGKILL) under a steady load, and restarted
on the same port a while later (append-only, so it comes back with what it acknowledged).

Both services must keep serving with their local fallbacks (docs/design.md "Behaviour users
rely on"): every run, stream and cache hit of the load succeeds, before, during and after
the outage. Streams started and dropped while Redis is down are resumed with
``Last-Event-ID`` once it is back, through either engine worker: the events the owner
produced during the outage must all be there, ids contiguous from 1, none repeated."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.chaos import Load, Outcomes, dropped_and_resumed, new_tag, verdict, wait_for

# bounded inside (loads, waits, budgets); past 120 s a failing drill still reports its numbers
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
DROPPED_STREAMS = 6


def test_redis_killed_and_restarted_under_load(chaos):
    chaos.sim.configure(ttft_s=0.1, tokens_per_s=40, reply_tokens=12)
    stack = chaos.stack()
    calls = chaos.calls()
    outcomes = Outcomes()
    back = threading.Event()
    dropped = threading.Semaphore(0)
    with Load(stack, outcomes, mix={"run": 0.6, "stream": 0.2, "cached": 0.2}) as load, \
            ThreadPoolExecutor(DROPPED_STREAMS) as pool:
        load.wait_done(20)
        stack.redis.kill()
        down_from = load.issued()
        # runs that stream while Redis is down, dropped there and resumed once it is back
        resumed = [pool.submit(dropped_and_resumed, stack.url, new_tag(50_000 + i), [3 + i, 12],
                               gate=back, dropped=dropped.release)
                   for i in range(DROPPED_STREAMS)]
        for _ in range(DROPPED_STREAMS):
            assert dropped.acquire(timeout=60), "a stream was never dropped"
        load.wait_done(down_from + 25)  # the load goes on without Redis
        down_until = load.issued()
        stack.redis.start()
        recovery_s = stack.wait_recovered()
        back.set()
        healed = load.finish_after(20)
        streams = [f.result(timeout=120) for f in resumed]
    calls.stop()
    wait_for(stack.redis.ping, 10, "Redis answers")

    v = verdict(outcomes.all(), calls, recovered_from_seq=0, recoveries=[recovery_s])
    bad_streams = [f"{s.tag} run {s.run_id}: status={s.status} {s.error}; "
                   f"events {' '.join(s.detail.get('trace', []))}" for s in streams if not s.ok]
    during = [o for o in outcomes.all() if down_from <= o.detail.get("seq", -1) < down_until]
    problems = chaos.report(v, during_outage=len(during),
                            during_outage_ok=sum(o.ok for o in during),
                            resumed_ok=sum(s.ok for s in streams))
    assert healed > 0 and during
    assert not bad_streams, "\n".join(bad_streams)
    assert not problems, "\n".join(problems)
