"""Drill: 200 slow-loris connections against the ambassador — most trickling their request
headers a byte at a time, some declaring a body larger than ``max_body_bytes`` and some
trickling a small body — while a steady load of runs goes through it and ``/healthz`` is
asked on fresh connections.

The ambassador is one gevent worker: a connection that never finishes its request must cost
it a greenlet, never its attention. ``/healthz`` and ``/run-flow`` keep answering (every
request of the load succeeds, within its deadline), and a request whose declared body is too
large is answered 413 at once, without waiting for a body that will not come. Both are
also asked on new connections, opened after the attack began. And connections whose request
head is still incomplete SLOW_HEADERS_CLOSED_S after they opened are closed by the server."""

from __future__ import annotations

import time

import pytest
import requests
from support.chaos import Load, Outcomes, SlowLoris, new_tag, verdict, wait_for

# bounded inside (loads, waits, budgets); past 120 s a failing drill still reports its numbers
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CONNECTIONS = 200
HEALTH_CHECKS = 40
# each must answer, however slowly a loaded machine lets it: a server whose only worker is
# held by the attack never answers at all (the client gives up after this)
HEALTH_TIMEOUT_S = 15.0
# from the attack's start: heads never finished are dropped by then (the ambassador's header
# timeout is 10 s; without one they stay open for most of an hour of dripping)
SLOW_HEADERS_CLOSED_S = 60.0


def test_two_hundred_slow_loris_connections_while_healthz_and_runs_answer(chaos):
    chaos.sim.configure(ttft_s=0.1, tokens_per_s=50, reply_tokens=8)
    stack = chaos.stack()
    calls = chaos.calls()
    outcomes = Outcomes()
    health: list[tuple[int | str, float]] = []
    with Load(stack, outcomes, rate_per_s=8, max_requests=60) as load:
        load.wait_done(10)
        loris = SlowLoris(stack.ambassador.port, CONNECTIONS).start()
        try:
            for i in range(HEALTH_CHECKS):  # on new connections, made after the attack began
                started = time.monotonic()
                try:
                    if i % 4 == 3:
                        status = stack.run_once(new_tag(70_000 + i), timeout=HEALTH_TIMEOUT_S).status_code
                    else:
                        status = requests.get(stack.url + "/healthz", headers={"Connection": "close"},
                                              timeout=HEALTH_TIMEOUT_S).status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                health.append((status, time.monotonic() - started))
                time.sleep(0.1)
            load.join()
            oversize = wait_for(lambda: (s := loris.status_of("oversize_body")) and "open" not in s and s,
                                30, "every oversize body is answered")
            # a request head still incomplete after this long is an attack: the server drops it
            heads_closed = True
            try:
                wait_for(lambda: "open" not in loris.status_of("slow_headers"),
                         max(5.0, SLOW_HEADERS_CLOSED_S - (time.monotonic() - loris.opened_at)),
                         "the slow-header connections are closed", interval_s=0.5)
            except AssertionError:
                heads_closed = False
        finally:
            still_open = loris.open_count()
            kinds = {k: dict(loris.status_of(k)) for k in ("slow_headers", "slow_body", "oversize_body")}
            loris.stop()
    calls.stop()

    v = verdict(outcomes.all(), calls, recovered_from_seq=0)
    slow_health = [f"{s} in {t:.2f} s" for s, t in health if s != 200]
    problems = chaos.report(v, healthz_max_s=round(max(t for _, t in health), 2),
                            loris_open_at_end=still_open, loris=kinds)
    assert not slow_health, f"/healthz or /run-flow on a new connection failed: {slow_health}"
    assert set(oversize) == {"HTTP/1.1 413 Payload Too Large"}, oversize
    assert heads_closed, (f"{kinds['slow_headers']} of the connections still sending their request "
                          f"head after {SLOW_HEADERS_CLOSED_S:g} s: nothing drops slow-loris clients")
    assert not problems, "\n".join(problems)
