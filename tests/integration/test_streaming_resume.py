"""Streaming as clients see it, through real processes: ``flowgate engine`` (gunicorn, gevent
workers) in front of the real llm-sim, SSE parsed with sseclient-py.

Three deployments, each started once for this module:

- ``local``: one engine process, no Redis (the embedded default: one worker), keep-alives
  every 0.3 s;
- ``pair``: two engine processes on different ports sharing one SQLite file and Redis (each
  with the Redis default of two workers) — a run started on one is watched, resumed and
  cancelled from the other.

The Redis cases skip when Redis (``FLOWGATE_TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/0``) is unreachable, except under CI, where they fail (tests/support/needs.py).
The Redis streams of every run made on the pair are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import requests
import sseclient
from support.procs import ServerProcess, free_port
from support.prom import metric_value
from support.waiting import wait_until

from flowgate.llm_sim import reply_tokens

pytestmark = pytest.mark.integration
KEY = "streaming-key"
# Connection: close: no idle keep-alive connection holds up the engines' graceful stop
AUTH = {"Authorization": f"Bearer {KEY}", "Connection": "close"}
TIMEOUT = (5, 30)  # connect, read: no request here hangs
WAIT_S = 10.0
FLOW = {
    "id": "qa",
    "name": "Question through llm-sim",
    "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "p", "type": "PromptTemplate", "params": {"template": "Question: {question}"}},
        {"id": "llm", "type": "ChatModel",
         "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
        {"id": "out", "type": "ChatOutput"},
    ],
    "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
              {"source": "llm", "target": "out"}],
}
NODES = [("in", "ChatInput"), ("p", "PromptTemplate"), ("llm", "ChatModel"), ("out", "ChatOutput")]
Event = tuple[str | None, str, Any]  # (SSE id, event type, data)


# -- processes --------------------------------------------------------------------------------


def start_engine(workdir: Any, sim: Any, name: str, *, db: str, **env: str) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)]
    return ServerProcess(cmd, port=port, ready_path="/readyz", name=name, ready_timeout=30,
                         cwd=workdir, env={
                             "FLOW_ENGINE_API_KEYS": KEY,
                             "DATABASE_URL": f"sqlite:///{db}",
                             "OPENAI_BASE_URL": sim.base_url,
                             "FLOW_ENGINE_WORKERS": "",  # the default for the deployment
                             "FLOW_ENGINE_GRACEFUL_TIMEOUT": "1",  # no test here drains a stop
                             "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"metrics-{name}"),
                             "REDIS_URL": "",
                             **env}).start()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, llm_sim: Any) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("local")
    proc = start_engine(workdir, llm_sim, "engine-local", db=str(workdir / "engine.db"),
                        FLOW_ENGINE_SSE_KEEPALIVE_S="0.3")
    try:
        create_flow(proc.url)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def pair_run_ids(redis_url: str) -> Iterator[list[str]]:
    """Ids of the runs made on the pair; their Redis streams are deleted at the end."""
    ids: list[str] = []
    yield ids
    if ids:
        client = redis.Redis.from_url(redis_url)
        client.delete(*(f"flowgate:run:{run_id}" for run_id in ids))
        client.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, llm_sim: Any, redis_url: str,
         pair_run_ids: list[str]) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    workdir = tmp_path_factory.mktemp("pair")
    db = str(workdir / "engine.db")
    with ThreadPoolExecutor(2) as pool:  # both at once: each start and stop takes seconds
        starting = [pool.submit(start_engine, workdir, llm_sim, name, db=db, REDIS_URL=redis_url,
                                FLOW_ENGINE_SSE_KEEPALIVE_S="1") for name in ("engine-a", "engine-b")]
        procs = [f.result() for f in starting if f.exception() is None]
        try:
            assert len(procs) == 2, [f.exception() for f in starting]
            create_flow(procs[0].url)
            yield procs[0], procs[1]
        finally:
            list(pool.map(ServerProcess.stop, procs))


def create_flow(url: str) -> None:
    resp = requests.post(url + "/api/v1/flows", json=FLOW, headers=AUTH, timeout=TIMEOUT)
    assert resp.status_code == 201, resp.text


# -- client helpers ---------------------------------------------------------------------------


def events_of(resp: requests.Response) -> Iterator[Event]:
    """Parse an SSE response as its bytes arrive (no 128-byte read-ahead)."""
    for e in sseclient.SSEClient(resp.iter_content(chunk_size=None)).events():
        yield e.id, e.event, json.loads(e.data)


def open_run(url: str, body: dict[str, Any], query: str = "", **headers: str) -> requests.Response:
    resp = requests.post(f"{url}/api/v1/run/qa?stream=true{query}", json=body, stream=True,
                         headers={**AUTH, **headers}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return resp


def watch(url: str, run_id: str, last_event_id: int | None = None) -> list[Event]:
    headers = dict(AUTH)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    with requests.get(f"{url}/api/v1/runs/{run_id}/events", headers=headers, stream=True,
                      timeout=TIMEOUT) as resp:
        assert resp.status_code == 200, resp.text
        return list(events_of(resp))


def read_then_drop(resp: requests.Response, k: int) -> list[Event]:
    """Read ``k`` events, then close the connection (the client goes away)."""
    got: list[Event] = []
    for event in events_of(resp):
        got.append(event)
        if len(got) == k:
            break
    resp.close()
    return got


def record(url: str, run_id: str) -> dict[str, Any]:
    resp = requests.get(f"{url}/api/v1/runs/{run_id}", headers=AUTH, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_status(url: str, run_id: str, status: str) -> dict[str, Any]:
    return wait_until(lambda: (r := record(url, run_id))["status"] == status and r,
                      f"run {run_id} to be {status}")


def wait_mirrored(redis_url: str, run_id: str, n: int) -> None:
    """Wait until Redis holds the run's first ``n`` events. Each process mirrors its events
    to Redis in the background, so for a moment a client can hold events that other
    processes cannot see yet (test_events_api.py::test_resuming_on_b_before_a_has_mirrored_
    the_run_follows_it_instead_of_404 shows what that costs); this module tests resuming,
    not that race."""
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: client.xlen(f"flowgate:run:{run_id}") >= n, "the Redis mirror")
    finally:
        client.close()


def metric(url: str, name: str, **labels: str) -> float:
    return metric_value(requests.get(url + "/metrics", timeout=TIMEOUT).text, name, **labels)


def question(tag: str) -> dict[str, Any]:
    """A run body with its own text (so each run's simulated reply differs)."""
    return {"input_value": f"what about {tag} {uuid.uuid4().hex[:6]}", "session_id": f"s-{tag}"}


def expected_reply(body: dict[str, Any], n: int) -> str:
    return "".join(reply_tokens([("user", f"Question: {body['input_value']}")], n))


def assert_full_run(events: list[Event], body: dict[str, Any], n_tokens: int) -> None:
    """The whole event sequence of a successful run of FLOW, in order, ids 1..n."""
    assert [e[0] for e in events] == [str(i) for i in range(1, len(events) + 1)]
    expected = ["run_started"]
    for node, _ in NODES:
        expected += ["node_started"] + ["token"] * (n_tokens if node == "llm" else 0)
        expected += ["node_finished"]
    assert [e[1] for e in events] == [*expected, "run_finished"]
    started, finished = events[0][2], events[-1][2]
    assert (started["flow_id"], started["version"], started["session_id"]) == (
        "qa", 1, body["session_id"])
    node_events = [e[2] for e in events if e[1].startswith("node_")]
    assert [(d["node"], d["node_type"]) for d in node_events[::2]] == NODES
    assert [(d["node"], d["node_type"]) for d in node_events[1::2]] == NODES
    tokens = [e[2] for e in events if e[1] == "token"]
    assert [t["index"] for t in tokens] == list(range(n_tokens))
    assert {t["node"] for t in tokens} == {"llm"}
    text = expected_reply(body, n_tokens)
    assert "".join(t["text"] for t in tokens) == text
    assert (finished["run_id"], finished["output"]) == (started["run_id"], text)
    assert finished["usage"]["output_tokens"] == n_tokens


@dataclass
class Deployment:
    """Where a run is started and where it is watched or resumed."""

    start_url: str
    watch_url: str
    run_ids: list[str] | None  # Redis streams to delete later, when Redis is in play
    redis_url: str | None = None


@pytest.fixture(params=[
    pytest.param("local", id="one-process-no-redis"),
    pytest.param("redis-2-workers", id="redis-2-workers"),
    pytest.param("redis-2-processes", id="redis-across-processes"),
])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    if request.param == "local":
        url = request.getfixturevalue("local").url
        return Deployment(url, url, None)
    a, b = request.getfixturevalue("pair")
    ids = request.getfixturevalue("pair_run_ids")
    return Deployment(a.url, a.url if request.param == "redis-2-workers" else b.url, ids,
                      request.getfixturevalue("redis_url"))


# -- tests ------------------------------------------------------------------------------------


def test_events_come_in_order_and_tokens_arrive_while_the_llm_generates(local, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=40)  # ~2 s of generation
    ttft_before = metric(local.url, "flowgate_engine_time_to_first_token_seconds_count")
    body = question("order")
    events, at_first_token = [], None
    with open_run(local.url, body) as resp:
        for event in events_of(resp):
            events.append(event)
            if event[1] == "token" and at_first_token is None:
                at_first_token = fresh_llm_sim.stats()

    assert_full_run(events, body, 40)
    assert at_first_token["chat_completions_completed"] == 0, (
        "the first token reached the client only after the LLM had answered: buffered")
    assert record(local.url, events[0][2]["run_id"])["status"] == "succeeded"
    assert metric(local.url, "flowgate_engine_time_to_first_token_seconds_count") == ttft_before + 1


@pytest.mark.parametrize("k", [3, 9])  # inside the first nodes; in the middle of the tokens
def test_a_dropped_stream_resumes_exactly_with_last_event_id(deployment, fresh_llm_sim, k):
    # ~3 s of generation: still running when resumed, though the test's thread may stall
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=60)
    body = question("resume")
    resp = open_run(deployment.start_url, body, "&on_disconnect=continue")
    run_id = resp.headers["X-Run-ID"]
    if deployment.run_ids is not None:
        deployment.run_ids.append(run_id)

    first = read_then_drop(resp, k)
    if deployment.redis_url is not None:
        wait_mirrored(deployment.redis_url, run_id, k)
    status_then = record(deployment.watch_url, run_id)["status"]
    resumed = watch(deployment.watch_url, run_id, last_event_id=k)

    assert status_then == "running", "the resume followed the run while it went on"
    assert [e[0] for e in first] == [str(i) for i in range(1, k + 1)]
    assert_full_run(first + resumed, body, 60)
    assert watch(deployment.watch_url, run_id) == first + resumed
    assert wait_status(deployment.watch_url, run_id, "succeeded")["result"]["output"] == (
        expected_reply(body, 60))


@pytest.mark.parametrize("where", ["local", "pair"])
def test_several_clients_watching_one_run_each_see_every_event_once(request, fresh_llm_sim, where):
    fresh_llm_sim.configure(tokens_per_s=40, reply_tokens=20)
    if where == "local":
        url = request.getfixturevalue("local").url
        start_url, watch_urls = url, [url] * 4
    else:
        a, b = request.getfixturevalue("pair")
        start_url, watch_urls = a.url, [a.url, a.url, b.url, b.url]
    body = question("many")
    resp = open_run(start_url, body)
    run_id = resp.headers["X-Run-ID"]
    if where == "pair":
        request.getfixturevalue("pair_run_ids").append(run_id)
        wait_mirrored(request.getfixturevalue("redis_url"), run_id, 1)

    with ThreadPoolExecutor(len(watch_urls) + 1) as pool:
        streamed = pool.submit(lambda: list(events_of(resp)))
        watchers = [pool.submit(watch, url, run_id) for url in watch_urls]
        seen = [w.result(timeout=WAIT_S) for w in watchers]
        original = streamed.result(timeout=WAIT_S)
    resp.close()

    assert_full_run(original, body, 20)
    for events in seen:
        assert events == original


def test_a_client_going_away_cancels_the_run(local, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=200)  # ~10 s if never cancelled
    disconnects = metric(local.url, "flowgate_engine_stream_disconnects_total", transport="sse")
    resp = open_run(local.url, question("cancel"))
    run_id = resp.headers["X-Run-ID"]

    first = []
    for event in events_of(resp):
        first.append(event)
        if event[1] == "token" and event[2]["index"] == 2:
            break
    resp.close()

    wait_until(lambda: fresh_llm_sim.stats()["streams_closed_early"] >= 1,
               "llm-sim to see its stream closed early")
    final = wait_status(local.url, run_id, "cancelled")
    assert final["error"]["code"] == "run_cancelled"
    assert fresh_llm_sim.stats()["tokens_sent"] < 100
    wait_until(lambda: metric(local.url, "flowgate_engine_stream_disconnects_total",
                              transport="sse") > disconnects, "the disconnect to be counted")
    events = watch(local.url, run_id)
    assert events[: len(first)] == first
    assert (events[-1][1], events[-1][2]["code"]) == ("error", "run_cancelled")


def test_on_disconnect_continue_lets_the_run_finish_and_replay(local, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=40, reply_tokens=20)
    body = question("continue")
    resp = open_run(local.url, body, "&on_disconnect=continue")
    run_id = resp.headers["X-Run-ID"]

    first = read_then_drop(resp, 8)

    wait_status(local.url, run_id, "succeeded")
    events = watch(local.url, run_id)
    assert_full_run(events, body, 20)
    assert events[:8] == first
    stats = fresh_llm_sim.stats()
    assert (stats["streams_closed_early"], stats["chat_completions_completed"]) == (0, 1)


@pytest.mark.parametrize("keyed", [
    pytest.param(True, id="idempotency-key"),
    pytest.param(False, id="no-key"),
])
def test_cancel_from_the_other_process_stops_the_run(pair, pair_run_ids, fresh_llm_sim, keyed):
    a, b = pair
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=200)
    headers = {"Idempotency-Key": f"cancel-{uuid.uuid4().hex}"} if keyed else {}
    resp = open_run(a.url, question("remote-cancel"), **headers)
    run_id = resp.headers["X-Run-ID"]
    pair_run_ids.append(run_id)
    on_a: list[Event] = []

    def read_a() -> None:
        with contextlib.suppress(requests.RequestException, AttributeError, ValueError):
            on_a.extend(events_of(resp))  # (closing the response under it ends it)

    reader = threading.Thread(target=read_a, daemon=True)
    reader.start()
    try:
        wait_until(lambda: fresh_llm_sim.stats()["tokens_sent"] >= 3, "the LLM to stream")
        cancelled = requests.post(f"{b.url}/api/v1/runs/{run_id}/cancel", headers=AUTH,
                                  timeout=TIMEOUT)
        assert cancelled.status_code == 202, cancelled.text
        reader.join(WAIT_S)
        assert not reader.is_alive(), "A's stream did not end"
    finally:
        resp.close()  # without a working remote cancel, the disconnect stops the run
        reader.join(WAIT_S)
        wait_until(lambda: fresh_llm_sim.stats()["active_streams"] == 0, "the LLM to stop")

    assert cancelled.json() == {"run_id": run_id, "status": "cancelling"}
    assert (on_a[-1][1], on_a[-1][2]["code"]) == ("error", "run_cancelled")
    assert wait_status(b.url, run_id, "cancelled")["error"]["code"] == "run_cancelled"
    assert fresh_llm_sim.stats()["streams_closed_early"] == 1


def test_keep_alive_comments_arrive_while_the_run_is_quiet(local, fresh_llm_sim):
    fresh_llm_sim.configure(ttft_s=3, reply_tokens=3)  # silent for 3 s; keep-alive 0.3 s
    with open_run(local.url, question("quiet")) as resp:
        raw = b"".join(resp.iter_content(chunk_size=None))

    # at least three before the first token (ten fit in the silence: no race with it)
    assert raw[:raw.index(b"event: token")].count(b": keep-alive\n\n") >= 3
    assert raw.rstrip().splitlines()[-2].startswith(b"event: run_finished")
