"""``GET /api/v1/runs/{id}/events`` (replay, ``Last-Event-ID`` resume, expired events),
``on_disconnect`` on streamed runs, and what ``REDIS_URL`` shares between engine processes:
events, cancellation and flow-cache invalidation (two apps on one Redis and one SQLite file
stand for two processes).

In-process apps on SQLite, each case without and with Redis (``redis_url``). Redis is the
server at ``FLOWGATE_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); the Redis cases
skip when it is unreachable, except under CI (``CI`` set), where they fail. The keys of
every run a test made are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sseclient
from flask import Flask
from support.waiting import wait_until

from flow_engine.auth import parse_key, principal_for
from flow_engine.errors import FlowgateError
from flow_engine.runs.request import RunRequest

TEST_CALLER = principal_for(parse_key("test-key"), None, None)  # the key of auth headers
REDIS_URL = os.environ.get("FLOWGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WAIT_S = 10.0  # every wait here gives up after this long
BODY = {"input_value": "resume me please", "session_id": "s-1"}
Event = tuple[str | None, str, Any]  # (SSE id, event type, data)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only (overrides the API conftest's sqlite/postgres parametrisation): what is
    under test here is the event log and Redis, not the store."""
    return f"sqlite:///{tmp_path / 'engine.db'}"


@pytest.fixture(params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis")])
def shared(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Extra app config: nothing (in-process event log only) or ``redis_url``."""
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url")}


@pytest.fixture
def make_engine(make_app: Callable[..., Flask]) -> Iterator[Callable[..., Flask]]:
    """Apps as ``make_app`` builds them. With Redis, an app is returned only once its signal
    subscription works (so no test publishes into the void); afterwards its listener is
    stopped and the Redis streams of every run it ran are deleted."""
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = make_app(**config)
        apps.append(app)
        signals = app.extensions["flowgate"].runs.signals
        if signals is not None:
            _wait_subscribed(signals)
        return app

    yield make
    keys: list[str] = []
    for app in apps:
        runs = app.extensions["flowgate"].runs
        if runs.signals is not None:
            runs.signals.stop()
        shared_log = runs.events.shared
        if shared_log is not None:
            shared_log.flush(2.0)
            keys += [shared_log.key(run_id) for run_id in list(runs.events.memory._runs)]
    if keys:
        time.sleep(0.05)  # the last batch in flight (flush does not wait for it)
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(*keys)
        client.close()


def _wait_subscribed(signals: Any) -> None:
    received = threading.Event()
    signals.on("flowgate-test-probe", lambda message: received.set())
    deadline = time.monotonic() + WAIT_S
    while not received.is_set():
        assert time.monotonic() < deadline, "the app never subscribed to the signal channel"
        signals.publish("flowgate-test-probe")
        received.wait(0.05)


@pytest.fixture
def engine_app(make_engine: Callable[..., Flask], shared: dict[str, Any]) -> Flask:
    return make_engine(**shared)


@pytest.fixture
def api(engine_app: Flask, auth: dict[str, str]) -> Api:
    return Api(engine_app, auth)


# -- helpers --------------------------------------------------------------------------------


def parse(chunks: Any) -> list[Event]:
    return [(e.id, e.event, json.loads(e.data)) for e in sseclient.SSEClient(chunks).events()]


class Api:
    """One engine app seen through its HTTP API."""

    def __init__(self, app: Flask, auth: dict[str, str]) -> None:
        self.app, self.auth = app, auth
        self.client = app.test_client()

    @property
    def runs(self) -> Any:
        return self.app.extensions["flowgate"].runs

    def create(self, definition: dict[str, Any]) -> None:
        resp = self.client.post("/api/v1/flows", json=definition, headers=self.auth)
        assert resp.status_code == 201, resp.get_data(as_text=True)

    def stream(self, flow: str, body: Any = BODY, query: str = "?stream=true",
               headers: dict[str, str] | None = None) -> tuple[str, list[Event]]:
        resp = self.client.post(f"/api/v1/run/{flow}{query}", json=body,
                                headers={**self.auth, **(headers or {})})
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return resp.headers["X-Run-ID"], parse(resp.iter_encoded())

    def open_stream(self, flow: str, body: Any = BODY, query: str = "?stream=true",
                    headers: dict[str, str] | None = None) -> Any:
        """A streamed run whose body has not been read yet (the run is under way)."""
        resp = self.client.post(f"/api/v1/run/{flow}{query}", json=body, buffered=False,
                                headers={**self.auth, **(headers or {})})
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return resp

    def run(self, flow: str, body: Any = BODY) -> dict[str, Any]:
        resp = self.client.post(f"/api/v1/run/{flow}", json=body, headers=self.auth)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return resp.get_json()

    def events(self, run_id: str, *, header: Any = None, query: Any = None) -> Any:
        headers = dict(self.auth)
        if header is not None:
            headers["Last-Event-ID"] = str(header)
        suffix = f"?last_event_id={query}" if query is not None else ""
        return self.client.get(f"/api/v1/runs/{run_id}/events{suffix}", headers=headers)

    def watch(self, run_id: str, **kw: Any) -> list[Event]:
        resp = self.events(run_id, **kw)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.mimetype == "text/event-stream"
        return parse(resp.iter_encoded())

    def record(self, run_id: str) -> dict[str, Any]:
        resp = self.client.get(f"/api/v1/runs/{run_id}", headers=self.auth)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return resp.get_json()

    def wait_status(self, run_id: str, wanted: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        record = self.record(run_id)
        while record["status"] != wanted and time.monotonic() < deadline:
            time.sleep(0.02)
            record = self.record(run_id)
        assert record["status"] == wanted, record
        return record


class StreamInThread:
    """A streamed run requested and read in a thread of its own (a streamed test-client
    response must be read in the thread that made the request: Flask's contexts are per
    thread). ``run_id`` is there once the response has started; ``events`` at the end."""

    def __init__(self, api: Api, flow: str, body: Any = BODY, query: str = "?stream=true",
                 headers: dict[str, str] | None = None) -> None:
        self.run_id: str | None = None
        self.events: list[Event] | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(api, flow, body, query, headers),
                                        daemon=True)
        self._thread.start()
        assert self._started.wait(WAIT_S), "the streamed run never started"
        assert self.run_id is not None, self.error

    def _read(self, api: Api, flow: str, body: Any, query: str, headers: Any) -> None:
        try:
            resp = api.app.test_client().post(
                f"/api/v1/run/{flow}{query}", json=body, buffered=False,
                headers={**api.auth, **(headers or {})})
            self.run_id = resp.headers.get("X-Run-ID")
            self._started.set()
            self.events = parse(resp.response)
            resp.close()
        except BaseException as exc:
            self.error = exc
        finally:
            self._started.set()

    def join(self, timeout_s: float = WAIT_S) -> list[Event]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the stream did not end"
        assert self.error is None, self.error
        assert self.events is not None
        return self.events


def assert_well_formed(events: list[Event]) -> None:
    """Ids 1..n, run_started first, exactly one terminal event, last."""
    assert [e[0] for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert events[0][1] == "run_started"
    assert events[-1][1] in ("run_finished", "error")
    assert [e[1] for e in events].count(events[-1][1]) == 1


def read_at_most(resp: Any, max_chunks: int, seconds: float) -> tuple[list[bytes], bool]:
    """Read a streamed test-client response until it ends or ``max_chunks`` / ``seconds``
    are used up; returns the chunks and whether the stream ended by itself."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + seconds
    ended = True
    for chunk in resp.response:
        chunks.append(chunk)
        if len(chunks) >= max_chunks or time.monotonic() > deadline:
            ended = False
            break
    resp.close()
    return chunks, ended


def _json_if_ok(resp: Any) -> Any:
    return resp.get_json() if resp.status_code == 200 else None


# -- replay and resume ----------------------------------------------------------------------


def test_replay_of_a_finished_streamed_run_sends_every_event_again(api, defs):
    api.create(defs.echo("Q: {question}", id="f"))
    run_id, live = api.stream("f")

    replay = api.watch(run_id)

    assert_well_formed(live)
    assert replay == live
    assert sum(1 for e in live if e[1] == "token") >= 3


def test_replay_of_a_plain_run_ends_with_its_result(api, defs):
    api.create(defs.echo("Q: {question}", id="f"))
    result = api.run("f")

    replay = api.watch(result["run_id"])

    assert_well_formed(replay)
    assert replay[0][2] == {"run_id": result["run_id"], "flow_id": "f", "version": 1,
                            "session_id": "s-1"}
    assert replay[-1][1:] == ("run_finished", result)
    assert [e[2]["node"] for e in replay if e[1] == "node_started"] == ["in", "p", "llm", "out"]


@pytest.mark.parametrize("how", ["header", "query"])
def test_last_event_id_resumes_exactly(api, defs, how):
    api.create(defs.echo("Q: {question}", id="f"))
    run_id, full = api.stream("f")
    assert_well_formed(full)

    for k in range(len(full)):  # every point a connection could have dropped at
        resumed = api.watch(run_id, **{how: k})
        assert full[:k] + resumed == full, f"resuming after {k}"


def test_the_header_wins_over_the_query_parameter(api, defs):
    api.create(defs.echo(id="f"))
    run_id, full = api.stream("f")

    assert api.watch(run_id, header=2, query=5) == full[2:]


@pytest.mark.parametrize("past_end", [0, 5])
def test_resuming_after_the_last_event_ends_the_stream(make_engine, shared, auth, defs, past_end):
    api = Api(make_engine(sse_keepalive_s=0.05, **shared), auth)
    api.create(defs.echo(id="f"))
    run_id, full = api.stream("f")

    resp = api.client.get(f"/api/v1/runs/{run_id}/events", buffered=False,
                          headers={**auth, "Last-Event-ID": str(len(full) + past_end)})
    chunks, ended = read_at_most(resp, max_chunks=100, seconds=2)

    assert resp.status_code == 200
    assert not parse(chunks), "no event after the last one"
    assert ended, f"the stream went on: {len(chunks)} chunks, e.g. {chunks[-1]!r}"


def test_events_of_an_unknown_run_are_404_json(api):
    resp = api.events("no-such-run")

    assert resp.status_code == 404
    assert resp.mimetype == "application/json"
    assert resp.get_json()["error"]["code"] == "run_not_found"


@pytest.mark.parametrize(("where", "value"), [
    pytest.param("header", "abc", id="header-word"),
    pytest.param("header", "-1", id="header-negative"),
    pytest.param("header", "2.5", id="header-fraction"),
    pytest.param("query", "x1", id="query-word"),
    pytest.param("query", "-3", id="query-negative"),
])
def test_an_invalid_last_event_id_is_400(api, defs, where, value):
    api.create(defs.echo(id="f"))
    run_id, _ = api.stream("f")

    resp = api.events(run_id, **{where: value})

    assert resp.status_code == 400
    assert resp.mimetype == "application/json"
    body = resp.get_json()["error"]
    assert body["code"] == "bad_request"
    assert "Last-Event-ID" in body["message"]


def test_expired_events_of_a_recorded_run_give_its_final_event_without_an_id(
        make_engine, shared, auth, defs):
    api = Api(make_engine(event_ttl_s=1, **shared), auth)  # Redis takes whole seconds
    api.create(defs.echo(id="f"))
    api.create(defs.json_parser(id="j"))
    succeeded = api.run("f")
    failed = api.client.post("/api/v1/run/j", json={"input_value": "not json"}, headers=auth)
    assert failed.status_code == 502
    failed_id = failed.headers["X-Run-ID"]
    for run_id in (succeeded["run_id"], failed_id):  # gone from memory (and Redis) after 1 s
        wait_until(lambda run_id=run_id: api.runs.events.read(run_id, 0, 0) is None,
                   "the events to expire")

    assert api.watch(succeeded["run_id"]) == [(None, "run_finished", succeeded)]
    replay = api.watch(failed_id)
    assert [(e[0], e[1]) for e in replay] == [(None, "error")]
    assert replay[0][2]["code"] == "run_failed"
    assert replay[0][2]["message"] == failed.get_json()["error"]["message"]
    assert api.record(failed_id)["status"] == "failed"


def test_the_final_event_of_an_expired_failed_run_is_the_error_it_sent(make_engine, auth, defs):
    api = Api(make_engine(event_ttl_s=0.05), auth)
    api.create(defs.json_parser(id="j"))
    run_id, live = api.stream("j", {"input_value": "not json"})
    wait_until(lambda: api.runs.events.read(run_id, 0, 0) is None, "the events to expire")

    replay = api.watch(run_id)

    assert replay == [(None, "error", live[-1][2])]


# -- on_disconnect ----------------------------------------------------------------------------


@pytest.fixture
def slow_llm(fresh_llm_sim: Any) -> Any:
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=40)  # ~0.8 s of tokens
    return fresh_llm_sim


def _drop_after(resp: Any, k: int) -> list[Event]:
    """Read ``k`` events of an open stream, then go away (close the response)."""
    got: list[Event] = []
    for event in sseclient.SSEClient(resp.response).events():
        got.append((event.id, event.event, json.loads(event.data)))
        if len(got) >= k:
            break
    resp.close()
    return got


@pytest.mark.parametrize(("query", "body"), [
    pytest.param("?stream=true&on_disconnect=continue", BODY, id="query"),
    pytest.param("?stream=true", {**BODY, "on_disconnect": "continue"}, id="body"),
])
def test_on_disconnect_continue_lets_the_run_finish_and_replay(make_engine, shared, slow_llm,
                                                               auth, defs, query, body):
    api = Api(make_engine(openai_base_url=slow_llm.base_url, **shared), auth)
    api.create(defs.openai(id="llm"))
    resp = api.open_stream("llm", body, query=query)
    run_id = resp.headers["X-Run-ID"]

    first = _drop_after(resp, 4)  # run_started, in, in, llm started

    record = api.wait_status(run_id, "succeeded")
    full = api.watch(run_id)
    assert_well_formed(full)
    assert full[:4] == first
    tokens = [e[2]["text"] for e in full if e[1] == "token"]
    assert len(tokens) == 40
    assert "".join(tokens) == record["output"] == full[-1][2]["output"]
    assert slow_llm.stats()["streams_closed_early"] == 0


@pytest.mark.parametrize("query", ["?stream=true", "?stream=true&on_disconnect=cancel"])
def test_a_client_going_away_cancels_the_run_by_default(make_engine, slow_llm, auth, defs, query):
    slow_llm.configure(tokens_per_s=50, reply_tokens=500)  # ~10 s: the cancel comes first
    api = Api(make_engine(openai_base_url=slow_llm.base_url), auth)
    api.create(defs.openai(id="llm"))
    resp = api.open_stream("llm", query=query)
    run_id = resp.headers["X-Run-ID"]

    _drop_after(resp, 6)  # two tokens in

    record = api.wait_status(run_id, "cancelled")
    assert record["error"]["code"] == "run_cancelled"
    wait_until(lambda: slow_llm.stats()["streams_closed_early"] >= 1, "the LLM stream to close")
    events = api.watch(run_id)
    assert_well_formed(events)
    assert events[-1][1] == "error" and events[-1][2]["code"] == "run_cancelled"
    assert sum(1 for e in events if e[1] == "token") < 500


@pytest.mark.parametrize(("query", "body"), [
    pytest.param("?stream=true&on_disconnect=later", BODY, id="stream-query"),
    pytest.param("?stream=true", {**BODY, "on_disconnect": "never"}, id="stream-body"),
    pytest.param("?stream=true", {**BODY, "on_disconnect": 1}, id="stream-body-number"),
    pytest.param("?on_disconnect=CONTINUE", BODY, id="plain-run-upper-case"),
])
def test_a_bad_on_disconnect_is_400(api, defs, query, body):
    api.create(defs.echo(id="f"))

    resp = api.client.post(f"/api/v1/run/f{query}", json=body, headers=api.auth)

    assert resp.status_code == 400
    assert resp.mimetype == "application/json"
    assert "on_disconnect" in resp.get_json()["error"]["message"]
    assert api.runs.executor._active == {}


# -- two processes sharing Redis (and one SQLite file) ----------------------------------------


@pytest.fixture
def pair(make_engine: Callable[..., Flask], redis_url: str, auth: dict[str, str]
         ) -> Callable[..., tuple[Api, Api]]:
    """``pair(**config)``: apps A and B on one database and one Redis, like two engine
    processes; the same config for both."""

    def make(**config: Any) -> tuple[Api, Api]:
        return (Api(make_engine(redis_url=redis_url, **config), auth),
                Api(make_engine(redis_url=redis_url, **config), auth))

    return make


def test_a_run_on_a_is_replayed_and_resumed_on_b(pair, defs):
    a, b = pair()
    a.create(defs.echo("Q: {question}", id="f"))
    run_id, full = a.stream("f")
    assert_well_formed(full)
    a.runs.events.shared.flush()
    wait_until(lambda: b.watch(run_id) == full, "A's events to reach Redis")

    assert not b.runs.events.memory.knows(run_id), "B serves it from Redis"
    for k in (1, 3, len(full) // 2, len(full) - 1):
        assert full[:k] + b.watch(run_id, header=k) == full, f"resuming after {k}"
        assert full[:k] + b.watch(run_id, query=k) == full, f"resuming after {k} (query)"


def test_resuming_on_b_after_the_last_event_ends_the_stream(pair, auth, defs):
    a, b = pair(sse_keepalive_s=0.05)
    a.create(defs.echo(id="f"))
    run_id, full = a.stream("f")
    a.runs.events.shared.flush()
    wait_until(lambda: b.watch(run_id) == full, "A's events to reach Redis")

    resp = b.client.get(f"/api/v1/runs/{run_id}/events", buffered=False,
                        headers={**auth, "Last-Event-ID": str(len(full))})
    chunks, ended = read_at_most(resp, max_chunks=100, seconds=1.5)

    assert not parse(chunks)
    assert ended, f"the stream went on: {len(chunks)} chunks, e.g. {chunks[-1]!r}"


class SlowPipelineClient:
    """Wraps a Redis client so that its pipelines (the event mirror's writes) take
    ``delay_s`` longer: a slow network, or a worker busy with other work for a moment."""

    def __init__(self, client: Any, delay_s: float) -> None:
        self.client, self.delay_s = client, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def pipeline(self, **kw: Any) -> Any:
        pipe = self.client.pipeline(**kw)
        execute, delay = pipe.execute, self.delay_s

        def slow_execute(*args: Any, **kwargs: Any) -> Any:
            time.sleep(delay)
            return execute(*args, **kwargs)

        pipe.execute = slow_execute
        return pipe


def test_resuming_on_b_before_a_has_mirrored_the_run_follows_it_instead_of_404(pair, slow_llm,
                                                                             defs):
    # B waits up to the grace for the run to show up: far more than the 0.4 s the mirror
    # is late by, so a busy machine's scheduling does not decide the test
    a, b = pair(openai_base_url=slow_llm.base_url, shared_events_grace_s=15)
    a.create(defs.openai(id="llm"))
    mirror = a.runs.events.shared
    mirror.client = SlowPipelineClient(mirror.client, delay_s=0.4)
    on_a = StreamInThread(a, "llm")
    try:
        resp = b.events(on_a.run_id, header=1)  # the client has seen run_started
        status = resp.status_code
        resumed = parse(resp.iter_encoded()) if status == 200 else []
    finally:
        full = on_a.join()
        # let the slow writes land before the fixture deletes this run's stream
        wait_until(lambda: mirror.client.xlen(mirror.key(on_a.run_id)) == len(full),
                   "the mirror to catch up")

    assert status == 200, resp.get_data(as_text=True)
    assert full[:1] + resumed == full


def test_the_grace_ends_with_one_more_look_not_a_404(pair, slow_llm, defs, monkeypatch):
    """B's first read misses a run of A that is not on record yet (a plain run is recorded
    at its end), and the events reach Redis right after it: B looks once more at the end of
    the grace, here 0 s, so a late wake-up does not make a run in progress a 404."""
    slow_llm.configure(hold=True)  # in progress (not on record) until B has looked
    a, b = pair(openai_base_url=slow_llm.base_url, shared_events_grace_s=0)
    a.create(defs.openai(id="llm"))
    on_a = StreamInThread(a, "llm")
    mirror = a.runs.events.shared
    wait_until(lambda: mirror.client.xlen(mirror.key(on_a.run_id)) >= 2, "A's first events in Redis")
    log, reads = b.runs.watcher.events, []

    def first_read_misses(*args: Any, **kwargs: Any) -> Any:
        reads.append(args)
        if len(reads) == 1:
            return None
        if len(reads) == 2:  # B has looked again: the run may go on
            slow_llm.configure(hold=False)
        return read(*args, **kwargs)

    read = log.read
    monkeypatch.setattr(log, "read", first_read_misses)
    try:
        resp = b.events(on_a.run_id, header=1)  # read to its end by the test client
    finally:
        slow_llm.configure(hold=False)
    status = resp.status_code
    resumed = parse(resp.iter_encoded()) if status == 200 else []
    full = on_a.join()

    assert status == 200, resp.get_data(as_text=True)
    assert len(reads) >= 2
    assert full[:1] + resumed == full


def test_b_follows_a_run_in_progress_on_a_live(pair, slow_llm, defs, auth):
    slow_llm.configure(tokens_per_s=50, reply_tokens=10_000)  # goes on until cancelled
    a, b = pair(openai_base_url=slow_llm.base_url)
    a.create(defs.openai(id="llm"))
    on_a = StreamInThread(a, "llm")
    run_id = on_a.run_id
    wait_until(lambda: b.client.get(f"/api/v1/runs/{run_id}", headers=b.auth).status_code
               == 200, "B to know the run")
    resp = b.client.get(f"/api/v1/runs/{run_id}/events", buffered=False,
                        headers={**auth, "Last-Event-ID": "2"})
    events = iter(sseclient.SSEClient(resp.response).events())
    seen_on_b: list[Event] = []
    try:
        while sum(e[1] == "token" for e in seen_on_b) < 3:
            e = next(events)
            seen_on_b.append((e.id, e.event, json.loads(e.data)))
        running_then = a.runs.executor.active(run_id) is not None
    finally:
        a.runs.executor.cancel_local(run_id)
    seen_on_b += [(e.id, e.event, json.loads(e.data)) for e in events]
    full = on_a.join()

    assert running_then, "B had tokens while the run was still going on A"
    assert_well_formed(full)
    assert full[:2] + seen_on_b == full
    assert (full[-1][1], full[-1][2]["code"]) == ("error", "run_cancelled")


def test_get_run_on_b_says_running_for_a_plain_run_in_progress_on_a(pair, slow_llm, defs):
    a, b = pair(openai_base_url=slow_llm.base_url)
    a.create(defs.openai(id="llm"))
    prepared = a.runs.prepare("llm", RunRequest.from_body(BODY), caller=TEST_CALLER,
                              idempotency_key=None, trace_id=None)
    done: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: done.setdefault("result", a.runs.run(prepared)))
    worker.start()
    try:
        wait_until(lambda: slow_llm.stats()["tokens_sent"] >= 2, "the LLM to stream")
        on_b = wait_until(lambda: _json_if_ok(b.client.get(f"/api/v1/runs/{prepared.run_id}",
                                                           headers=b.auth)), "B's answer")
    finally:
        worker.join(WAIT_S)

    assert on_b["run_id"] == prepared.run_id
    assert (on_b["status"], on_b["flow_id"], on_b["version"], on_b["session_id"]) == (
        "running", "llm", 1, "s-1")
    assert b.wait_status(prepared.run_id, "succeeded")  # recorded at the end


def test_cancel_on_b_stops_a_keyed_run_in_progress_on_a(pair, slow_llm, defs):
    slow_llm.configure(tokens_per_s=50, reply_tokens=500)  # ~10 s if never cancelled
    a, b = pair(openai_base_url=slow_llm.base_url)
    a.create(defs.openai(id="llm"))
    on_a = StreamInThread(a, "llm", headers={"Idempotency-Key": "cancel-me-1"})
    run_id = on_a.run_id
    wait_until(lambda: slow_llm.stats()["tokens_sent"] >= 3, "the LLM to stream")

    cancelled = b.client.post(f"/api/v1/runs/{run_id}/cancel", headers=b.auth)

    assert cancelled.status_code == 202, cancelled.get_data(as_text=True)
    assert cancelled.get_json() == {"run_id": run_id, "status": "cancelling"}
    events = on_a.join()
    assert_well_formed(events)
    assert (events[-1][1], events[-1][2]["code"]) == ("error", "run_cancelled")
    assert sum(1 for e in events if e[1] == "token") < 500
    assert b.wait_status(run_id, "cancelled")["error"]["code"] == "run_cancelled"
    wait_until(lambda: slow_llm.stats()["streams_closed_early"] >= 1, "the LLM stream to close")


@pytest.mark.parametrize("kind", ["plain", "streamed-continue"])
def test_cancel_on_b_stops_an_unkeyed_run_in_progress_on_a(pair, slow_llm, defs, kind):
    slow_llm.configure(tokens_per_s=50, reply_tokens=500)
    a, b = pair(openai_base_url=slow_llm.base_url)
    a.create(defs.openai(id="llm"))
    if kind == "plain":
        prepared = a.runs.prepare("llm", RunRequest.from_body(BODY), caller=TEST_CALLER,
                                  idempotency_key=None, trace_id=None)
        run_id = prepared.run_id
        worker = threading.Thread(target=_run_expecting_an_error, args=(a, prepared))
        worker.start()
    else:
        worker = StreamInThread(a, "llm", query="?stream=true&on_disconnect=continue")
        run_id = worker.run_id
    try:
        wait_until(lambda: slow_llm.stats()["tokens_sent"] >= 3, "the LLM to stream")
        cancelled = b.client.post(f"/api/v1/runs/{run_id}/cancel", headers=b.auth)
    finally:
        a.runs.executor.cancel_local(run_id)  # whatever B managed: no run outlives the test
        worker.join(WAIT_S)

    assert cancelled.status_code == 202, cancelled.get_data(as_text=True)
    assert b.wait_status(run_id, "cancelled")["error"]["code"] == "run_cancelled"


def _run_expecting_an_error(api: Api, prepared: Any) -> None:
    with contextlib.suppress(FlowgateError):
        api.runs.run(prepared)


def test_cancel_on_b_of_a_finished_run_is_409(pair, defs):
    a, b = pair()
    a.create(defs.echo(id="f"))
    result = a.run("f")
    a.runs.executor.flush()  # its end is in the store (written a few ms after the answer)

    resp = b.client.post(f"/api/v1/runs/{result['run_id']}/cancel", headers=b.auth)

    assert resp.status_code == 409
    assert resp.get_json()["error"]["code"] == "conflict"


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "memory"])
def test_a_publish_on_a_is_seen_on_b_at_once_with_redis(request, make_engine, auth, defs,
                                                        with_redis):
    config: dict[str, Any] = {"flow_cache_ttl_s": 3600.0}
    if with_redis:
        config["redis_url"] = request.getfixturevalue("redis_url")
    a, b = Api(make_engine(**config), auth), Api(make_engine(**config), auth)
    a.create(defs.echo("V1 {question}", id="f"))
    assert b.run("f")["version"] == 1  # B caches the flow row (live version 1) for an hour
    put = a.client.put("/api/v1/flows/f", json=defs.echo("V2 {question}"), headers=a.auth)
    assert put.status_code == 201

    published = a.client.post("/api/v1/flows/f/publish", json={"version": 2}, headers=a.auth)
    assert published.status_code == 200

    if with_redis:  # at once: well within WAIT_S, where the cache TTL is an hour
        result = wait_until(lambda: (r := b.run("f"))["version"] == 2 and r, "B to see v2")
        assert result["output"] == "[echo: not an LLM] V2 resume me please"
    else:  # the control: without the signal B keeps its cached copy until the TTL
        assert b.run("f")["version"] == 1
    assert a.run("f")["version"] == 2
