"""Drill: streams dropped and resumed with ``Last-Event-ID`` 50 times, under a steady load.

Ten streamed runs through the ambassador (``on_disconnect: continue``), each dropped by its
client five times at different points — in the first nodes, among the tokens, near the end —
and resumed each time with ``GET /runs/{id}/events`` and the last id it saw, landing on
either engine worker. Each client must end up with every event of its run exactly once: ids
contiguous from 1 to the ``run_finished``, the tokens adding up to the output."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from support.chaos import Load, Outcomes, dropped_and_resumed, new_tag, verdict

# bounded inside (loads, waits, budgets); past 120 s a failing drill still reports its numbers
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
RUNS, DROPS = 10, 5


def test_fifty_streams_dropped_and_resumed_under_load(chaos):
    # 20 tokens at 30/s: ~0.7 s of tokens, so resumes meet runs still going and runs done
    chaos.sim.configure(ttft_s=0.05, tokens_per_s=30, reply_tokens=20)
    stack = chaos.stack()
    calls = chaos.calls()
    outcomes = Outcomes()
    with Load(stack, outcomes, rate_per_s=6, max_requests=60, mix={"run": 0.7, "stream": 0.3}) as load, \
            ThreadPoolExecutor(3) as pool:
        load.wait_done(5)
        # a run has 30 events: drops among the first nodes, the tokens and the last nodes
        drops = [[1 + i % 3, 6 + i % 4, 12 + i % 5, 19 + i % 5, 26 + i % 3] for i in range(RUNS)]
        streams = list(pool.map(lambda i: dropped_and_resumed(stack.url, new_tag(60_000 + i), drops[i]),
                                range(RUNS)))
        load.finish_after(0)
    calls.stop()

    v = verdict(outcomes.all(), calls, recovered_from_seq=0)
    resumes = sum(s.detail.get("resumes", 0) for s in streams)
    bad = [f"{s.tag} run {s.run_id}: status={s.status} {s.error}; events "
           f"{' '.join(s.detail.get('trace', []))}" for s in streams if not s.ok]
    problems = chaos.report(v, resumes=resumes, streams_ok=sum(s.ok for s in streams))
    assert not bad, "\n".join(bad)
    assert resumes == RUNS * DROPS, [s.detail.get("resumes") for s in streams]
    assert not problems, "\n".join(problems)
