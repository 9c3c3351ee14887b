"""The shared event log through a Redis outage: two engine apps (two processes' worth: own
memory, one SQLite file, one Redis) on a Redis server of the test's own that the test stops,
restarts and hangs (tests/flow_engine/conftest.py ``private_redis``).

- Events written while Redis restarts are retried and reach the other process: a run
  resumed there with ``Last-Event-ID`` sees every event once, in order.
- Events Redis never got are never skipped silently: the watcher's stream ends with an
  ``error`` event ``events_lost`` naming them, not ``run_finished`` after a hole.
- A hung Redis (SIGSTOP) costs a request ``redis_timeout_s``, answers a true 503
  ``event_log_unavailable`` with ``Retry-After``, and failures are logged once per
  interval, not once per write.

Runs are driven through the run service (``prepare`` + ``stream``), so the test reads each
event as it happens and decides exactly when Redis goes away; the LLM is the llm-sim.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sseclient
from flask import Flask
from support.waiting import wait_until

from flow_engine.auth import parse_key, principal_for
from flow_engine.runs.request import RunRequest
from flow_engine.store.base import RunRecord

CALLER = principal_for(parse_key("test-key"), None, None)
WAIT_S = 10.0
Event = tuple[str | None, str, Any]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'engine.db'}"


class Engine:
    """One engine app and what the tests do with it."""

    def __init__(self, app: Flask, auth: dict[str, str]) -> None:
        self.app, self.auth = app, auth
        self.client = app.test_client()
        self.runs = app.extensions["flowgate"].runs
        self.metrics = app.extensions["flowgate"].metrics

    def create(self, definition: dict[str, Any]) -> None:
        resp = self.client.post("/api/v1/flows", json=definition, headers=self.auth)
        assert resp.status_code == 201, resp.get_data(as_text=True)

    def start(self, flow: str, body: dict[str, Any]) -> tuple[str, Iterator[Any]]:
        """A streamed run whose events the caller reads one by one (None: keep-alive)."""
        prepared = self.runs.prepare(flow, RunRequest.from_body(body), caller=CALLER,
                                     idempotency_key=None, trace_id=None)
        return prepared.run_id, self.runs.stream(prepared, 0.2, cancel_on_disconnect=False)

    def events(self, run_id: str, after: int) -> Any:
        return self.client.get(f"/api/v1/runs/{run_id}/events",
                               headers={**self.auth, "Last-Event-ID": str(after)})

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def take(events: Iterator[Any], n: int) -> list[Event]:
    got: list[Event] = []
    while len(got) < n:
        event = next(events)
        if event is not None:
            got.append((str(event.seq), event.type, event.data))
    return got


HUNG_TIMEOUT_S = 0.3  # redis_timeout_s of the tests where Redis hangs


def parse(resp: Any) -> list[Event]:
    return [(e.id, e.event, json.loads(e.data))
            for e in sseclient.SSEClient(resp.iter_encoded()).events()]


@pytest.fixture
def pair(make_app: Callable[..., Flask], private_redis: Any, fresh_llm_sim: Any,
         auth: dict[str, str], defs: Any) -> Callable[..., tuple[Engine, Engine]]:
    """``pair(**config)``: engines A and B on the private Redis, flow ``llm`` created."""

    def make(**config: Any) -> tuple[Engine, Engine]:
        # 2 s: a healthy Redis (fsync on every write) slow for a moment on a loaded machine
        # is no outage; the tests of a hung Redis ask for HUNG_TIMEOUT_S
        config = {"redis_url": private_redis.url, "redis_timeout_s": 2.0,
                  "openai_base_url": fresh_llm_sim.base_url, **config}
        a, b = Engine(make_app(**config), auth), Engine(make_app(**config), auth)
        a.create(defs.openai(id="llm"))
        return a, b

    return make


def test_events_written_while_redis_restarts_reach_the_other_process(pair, private_redis,
                                                                     fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=40, reply_tokens=30)
    a, b = pair(event_write_retry_s=30)
    run_id, events = a.start("llm", {"input_value": "through an outage"})
    before = take(events, 4)  # run_started, in (started, finished), llm started
    assert a.runs.events.shared.flush(WAIT_S)
    failures = a.metric("flowgate_engine_event_log_errors_total", op="append")

    private_redis.stop()
    during = take(events, 3)  # three tokens made while Redis is down
    wait_until(lambda: a.metric("flowgate_engine_event_log_errors_total", op="append")
               > failures, "A's writer to fail")
    private_redis.start()
    after = take(events, 1)
    rest = [(str(e.seq), e.type, e.data) for e in events if e is not None]
    full = before + during + after + rest
    assert a.runs.events.shared.flush(WAIT_S)

    resumed = b.events(run_id, after=4)
    assert resumed.status_code == 200, resumed.get_data(as_text=True)
    assert before + parse(resumed) == full
    assert full[-1][1] == "run_finished"
    assert a.metric("flowgate_engine_event_log_lost_total") == 0


def test_events_redis_never_got_end_the_watch_with_events_lost(pair, private_redis,
                                                               fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=40, reply_tokens=60)
    a, b = pair(event_write_retry_s=0.2)
    run_id, events = a.start("llm", {"input_value": "through a long outage"})
    before = take(events, 4)
    assert a.runs.events.shared.flush(WAIT_S)

    private_redis.stop()
    take(events, 3)
    wait_until(lambda: a.metric("flowgate_engine_event_log_lost_total") > 0,
               "A's writer to give up on a batch")
    private_redis.start()
    rest = [e for e in events if e is not None]
    assert rest[-1].type == "run_finished"
    assert a.runs.events.shared.flush(WAIT_S)

    resumed = b.events(run_id, after=4)
    assert resumed.status_code == 200, resumed.get_data(as_text=True)
    seen = before + parse(resumed)
    *ids, last = [e[0] for e in seen]
    assert ids == [str(i) for i in range(1, len(ids) + 1)], "no hole before the end"
    assert last is None and seen[-1][1] == "error", seen[-3:]
    lost = seen[-1][2]
    assert (lost["code"], lost["run_id"], lost["first_lost"]) == ("events_lost", run_id,
                                                                  len(ids) + 1)
    assert "run_finished" not in [e[1] for e in seen]


def test_watching_with_redis_hung_is_a_quick_true_503(pair, private_redis, fresh_llm_sim):
    fresh_llm_sim.configure(reply_tokens=3)
    a, b = pair(redis_timeout_s=HUNG_TIMEOUT_S)
    run_id, events = a.start("llm", {"input_value": "watch me"})
    assert [e for e in events if e is not None][-1].type == "run_finished"
    assert a.runs.events.shared.flush(WAIT_S)

    private_redis.hang()
    started = time.monotonic()
    resp = b.events(run_id, after=0)
    seconds = time.monotonic() - started

    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert resp.headers["Retry-After"]
    error = resp.get_json()["error"]
    assert error["code"] == "event_log_unavailable"
    assert "REDIS_URL" not in error["message"]
    # generous for a loaded machine; without redis_timeout_s (0.3) it is XREAD's 30 s
    assert seconds < 15, f"a hung Redis held the request {seconds:.1f} s (redis_timeout_s 0.3)"


def test_a_running_run_whose_events_redis_lost_is_a_503_not_set_redis_url(pair, private_redis):
    a, b = pair()
    record = RunRecord(run_id="e1" * 16, flow_id="llm", version=1, status="running",
                       created_at=b.runs._now(), idempotency_key="t:k-1",
                       heartbeat_at=b.runs._now(), tenant=CALLER.tenant)
    a.runs.store.insert_run(record)  # a keyed run of another process, on record
    # ...whose events Redis does not have (lost in an outage, or a Redis restarted empty)

    resp = b.events("e1" * 16, after=0)

    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert resp.headers["Retry-After"]
    error = resp.get_json()["error"]
    assert error["code"] == "event_log_unavailable"
    assert "REDIS_URL" not in error["message"]


@pytest.mark.parametrize(("ended_s_ago", "status"), [
    pytest.param(1, 503, id="ended-moments-ago-its-events-are-still-coming"),
    pytest.param(3600, 200, id="ended-long-ago-the-outcome-is-what-is-left"),
])
def test_a_resume_of_a_run_whose_events_have_not_reached_redis(pair, private_redis, ended_s_ago,
                                                              status):
    """A resumer holding events 1-4 of a run that ended a moment ago in another process,
    whose writer is still catching up after a Redis outage: 'retry shortly' (it then gets
    every event), not the outcome alone (which would skip events 5 and on)."""
    a, b = pair()
    ended = b.runs._now() - timedelta(seconds=ended_s_ago)
    record = RunRecord(run_id="e2" * 16, flow_id="llm", version=1, status="succeeded",
                       created_at=ended, finished_at=ended, tenant=CALLER.tenant,
                       result={"run_id": "e2" * 16, "output": "done"})
    a.runs.store.insert_run(record)

    resp = b.events("e2" * 16, after=4)

    assert resp.status_code == status, resp.get_data(as_text=True)
    if status == 503:
        assert resp.get_json()["error"]["code"] == "event_log_unavailable"
    else:
        assert b"event: run_finished" in resp.get_data()


def test_redis_down_is_logged_once_per_interval_not_once_per_write(pair, private_redis,
                                                                   fresh_llm_sim, caplog):
    fresh_llm_sim.configure(reply_tokens=2)
    a, _b = pair(event_write_retry_s=0.05)
    private_redis.stop()
    caplog.set_level(logging.WARNING, logger="flow_engine")

    for i in range(20):
        _run_id, events = a.start("llm", {"input_value": f"run {i}"})
        assert [e for e in events if e is not None][-1].type == "run_finished"
    wait_until(lambda: a.runs.events.shared.flush(0.1), "A's writer to drop what it has")

    lines = [r for r in caplog.records if r.name == "flow_engine.runs.events"]
    assert a.metric("flowgate_engine_event_log_lost_total") >= 20 * 8  # every event counted
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]


def test_a_watch_whose_redis_hangs_mid_stream_ends_with_an_error_saying_so(pair, private_redis,
                                                                         fresh_llm_sim, auth):
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=10_000)  # runs until cancelled
    a, b = pair(redis_timeout_s=HUNG_TIMEOUT_S)
    run_id, events = a.start("llm", {"input_value": "follow me"})
    try:
        take(events, 5)  # run_started, in (started, finished), llm started, a token
        assert a.runs.events.shared.flush(WAIT_S)
        resp = b.client.get(f"/api/v1/runs/{run_id}/events", buffered=False, headers=auth)
        on_b = iter(sseclient.SSEClient(resp.response).events())
        seen = [next(on_b) for _ in range(5)]  # B follows the run through Redis

        private_redis.hang()
        seen += list(on_b)  # the stream must end, and say why
    finally:
        a.runs.executor.cancel_local(run_id)
        events.close()

    *ids, last = [e.id for e in seen]
    assert ids == [str(i) for i in range(1, len(ids) + 1)]
    assert (last, seen[-1].event) == (None, "error")
    error = json.loads(seen[-1].data)
    assert (error["code"], error["last_event_id"]) == ("event_log_unavailable", len(ids))


def test_a_run_of_another_process_asked_about_with_redis_hung_is_503_not_404(pair,
                                                                            private_redis,
                                                                            fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=10_000)  # runs until cancelled
    a, b = pair(redis_timeout_s=HUNG_TIMEOUT_S)
    run_id, events = a.start("llm", {"input_value": "in progress"})  # on record at its end
    try:
        take(events, 4)
        assert a.runs.events.shared.flush(WAIT_S)
        assert b.client.get(f"/api/v1/runs/{run_id}", headers=b.auth).status_code == 200

        private_redis.hang()
        record = b.client.get(f"/api/v1/runs/{run_id}", headers=b.auth)
        cancel = b.client.post(f"/api/v1/runs/{run_id}/cancel", headers=b.auth)
    finally:
        a.runs.executor.cancel_local(run_id)
        events.close()

    for resp in (record, cancel):
        assert resp.status_code == 503, resp.get_data(as_text=True)
        assert resp.get_json()["error"]["code"] == "event_log_unavailable"
        assert resp.headers["Retry-After"]
