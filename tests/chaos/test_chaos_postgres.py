"""Drill: every PostgreSQL connection of the engine is terminated (``pg_terminate_backend``
on the shared server: what a failover, a restart or an idle-connection reaper does to a
pool), three times, under a steady load.

A request whose query was cut may fail — with the contract's 503 (or 502/504), never a 500 —
but none may go unanswered, run twice or past its deadline, and once the engine has
reconnected (a run goes through again) every request succeeds."""

from __future__ import annotations

import pytest
from support.chaos import Load, Outcomes, verdict, wait_for

# bounded inside (loads, waits, budgets); past 120 s a failing drill still reports its numbers
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROUNDS = 3


def test_postgres_backends_terminated_under_load(chaos):
    chaos.sim.configure(ttft_s=0.1, tokens_per_s=50, reply_tokens=8)
    stack = chaos.stack()
    calls = chaos.calls()
    outcomes = Outcomes()
    terminated, recoveries = [], []
    with Load(stack, outcomes, max_requests=150) as load:
        for round_ in range(ROUNDS):
            load.wait_done(15 + 25 * round_)
            wait_for(stack.pg.backends, 10, "the engine holds PostgreSQL connections")
            terminated.append(stack.pg.terminate_backends())
            load.wait_done(outcomes.done() + 5)
            recoveries.append(stack.wait_recovered())
        healed = load.finish_after(20)
    calls.stop()

    v = verdict(outcomes.all(), calls, recovered_from_seq=healed, recoveries=recoveries)
    problems = chaos.report(v, terminated=terminated)
    assert all(terminated), terminated
    assert v.sent_after_recovery == 20
    assert not problems, "\n".join(problems)
