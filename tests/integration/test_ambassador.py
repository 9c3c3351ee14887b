"""The ambassador as users run it: `flowgate ambassador` (gunicorn + gevent) with a YAML
config, in front of a real `flowgate engine` (gunicorn + gevent, SQLite) and the llm-sim,
plus throwaway redis-servers where Redis matters (never the shared one on 6379).

One engine serves the whole module; tests that kill or stop the engine get their own
(`private_engine`). Each test starts the ambassadors it needs with its own config file,
except the auth tests, which share one ambassador per auth mode (their answers keep no
state). Processes are SIGKILLed at teardown: no test here is about graceful shutdown.

Nothing here depends on timing: waits are bounded loops on a condition, a server counts as
started only once a process of its own listens on its port (`start_owned`: free_port() only
says the port was free a moment ago), ports meant to refuse stay bound for the whole test,
and what a test proves is read from event order and metrics, not from a stopwatch.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import requests
import sseclient
import yaml
from support.needs import missing
from support.procs import ServerProcess, free_port, listens_on, start_owned
from support.prom import metric_value as metric
from support.waiting import wait_until

from flowgate.llm_sim import reply_tokens

pytestmark = pytest.mark.integration

ENGINE_KEY = "engine-service-key-1"
ENGINE_AUTH = {"Authorization": f"Bearer {ENGINE_KEY}"}
FLOW_ID = "sim-chat"
FLOW = {
    "id": FLOW_ID,
    "name": "Chat through llm-sim",
    "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "llm", "type": "ChatModel",
         "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
        {"id": "out", "type": "ChatOutput"},
    ],
    "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}],
}
# What every ambassador here starts from (the default filter chain, shorter timeouts and
# backoff); a test deep-merges its own keys over it.
BASE_CONFIG: dict[str, Any] = {
    "upstream": {"timeouts": {"connect_s": 0.5, "per_try_s": 10, "total_s": 20}},
    "retry": {"backoff_base_s": 0.02, "backoff_max_s": 0.1},
}
JWT_SECRET = "jwt-shared-secret-for-tests-0123456789"
JWT_AUDIENCE = "flowgate-ambassador"
ORDERS_KEY = "orders-secret-0001"
REPORTS_KEY = "reports-secret-0001"


def expected_output(text: str, n: int = 24) -> str:
    return "".join(reply_tokens([("user", text)], n))


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def wait_for(check: Callable[[], Any], timeout_s: float, interval_s: float = 0.1,
             what: str = "condition") -> Any:
    return wait_until(check, what, timeout_s, interval_s)


def assert_error_contract(resp: requests.Response, status: int, code: str | tuple[str, ...]) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] in ((code,) if isinstance(code, str) else code), error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in resp.text
    assert error["trace_id"] == resp.headers["X-Trace-ID"]
    return error


def sse_events(resp: requests.Response) -> Iterator[tuple[float, Any]]:
    """(arrival time, sseclient event) as events arrive."""
    for event in sseclient.SSEClient(resp).events():
        yield time.monotonic(), event


# -- processes ----------------------------------------------------------------------------------


def engine_process(workdir: Path, sim, port: int | None = None,
                   env: dict[str, str] | None = None) -> ServerProcess:
    """An engine on ``port`` (not started; ``start_owned`` starts one on a port of its own)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)]
    return ServerProcess(cmd, port=port, ready_path="/readyz", name="engine", ready_timeout=30,
                         cwd=workdir, stop_timeout=5, env={
                             "FLOW_ENGINE_API_KEYS": ENGINE_KEY,
                             "DATABASE_URL": f"sqlite:///{workdir / 'engine.db'}",
                             "OPENAI_BASE_URL": sim.base_url,
                             "REDIS_URL": "",
                             "FLOW_ENGINE_WORKERS": "1",  # in-memory event log: one process
                             "FLOW_ENGINE_GRACEFUL_TIMEOUT": "2",
                             "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"metrics-{port}"),
                             **(env or {})})


def start_engine(workdir: Path, sim, port: int | None = None,
                 env: dict[str, str] | None = None) -> ServerProcess:
    return start_owned(lambda chosen: engine_process(workdir, sim, chosen, env), port)


def ensure_flow(engine_url: str) -> None:
    resp = requests.post(engine_url + "/api/v1/flows", json=FLOW, headers=ENGINE_AUTH, timeout=10)
    assert resp.status_code in (201, 409), resp.text


def warm_up(engine_url: str, sim) -> None:
    """One run straight to the engine: a fresh worker's first run imports the LLM client
    (seconds), which would otherwise land on whatever the test measures. Zeroes the sim's
    counters afterwards."""
    resp = requests.post(engine_url + "/api/v1/run/" + FLOW_ID, json={"input_value": "warm up"},
                         headers=ENGINE_AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    sim.reset()


def kill_group(proc: ServerProcess) -> None:
    """SIGKILL the server's whole process group (gunicorn master and workers) at once."""
    assert proc.proc is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(10)


def quick_stop(proc: ServerProcess) -> None:
    """Teardown without a graceful drain: nothing here is worth the seconds it waits for."""
    if proc.alive():
        kill_group(proc)
    proc.stop()


class PrivateEngines:
    """Engines a test may kill and restart: same SQLite file and port across restarts."""

    def __init__(self, workdir: Path, sim) -> None:
        self.workdir, self.sim = workdir, sim
        self.procs: list[ServerProcess] = []

    def start(self, port: int | None = None, *, warm: bool = True,
              env: dict[str, str] | None = None) -> ServerProcess:
        def make(chosen: int) -> ServerProcess:
            proc = engine_process(self.workdir, self.sim, chosen, env)
            self.procs.append(proc)  # stopped at the end, whatever happens
            return proc

        proc = start_owned(make, port)
        ensure_flow(proc.url)
        if warm:
            warm_up(proc.url, self.sim)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            quick_stop(proc)


@pytest.fixture
def private_engine(tmp_path, llm_sim) -> Iterator[PrivateEngines]:
    workdir = tmp_path / "private-engine"
    workdir.mkdir()
    engines = PrivateEngines(workdir, llm_sim)
    try:
        yield engines
    finally:
        engines.stop_all()


@dataclass
class Ambassador:
    proc: ServerProcess
    config_path: Path

    @property
    def url(self) -> str:
        return self.proc.url

    def run(self, text: str = "hello there", *, headers: dict[str, str] | None = None,
            timeout: float = 30, **body: Any) -> requests.Response:
        payload = {"flow_id": FLOW_ID, "input": text, **body}
        return requests.post(self.url + "/run-flow", json=payload, headers=headers or {},
                             timeout=timeout)

    def metrics(self) -> str:
        resp = requests.get(self.url + "/metrics", timeout=10)
        assert resp.status_code == 200
        return resp.text

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics(), name, **labels)

    def write_config(self, text: str) -> None:
        """Replace the config file and move its mtime forward (coarse clocks included)."""
        before = self.config_path.stat().st_mtime
        self.config_path.write_text(text, encoding="utf-8")
        later = max(time.time(), before + 1.0)
        os.utime(self.config_path, (later, later))


class Ambassadors:
    """Starts ambassadors whose config files and metrics live in ``workdir``; stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[ServerProcess] = []

    def start(self, config: dict[str, Any], upstream_url: str, *, redis_url: str | None = None,
              upstream_key: str = ENGINE_KEY, env: dict[str, str] | None = None) -> Ambassador:
        n = len(self.started)
        path = self.workdir / f"ambassador-{n}.yaml"
        path.write_text(yaml.safe_dump(merged(BASE_CONFIG, config)), encoding="utf-8")

        def make(port: int) -> ServerProcess:
            cmd = [sys.executable, "-m", "flowgate.cli", "ambassador", "--port", str(port)]
            proc = ServerProcess(cmd, port=port, ready_path="/readyz", name="ambassador",
                                 ready_timeout=30, cwd=self.workdir, stop_timeout=5, env={
                                     "AMBASSADOR_CONFIG": str(path),
                                     "AMBASSADOR_UPSTREAM_URL": upstream_url,
                                     "AMBASSADOR_UPSTREAM_KEY": upstream_key,
                                     "REDIS_URL": redis_url or "",
                                     "PROMETHEUS_MULTIPROC_DIR": str(
                                         self.workdir / f"amb-metrics-{n}-{port}"),
                                     **(env or {})})
            self.started.append(proc)  # stopped at the end, whatever happens
            return proc

        return Ambassador(start_owned(make), path)

    def stop_all(self) -> None:
        for proc in self.started:
            quick_stop(proc)


@pytest.fixture(scope="module")
def module_ambassadors(tmp_path_factory) -> Iterator[Ambassadors]:
    """For ambassadors that tests share (the auth ones: their answers carry no state)."""
    ambassadors = Ambassadors(tmp_path_factory.mktemp("ambassadors"))
    try:
        yield ambassadors
    finally:
        ambassadors.stop_all()


def _redis_started(proc: subprocess.Popen, url: str) -> bool:
    """Wait (bounded) until the redis-server answers PING (True) or exits (False)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        def answered() -> str | None:
            if proc.poll() is not None:
                return "exited"
            try:
                return "up" if client.ping() else None
            except redis.RedisError:
                return None

        return wait_for(answered, 10, what="throwaway redis-server answers PING") == "up"
    finally:
        client.close()


@contextlib.contextmanager
def redis_server(workdir: Path, port: int | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """A throwaway redis-server on a loopback port of its own (never the shared one on 6379):
    like ``start_owned``, started again on another port when the one free_port() gave was
    taken meanwhile. A ``port`` given (Redis back on the same address) is kept."""
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed (tests that stop Redis start their own)")
    for attempt in range(1, 6):
        chosen = port or free_port()
        proc = subprocess.Popen(
            ["redis-server", "--port", str(chosen), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"redis://127.0.0.1:{chosen}/0"
        try:
            if _redis_started(proc, url) and listens_on(proc.pid, chosen):
                break
        except BaseException:
            proc.kill()
            proc.wait(5)
            raise
        proc.kill()
        proc.wait(5)
        if port is not None or attempt == 5:
            raise AssertionError(f"no redis-server of our own on port {chosen}")
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def run_cli(args: list[str], timeout_s: float = 20, **env: str) -> tuple[int | None, str]:
    """Run ``flowgate ARGS``; returns (exit code, stderr). A process still running after
    ``timeout_s`` is killed with its group and reported with exit code None."""
    proc = subprocess.Popen([sys.executable, "-m", "flowgate.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "REDIS_URL": "", **env}, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, err.decode(errors="replace")
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=5)
        return None, err.decode(errors="replace")


def engine_run_record(engine_url: str, run_id: str) -> dict[str, Any]:
    def fetch():
        resp = requests.get(f"{engine_url}/api/v1/runs/{run_id}", headers=ENGINE_AUTH, timeout=10)
        return resp.json() if resp.status_code == 200 else None

    return wait_for(fetch, 5, what=f"engine has a record of run {run_id}")


# -- happy path and tracing ---------------------------------------------------------------------


def test_run_through_the_ambassador_matches_the_engine(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({}, engine.url)
    direct = requests.post(engine.url + "/api/v1/run/" + FLOW_ID,
                           json={"input_value": "hello there"}, headers=ENGINE_AUTH, timeout=30)
    assert direct.status_code == 200, direct.text

    resp = amb.run("hello there")

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["output"] == direct.json()["output"] == expected_output("hello there")
    assert body["flow_id"] == FLOW_ID and body["version"] == 1
    trace_id = resp.headers["X-Trace-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    assert re.fullmatch(rf"00-{trace_id}-[0-9a-f]{{16}}-[0-9a-f]{{2}}", resp.headers["traceparent"])
    assert resp.headers["X-Upstream-Attempts"] == "1"
    assert resp.headers["X-Cache"] == "BYPASS"  # the flow is not opted in to caching
    assert float(resp.headers["X-Ambassador-Overhead-Ms"]) >= 0
    assert resp.headers["X-Run-ID"] == body["run_id"]
    # The caller sent no credentials and the engine refuses runs without its key, so the
    # 200 above means the ambassador added the engine's key.
    bare = requests.post(engine.url + "/api/v1/run/" + FLOW_ID, json={"input_value": "x"},
                         timeout=10)
    assert bare.status_code == 401
    assert engine_run_record(engine.url, body["run_id"])["trace_id"] == trace_id
    assert fresh_llm_sim.stats()["chat_completions_started"] == 2  # direct + through


def test_incoming_trace_headers_are_kept_end_to_end(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({}, engine.url)
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{'b7ad6b7169203331'}-01"

    resp = amb.run("traced", headers={"traceparent": traceparent, "X-Request-ID": "order-77"})

    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Trace-ID"] == trace_id
    assert resp.headers["traceparent"] == traceparent
    assert resp.headers["X-Request-ID"] == "order-77"
    assert engine_run_record(engine.url, resp.json()["run_id"])["trace_id"] == trace_id
    # errors carry them too
    bad = requests.post(amb.url + "/run-flow", json={"input": "no flow id"},
                        headers={"traceparent": traceparent}, timeout=10)
    assert assert_error_contract(bad, 400, "bad_request")["trace_id"] == trace_id


def test_streamed_requests_are_logged_with_their_trace_id(engine, start_ambassador,
                                                          fresh_llm_sim):
    amb = start_ambassador({}, engine.url)
    resp = requests.post(amb.url + "/run-flow",
                         json={"flow_id": FLOW_ID, "input": "log me", "stream": True},
                         stream=True, timeout=30)
    assert [e.event for _, e in sse_events(resp)][-1] == "run_finished"

    def access_lines():
        lines = [json.loads(line) for line in amb.proc.tail(500).splitlines()
                 if line.startswith("{") and '"ambassador.access"' in line]
        return [line for line in lines if line.get("stream")]

    [line] = wait_for(access_lines, 15, what="the streamed request is logged")
    assert line.get("trace_id") == resp.headers["X-Trace-ID"], line


def test_bad_requests_are_refused_before_the_engine(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({}, engine.url)
    url = amb.url + "/run-flow"
    json_type = {"Content-Type": "application/json"}

    cases = [
        (requests.post(url, data=b"{not json", headers=json_type, timeout=10), 400, "bad_request"),
        (requests.post(url, data=b"flow_id=x", timeout=10), 415, "unsupported_media_type"),
        (requests.post(url, json={"flow_id": FLOW_ID, "inptu": "typo"}, timeout=10), 400,
         "bad_request"),
        (requests.post(url, json={"flow_id": "../etc", "input": "x"}, timeout=10), 400,
         "bad_request"),
        (requests.post(url, json={"flow_id": FLOW_ID, "input": "x" * 2_000_000}, timeout=10),
         413, "payload_too_large"),
        (requests.get(url, timeout=10), 405, "method_not_allowed"),
        (requests.get(amb.url + "/no-such-route", timeout=10), 404, "not_found"),
        # a chunked body (no Content-Length) over the limit
        (requests.post(url, data=iter([b'{"flow_id": "x", "input": "', b"x" * 2_000_000, b'"}']),
                       headers=json_type, timeout=10), 413, "payload_too_large"),
    ]

    for resp, status, code in cases:
        assert_error_contract(resp, status, code)
    unknown = amb.run(flow_id="no-such-flow")
    assert_error_contract(unknown, 404, "flow_not_found")
    assert fresh_llm_sim.stats()["chat_completions_started"] == 0
    # a chunked body within the limit is an ordinary run
    chunked = requests.post(url, headers=json_type, timeout=10, data=iter(
        [json.dumps({"flow_id": FLOW_ID, "input": "in pieces"}).encode()[i:i + 7]
         for i in range(0, 60, 7)]))
    assert chunked.status_code == 200, chunked.text
    assert chunked.json()["output"]


def test_rate_limit_answers_429_with_retry_after(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({"ratelimit": {"requests_per_s": 0.2, "burst": 2}}, engine.url)

    answers = [amb.run(f"limited {i}") for i in range(3)]

    assert [a.status_code for a in answers[:2]] == [200, 200]
    assert_error_contract(answers[2], 429, "rate_limited")
    assert int(answers[2].headers["Retry-After"]) >= 1
    assert fresh_llm_sim.stats()["chat_completions_started"] == 2


# -- engine down, slow, retries ----------------------------------------------------------------


def test_engine_killed_mid_load_breaker_opens_then_recovers(private_engine, start_ambassador,
                                                            fresh_llm_sim):
    eng = private_engine.start()
    fresh_llm_sim.configure(ttft_s=0.1)
    # deadlines no run of a healthy engine misses on a loaded machine (every answer before
    # the kill must be a 200); after it, refused connections fail at once
    total_s = 10.0
    amb = start_ambassador({
        "upstream": {"timeouts": {"per_try_s": 5.0, "total_s": total_s}},
        "retry": {"max_attempts": 2},
        "breaker": {"consecutive_failures": 3, "open_s": 1, "min_requests": 100_000},
    }, eng.url)
    results: list[tuple[float, float, int | None, dict]] = []  # (start, seconds, status, body)
    lock = threading.Lock()
    stop = threading.Event()

    def load(worker: int) -> None:
        for i in range(2000):  # bounded; normally ended by `stop`
            if stop.is_set():
                return
            started = time.monotonic()
            try:
                resp = amb.run(f"load {worker} {i}", timeout=total_s + 10)
                status, body = resp.status_code, resp.json()
            except (requests.RequestException, ValueError) as exc:
                status, body = None, {"exception": repr(exc)}
            with lock:
                results.append((started, time.monotonic() - started, status, body))

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    def successes() -> int:
        with lock:
            return sum(r[2] == 200 for r in results)

    try:
        wait_for(lambda: successes() >= 8, 15, what="load succeeds")
        killed_at = time.monotonic()
        kill_group(eng)

        def breaker_open() -> bool:
            with lock:
                return any(r[0] > killed_at and r[3].get("error", {}).get("code") == "circuit_open"
                           for r in results)

        wait_for(breaker_open, 10, interval_s=0.02, what="the breaker opens under load")
    finally:
        stop.set()
        for t in threads:
            t.join(total_s + 15)
    assert not any(t.is_alive() for t in threads)

    before = [r for r in results if r[0] + r[1] < killed_at]
    assert before and all(r[2] == 200 for r in before), [r for r in before if r[2] != 200][:3]
    # No request hung (each had total_s + 10 s before the client gave up), whatever it got.
    assert all(r[2] is not None for r in results), [r for r in results if r[2] is None][:3]
    after = [r for r in results if r[0] > killed_at]
    assert {r[2] for r in after} <= {200, 502, 503, 504}, {r[2] for r in after}

    # Open breaker: answered at once with 503 circuit_open and Retry-After.
    def trip() -> bool:
        r = amb.run("probe", timeout=total_s + 5)
        return r.status_code == 503 and r.json()["error"]["code"] == "circuit_open"

    wait_for(trip, 10, interval_s=0.01, what="the breaker is open")
    attempts = amb.metric("flowgate_ambassador_upstream_attempts_total")
    for _ in range(30):  # the engine is down: its /readyz never answers, no trial goes
        resp = amb.run("probe", timeout=total_s + 5)
        assert_error_contract(resp, 503, "circuit_open")
        assert int(resp.headers["Retry-After"]) >= 1
        assert "X-Upstream-Attempts" not in resp.headers  # answered before the retry filter
    # fast because nothing waited on the engine: not one attempt was made
    assert amb.metric("flowgate_ambassador_upstream_attempts_total") == attempts

    ready = requests.get(amb.url + "/readyz?verbose=1", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["upstream"]["breaker"] in ("open", "half_open")
    assert amb.metric("flowgate_ambassador_breaker_transitions_total", to="open") >= 1

    # Same port, same store: the ambassador recovers once the engine says it is ready.
    private_engine.start(eng.port, warm=False)

    def recovered() -> bool:
        return amb.run("after restart", timeout=total_s + 5).status_code == 200

    # The restarted engine's first run may be slow on a loaded machine (it compiles the flow
    # and opens its connections), so a first trial may fail and re-open the breaker for a
    # backoff.
    wait_for(recovered, 30, interval_s=0.1, what="requests succeed after the engine restarts")
    # Once it is back, runs go through with nothing retried for a refused connection, a reset
    # or a 503. (An attempt slower than the 5 s per-try limit on a loaded machine is retried
    # under its Idempotency-Key: that says how fast the machine is, not whether it recovered.)
    def failed_retries() -> dict[str, float]:
        return {reason: amb.metric("flowgate_ambassador_retries_total", reason=reason)
                for reason in ("connect_error", "unavailable", "upstream_error")}

    before = failed_retries()
    ok = amb.run("after restart 2")
    assert ok.status_code == 200, ok.text
    assert failed_retries() == before
    assert requests.get(amb.url + "/readyz?verbose=1", timeout=5).json()["upstream"]["breaker"] == "closed"


def test_slow_engine_is_a_504_within_the_deadline(engine, start_ambassador, fresh_llm_sim):
    fresh_llm_sim.configure(ttft_s=3.0)
    total_s = 1.0
    amb = start_ambassador({"upstream": {"timeouts": {"per_try_s": 0.4, "total_s": total_s}}},
                           engine.url)

    resp = amb.run("too slow", timeout=10)

    # the deadline's answer: without it the engine would answer 200 after the LLM's 3 s
    assert_error_contract(resp, 504, ("upstream_timeout", "timeout"))
    assert int(resp.headers["X-Upstream-Attempts"]) >= 1

    def calls_ended() -> dict | None:  # the engine's run may reach the model after the 504
        s = fresh_llm_sim.stats()
        ended = s["chat_completions_completed"] + s["streams_closed_early"]
        return s if s["chat_completions_started"] >= 1 and ended >= s["chat_completions_started"] else None

    # the timed-out attempts were retried with one Idempotency-Key: one LLM call
    assert wait_until(calls_ended, what="the model's calls ended")["chat_completions_started"] == 1


def test_retries_after_a_timeout_reuse_the_first_run(engine, start_ambassador, fresh_llm_sim):
    fresh_llm_sim.configure(ttft_s=1.2)
    amb = start_ambassador({
        "upstream": {"timeouts": {"per_try_s": 0.4, "total_s": 8}},
        "retry": {"max_attempts": 8, "budget_min_per_s": 10},
    }, engine.url)

    resp = amb.run("only once please")

    assert resp.status_code == 200, resp.text
    assert int(resp.headers["X-Upstream-Attempts"]) > 1
    assert resp.headers.get("Idempotent-Replayed") == "true"  # the engine answered with run 1
    assert resp.json()["output"] == expected_output("only once please")
    stats = fresh_llm_sim.stats()
    assert stats["chat_completions_started"] == 1, stats
    assert amb.metric("flowgate_ambassador_retries_total", reason="timeout") >= 1


def test_an_llm_failure_is_a_502_neither_retried_nor_tripping_the_breaker(
        engine, start_ambassador, fresh_llm_sim):
    fresh_llm_sim.configure(error_rate=1.0, error_kinds=["500"])
    amb = start_ambassador({"breaker": {"consecutive_failures": 2}}, engine.url)

    answers = [amb.run(f"fail {i}") for i in range(4)]

    for answer in answers:
        assert_error_contract(answer, 502, ("llm_error", "run_failed"))
        assert answer.headers["X-Upstream-Attempts"] == "1"  # the engine may have started work
    stats = fresh_llm_sim.stats()
    assert stats["errors_injected"]["500"] == 4, stats  # one LLM call per request
    assert stats["requests"]["/v1/chat/completions"] == 4, stats
    verbose = requests.get(amb.url + "/readyz?verbose=1", timeout=5).json()
    assert verbose["upstream"]["breaker"] == "closed"  # the engine itself is fine


def test_a_callers_idempotency_key_is_honoured_end_to_end(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({}, engine.url)
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}

    first = amb.run("pay once", headers=key)
    again = amb.run("pay once", headers=key)
    other = amb.run("pay twice", headers=key)

    assert first.status_code == again.status_code == 200
    assert again.json()["run_id"] == first.json()["run_id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert_error_contract(other, 409, "conflict")
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


class PortGate:
    """A loopback port that refuses connections until :meth:`open`, then relays each one to
    ``target_port``. Opening it takes microseconds, where starting an engine on the port
    takes seconds: a test can open it at the very moment it chooses. The port is bound from
    the start (refusing, as nothing listens yet), so no other process can take it meanwhile."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.relayed = 0

    def open(self) -> None:
        self.listener.listen()
        threading.Thread(target=self._accept, daemon=True, name="gate-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.relayed += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_connection_refused_is_retried_until_the_engine_listens(private_engine, start_ambassador,
                                                                fresh_llm_sim):
    """The engine becomes reachable while a request is being retried — by construction:
    the port opens (a gate in front of a running engine) only once the ambassador's
    retries counter shows a request retrying against the closed port. (Starting an engine
    there instead raced its boot time against the retries: sometimes every request came
    after the engine was up, with one attempt each.)"""
    eng = private_engine.start()
    gate = PortGate(eng.port)  # refuses until it opens
    amb = start_ambassador({
        "upstream": {"timeouts": {"per_try_s": 5, "total_s": 30}},
        "retry": {"max_attempts": 10, "backoff_base_s": 0.5, "backoff_max_s": 1.0,
                  "budget_ratio": 1.0, "budget_min_per_s": 100},
        "breaker": {"consecutive_failures": 1000, "min_requests": 100_000},
    }, f"http://127.0.0.1:{gate.port}")

    refused = amb.run("nobody home")
    assert_error_contract(refused, 503, "upstream_unavailable")
    assert refused.headers["X-Upstream-Attempts"] == "10"
    assert "Retry-After" in refused.headers

    retries = "flowgate_ambassador_retries_total"
    before = amb.metric(retries, reason="connect_error")
    answers: list[requests.Response] = []
    thread = threading.Thread(target=lambda: answers.append(amb.run("retry me", timeout=40)),
                              daemon=True)
    thread.start()
    try:
        wait_for(lambda: amb.metric(retries, reason="connect_error") > before, 10, interval_s=0.01,
                 what="the request is being retried against the closed port")
        gate.open()  # at least 8 of its 10 attempts are still to come
        thread.join(40)
        assert not thread.is_alive()
        [retried] = answers
        assert retried.status_code == 200, retried.text
        assert int(retried.headers["X-Upstream-Attempts"]) > 1
        assert retried.json()["output"] == expected_output("retry me")
        direct = amb.run("once more")
        assert direct.status_code == 200 and direct.headers["X-Upstream-Attempts"] == "1"
    finally:
        gate.close()
    assert gate.relayed >= 1
    # refused attempts never reached the engine: one LLM call per success, no duplicates
    assert fresh_llm_sim.stats()["chat_completions_started"] == 2


# -- streams -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", [
    pytest.param({"body": {"stream": True}}, id="stream-true"),
    pytest.param({"headers": {"Accept": "text/event-stream"}}, id="accept-header"),
])
def test_stream_passes_tokens_through_as_they_are_generated(engine, start_ambassador,
                                                            fresh_llm_sim, how):
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=80)  # 4 s: a stalled client's margin
    amb = start_ambassador({}, engine.url)
    started = time.monotonic()
    resp = requests.post(amb.url + "/run-flow",
                         json={"flow_id": FLOW_ID, "input": "stream it", **how.get("body", {})},
                         headers=how.get("headers", {}), stream=True, timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Upstream-Attempts"] == "1"
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Trace-ID"])

    events, sent_at_first_token = [], None
    for at, event in sse_events(resp):
        if event.event == "token" and sent_at_first_token is None:
            sent_at_first_token = fresh_llm_sim.stats()["tokens_sent"]
        events.append((at, event))

    names = [e.event for _, e in events]
    assert names[0] == "run_started" and names[-1] == "run_finished", names
    tokens = [(at, json.loads(e.data)) for at, e in events if e.event == "token"]
    assert len(tokens) == 80
    # told by the sim's state, not by our clock: the first token was here before the model
    # had sent its last (~4 s later)
    assert sent_at_first_token < 80, "tokens were buffered until the end"
    output = json.loads(events[-1][1].data)["output"]
    assert "".join(t["text"] for _, t in tokens) == output == expected_output("stream it", 80)
    assert [int(e.id) for _, e in events] == list(range(1, len(events) + 1))
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1
    # the latency histogram has the time to the first event; the whole stream has its own
    text = amb.metrics()
    count = "flowgate_ambassador_stream_duration_seconds_count"
    assert metric(text, count, route="/run-flow") == 1
    whole = metric(text, "flowgate_ambassador_stream_duration_seconds_sum", route="/run-flow")
    to_answer = metric(text, "flowgate_ambassador_request_duration_seconds_sum", route="/run-flow")
    assert whole > 3.5  # 80 tokens at 20 a second, paced by the llm-sim
    first_token_at = tokens[0][0]
    assert 0 < to_answer < first_token_at - started + 0.05  # its first event came first


def test_run_events_resume_exactly_from_last_event_id(engine, start_ambassador, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=16)
    amb = start_ambassador({}, engine.url)
    resp = requests.post(amb.url + "/run-flow", json={
        "flow_id": FLOW_ID, "input": "resume me", "stream": True, "on_disconnect": "continue"},
        stream=True, timeout=30)
    assert resp.status_code == 200
    run_id = resp.headers["X-Run-ID"]
    head = []
    for _, event in sse_events(resp):
        head.append((event.id, event.event, event.data))
        if event.event == "token":
            break
    resp.close()  # the client drops the stream mid-run
    last_id = head[-1][0]

    tail_resp = requests.get(f"{amb.url}/runs/{run_id}/events",
                             headers={"Last-Event-ID": last_id}, stream=True, timeout=30)
    assert tail_resp.status_code == 200
    assert tail_resp.headers["Content-Type"].startswith("text/event-stream")
    tail = [(e.id, e.event, e.data) for _, e in sse_events(tail_resp)]
    full_resp = requests.get(f"{amb.url}/runs/{run_id}/events", stream=True, timeout=30)
    full = [(e.id, e.event, e.data) for _, e in sse_events(full_resp)]

    assert full[-1][1] == "run_finished"
    assert [int(i) for i, _, _ in full] == list(range(1, len(full) + 1))
    assert tail[0][0] == str(int(last_id) + 1)
    assert head + tail == full  # nothing missed, nothing twice
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


def test_run_events_resume_from_the_last_event_id_query_parameter(engine, start_ambassador,
                                                                  fresh_llm_sim):
    amb = start_ambassador({}, engine.url)
    run_id = amb.run("resume by query").json()["run_id"]
    full = requests.get(f"{engine.url}/api/v1/runs/{run_id}/events", headers=ENGINE_AUTH,
                        stream=True, timeout=30)
    ids = [e.id for _, e in sse_events(full)]

    tail = requests.get(f"{amb.url}/runs/{run_id}/events?last_event_id=3", stream=True, timeout=30)

    assert [e.id for _, e in sse_events(tail)] == ids[3:]


def test_a_silent_stream_ends_with_an_error_event_after_the_idle_limit(engine, start_ambassador,
                                                                       fresh_llm_sim):
    fresh_llm_sim.configure(ttft_s=3.0)
    amb = start_ambassador({"upstream": {"timeouts": {"stream_idle_s": 0.8}}}, engine.url)
    resp = requests.post(amb.url + "/run-flow",
                         json={"flow_id": FLOW_ID, "input": "say nothing", "stream": True},
                         stream=True, timeout=30)
    assert resp.status_code == 200

    events = list(sse_events(resp))

    # the idle limit's error, not the tokens the LLM sends after 3 s
    assert events[0][1].event == "run_started"
    assert events[-1][1].event == "error", [e.event for _, e in events]
    assert json.loads(events[-1][1].data)["code"] == "upstream_timeout"
    # not retried: a retry is made before an answer starts, and this one has ended
    assert amb.metric("flowgate_ambassador_upstream_attempts_total") == 1
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


def test_a_client_leaving_mid_stream_cancels_the_run(engine, start_ambassador, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=10, reply_tokens=40)
    amb = start_ambassador({}, engine.url)
    resp = requests.post(amb.url + "/run-flow",
                         json={"flow_id": FLOW_ID, "input": "never mind", "stream": True},
                         stream=True, timeout=30)
    run_id = resp.headers["X-Run-ID"]
    for _, event in sse_events(resp):
        if event.event == "token":
            break
    resp.close()

    def ended():
        record = requests.get(f"{engine.url}/api/v1/runs/{run_id}", headers=ENGINE_AUTH,
                              timeout=10).json()
        return record if record.get("status", "running") != "running" else None  # or not yet recorded

    # cancelled, not finished: it ended before its 40 tokens were generated
    assert wait_for(ended, 15, what="the engine ends the abandoned run")["status"] == "cancelled"
    stats = wait_for(lambda: (st := fresh_llm_sim.stats())["streams_closed_early"] == 1 and st,
                     15, what="the engine closes its LLM stream")
    assert stats["tokens_sent"] < 40, stats
    # the abandoned upstream connection is not reused: the next answer is clean
    unknown = requests.get(amb.url + "/runs/no-such-run/events", timeout=10)
    assert_error_contract(unknown, 404, "run_not_found")
    assert unknown.headers["X-Upstream-Attempts"] == "1"


def test_engine_killed_mid_stream_is_not_retried(private_engine, start_ambassador, fresh_llm_sim):
    eng = private_engine.start()
    fresh_llm_sim.configure(tokens_per_s=5, reply_tokens=40)
    amb = start_ambassador({"upstream": {"timeouts": {"stream_idle_s": 3}}}, eng.url)
    resp = requests.post(amb.url + "/run-flow",
                         json={"flow_id": FLOW_ID, "input": "cut me off", "stream": True},
                         stream=True, timeout=30)
    assert resp.status_code == 200
    assert resp.headers["X-Upstream-Attempts"] == "1"
    names: list[str] = []
    errors: list[dict] = []
    truncated = False
    killed_at = None
    try:
        for _, event in sse_events(resp):
            names.append(event.event)
            if event.event == "error":
                errors.append(json.loads(event.data))
            if names.count("token") == 3 and killed_at is None:
                killed_at = time.monotonic()
                kill_group(eng)
    except requests.RequestException:
        truncated = True

    assert killed_at is not None, names
    assert "run_finished" not in names
    assert truncated or errors, names
    if errors:
        assert errors[-1]["code"] in ("bad_upstream", "upstream_timeout"), errors
    # not retried: a retry is made before an answer starts, and this one has ended
    assert amb.metric("flowgate_ambassador_upstream_attempts_total") == 1
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


# -- cache --------------------------------------------------------------------------------------

CACHED = {"flows": {FLOW_ID: {"cache": {"ttl_s": 60, "stale_if_error_s": 600}}}}


def test_cache_miss_then_hit_and_no_cache_bypasses(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador(CACHED, engine.url)
    text = f"cache me {uuid.uuid4().hex[:8]}"

    miss = amb.run(text)
    hit = amb.run(text)
    bypass = amb.run(text, headers={"Cache-Control": "no-cache"})
    streamed = requests.post(amb.url + "/run-flow",
                             json={"flow_id": FLOW_ID, "input": text, "stream": True}, timeout=30)

    assert [r.status_code for r in (miss, hit, bypass, streamed)] == [200] * 4
    assert miss.headers["X-Cache"] == "MISS"
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.json() == miss.json()  # the same run, not another one
    assert bypass.headers["X-Cache"] == "BYPASS"
    assert bypass.json()["run_id"] != miss.json()["run_id"]
    assert streamed.headers["Content-Type"].startswith("text/event-stream")  # never cached
    assert fresh_llm_sim.stats()["chat_completions_started"] == 3
    assert amb.run(text).headers["X-Cache"] == "HIT"  # the no-cache answer was stored
    assert amb.run(text + " other").headers["X-Cache"] == "MISS"
    assert amb.metric("flowgate_ambassador_cache_total", result="hit") == 2


def publish_v2(engine_url: str) -> str:
    """Add version 2 of the flow (its answers start with "[v2]") and make it live; the
    flow's URL on the engine."""
    v2 = {**FLOW, "nodes": [*FLOW["nodes"], {"id": "p", "type": "PromptTemplate",
                                             "params": {"template": "[v2] {question}"}}],
          "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
                    {"source": "llm", "target": "out"}]}
    base = f"{engine_url}/api/v1/flows/{FLOW_ID}"
    assert requests.put(base, json=v2, headers=ENGINE_AUTH, timeout=10).status_code == 201
    assert requests.post(base + "/publish", json={"version": 2}, headers=ENGINE_AUTH,
                         timeout=10).status_code == 200
    return base


def test_cache_follows_publish_and_rollback_without_redis(private_engine, start_ambassador):
    """No Redis: the ambassador re-reads a cached flow's routing every 2 s, so after a
    publish the old version's answer stops being served, and after the rollback it is the
    right answer again."""
    eng = private_engine.start()
    amb = start_ambassador(CACHED, eng.url)
    text = f"versioned {uuid.uuid4().hex[:8]}"
    first = amb.run(text)
    assert (first.headers["X-Cache"], first.headers["X-Flow-Version"]) == ("MISS", "1")
    assert amb.run(text).headers["X-Cache"] == "HIT"
    base = publish_v2(eng.url)

    fresh = wait_for(lambda: (r := amb.run(text)).headers["X-Flow-Version"] == "2" and r, 10,
                     what="an answer of version 2")
    assert fresh.headers["X-Cache"] == "MISS" and "[v2]" in fresh.json()["output"]
    after = [amb.run(text) for _ in range(3)]
    assert [(r.headers["X-Flow-Version"], r.headers["X-Cache"]) for r in after] == [("2", "HIT")] * 3

    assert requests.post(base + "/rollback", headers=ENGINE_AUTH, timeout=10).status_code == 200
    back = wait_for(lambda: (r := amb.run(text)).headers["X-Flow-Version"] == "1" and r, 10,
                    what="an answer of version 1 again")
    assert (back.headers["X-Cache"], back.content) == ("HIT", first.content)


def test_cache_follows_a_publish_through_the_engines_redis_signal(private_engine,
                                                                  start_ambassador, tmp_path):
    """With the engine's Redis, its flow_changed signal drops the cache's view of the flow
    at once: the routing re-read is set to a minute here, so only the signal can make the
    next answers version 2's (and the rollback's, version 1's again) — as the control, an
    ambassador on no Redis with the same setting still answers version 1 from its cache."""
    with redis_server(tmp_path) as (_, url):
        eng = private_engine.start(env={"REDIS_URL": url})
        amb = start_ambassador({**CACHED, "routing_check_s": 60, "redis_timeout_s": 5}, eng.url,
                               redis_url=url)  # 5 s: a healthy Redis slow a moment is no outage
        deaf = start_ambassador({**CACHED, "routing_check_s": 60}, eng.url)
        text = f"signalled {uuid.uuid4().hex[:8]}"
        first = amb.run(text)
        assert (first.headers["X-Cache"], first.headers["X-Flow-Version"]) == ("MISS", "1")
        assert amb.run(text).headers["X-Cache"] == "HIT"
        assert deaf.run(text).headers["X-Flow-Version"] == "1"
        base = publish_v2(eng.url)

        fresh = wait_for(lambda: (r := amb.run(text)).headers["X-Flow-Version"] == "2" and r,
                         15, what="an answer of version 2 (the signal reached the ambassador)")
        assert "[v2]" in fresh.json()["output"]
        stale = deaf.run(text)  # within its minute: the setting holds without a signal
        assert (stale.headers["X-Cache"], stale.headers["X-Flow-Version"]) == ("HIT", "1")
        assert requests.post(base + "/rollback", headers=ENGINE_AUTH,
                             timeout=10).status_code == 200
        back = wait_for(lambda: (r := amb.run(text)).headers["X-Flow-Version"] == "1" and r,
                        15, what="an answer of version 1 again")
        assert (back.headers["X-Cache"], back.content) == ("HIT", first.content)


def test_cache_entries_are_per_tenant(engine, start_ambassador, fresh_llm_sim):
    keys = [{"key": "shop-key-00001", "identity": "shop-orders", "tenant": "shop"},
            {"key": "shop-key-00002", "identity": "shop-reports", "tenant": "shop"},
            {"key": "bank-key-00001", "identity": "bank-app", "tenant": "bank"}]
    amb = start_ambassador({**CACHED, "inbound_auth": {"mode": "api_keys", "api_keys": keys}},
                           engine.url)
    text = f"tenant {uuid.uuid4().hex[:8]}"

    shop = amb.run(text, headers={"x-api-key": "shop-key-00001"})
    same_tenant = amb.run(text, headers={"x-api-key": "shop-key-00002"})
    bank = amb.run(text, headers={"x-api-key": "bank-key-00001"})

    assert [r.headers["X-Cache"] for r in (shop, same_tenant, bank)] == ["MISS", "HIT", "MISS"]
    assert bank.json()["run_id"] != shop.json()["run_id"]
    assert fresh_llm_sim.stats()["chat_completions_started"] == 2


def test_cache_tells_input_types_apart(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador(CACHED, engine.url)
    text = f"typed {uuid.uuid4().hex[:8]}"
    direct = requests.post(engine.url + "/api/v1/run/" + FLOW_ID,
                           json={"input_value": text, "input_type": "text"},
                           headers=ENGINE_AUTH, timeout=30)
    assert direct.status_code == 200, direct.text

    as_chat = amb.run(text)
    as_text = amb.run(text, input_type="text")

    assert as_chat.status_code == as_text.status_code == 200
    assert as_chat.json()["output"] != direct.json()["output"]  # the engine tells them apart
    assert as_text.headers["X-Cache"] == "MISS", as_text.json()["output"]
    assert as_text.json()["output"] == direct.json()["output"]


def test_cache_serves_stale_when_the_engine_is_down(private_engine, start_ambassador,
                                                    fresh_llm_sim):
    eng = private_engine.start()
    amb = start_ambassador({
        "flows": {FLOW_ID: {"cache": {"ttl_s": 0.5, "stale_if_error_s": 600},
                            "fallback": {"output": "Busy; a human will answer by email."}}},
        "upstream": {"timeouts": {"per_try_s": 2, "total_s": 3}},
        "breaker": {"consecutive_failures": 2, "open_s": 30, "min_requests": 100_000},
    }, eng.url)
    fresh = amb.run("keep me")
    assert fresh.status_code == 200 and fresh.headers["X-Cache"] == "MISS"
    time.sleep(0.6)  # past the TTL: only an engine failure may serve it now
    kill_group(eng)

    answers = [amb.run("keep me") for _ in range(4)]  # unreachable, then the breaker opens

    for stale in answers:
        assert stale.status_code == 200, stale.text
        assert stale.headers["X-Cache"] == "STALE"
        assert stale.content == fresh.content
        assert "Warning" in stale.headers
    assert requests.get(amb.url + "/readyz?verbose=1",
                        timeout=5).json()["upstream"]["breaker"] == "open"
    uncached = amb.run("never cached")  # no stale answer: the flow's fallback
    assert uncached.status_code == 200, uncached.text
    assert uncached.headers["X-Fallback"] == "true"
    body = uncached.json()
    assert body["output"] == "Busy; a human will answer by email."
    assert body["fallback"] is True and body["fallback_reason"] == "circuit_open"
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


def test_cache_serves_stale_when_the_llm_fails(engine, start_ambassador, fresh_llm_sim):
    amb = start_ambassador({"flows": {FLOW_ID: {"cache": {"ttl_s": 0.3, "stale_if_error_s": 600}}}},
                           engine.url)
    text = f"stale on 502 {uuid.uuid4().hex[:8]}"
    fresh = amb.run(text)
    assert fresh.headers["X-Cache"] == "MISS"
    time.sleep(0.4)
    fresh_llm_sim.configure(error_rate=1.0, error_kinds=["500"])

    stale = amb.run(text)

    assert stale.status_code == 200, stale.text
    assert stale.headers["X-Cache"] == "STALE"
    assert stale.content == fresh.content


def test_redis_cache_is_shared_by_two_ambassadors(engine, start_ambassador, fresh_llm_sim,
                                                   tmp_path):
    with redis_server(tmp_path) as (_proc, url):
        # a healthy Redis slower than the 0.5 s default for a moment (a loaded machine) would
        # be a MISS and a cache error here: that is another test's subject
        shared = {**CACHED, "redis_timeout_s": 5}
        first = start_ambassador(shared, engine.url, redis_url=url)
        second = start_ambassador(shared, engine.url, redis_url=url)
        text = f"shared {uuid.uuid4().hex[:8]}"

        miss = first.run(text)
        hit = second.run(text)

        assert miss.status_code == hit.status_code == 200
        assert (miss.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
        assert hit.json() == miss.json()
        assert fresh_llm_sim.stats()["chat_completions_started"] == 1
        assert first.metric("flowgate_ambassador_cache_errors_total") == 0


def test_requests_keep_working_when_redis_stops(engine, start_ambassador, fresh_llm_sim, tmp_path):
    """Redis down: the cache goes on in process memory (README: "Redis down: both services
    keep serving with local fallbacks") and the metrics say so; Redis back on the same
    address: the cache uses it again, without a restart."""
    with redis_server(tmp_path) as (proc, url):
        # 5 s: before the kill, a healthy Redis slow for a moment must not count as an error
        amb = start_ambassador({**CACHED, "ratelimit": {"requests_per_s": 1000, "burst": 1000},
                                "redis_timeout_s": 5}, engine.url, redis_url=url)
        assert amb.run("before").headers["X-Cache"] == "MISS"
        assert amb.run("before").headers["X-Cache"] == "HIT"
        assert amb.metric("flowgate_ambassador_cache_errors_total") == 0
        proc.kill()
        proc.wait(5)

        answers = [amb.run("before"), amb.run("after"), amb.run("after")]

    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    # "before" was cached in Redis, out of reach now; "after" is cached in memory
    assert [a.headers["X-Cache"] for a in answers] == ["MISS", "MISS", "HIT"]
    assert answers[2].json() == answers[1].json()
    assert answers[1].json()["output"] == expected_output("after")
    text = amb.metrics()
    assert metric(text, "flowgate_ambassador_cache_errors_total", op="get") >= 3
    assert metric(text, "flowgate_ambassador_cache_fallback_total", op="get") >= 3
    assert metric(text, "flowgate_ambassador_cache_fallback_total", op="set") >= 2
    assert metric(text, "flowgate_ambassador_cache_memory_entries") == 2
    assert metric(text, "flowgate_ambassador_cache_memory_bytes") > 0
    assert metric(text, "flowgate_ambassador_redis_failures_total") >= 1
    assert metric(text, "flowgate_ambassador_ratelimit_errors_total") >= 3
    assert fresh_llm_sim.stats()["chat_completions_started"] == 3

    # Redis back on the same address: after its pause the cache writes to it again.
    with redis_server(tmp_path, port=int(url.rsplit(":", 1)[1].split("/")[0])) as (_, again):
        client = redis.Redis.from_url(again, socket_timeout=5)

        def cached_in_redis() -> bool:
            assert amb.run("back").status_code == 200
            return any(client.scan_iter(match="flowgate:cache:*"))

        try:
            wait_for(cached_in_redis, 15, interval_s=0.2, what="the cache uses Redis again")
        finally:
            client.close()


# -- inbound auth -------------------------------------------------------------------------------

API_KEYS = {"inbound_auth": {"mode": "api_keys", "api_keys": [
    {"key": ORDERS_KEY, "identity": "orders-app", "tenant": "shop", "flows": [FLOW_ID]},
    {"key": REPORTS_KEY, "identity": "reports-app", "flows": ["reports-only"]},
]}}
JWT = {"inbound_auth": {"mode": "jwt", "jwt": {
    "algorithm": "HS256", "secret": JWT_SECRET, "audience": JWT_AUDIENCE, "leeway_s": 0}}}


def token(secret: str = JWT_SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "orders-app", "tenant": "shop", "aud": JWT_AUDIENCE, "flows": [FLOW_ID],
               "iat": now, "exp": now + 300, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret if algorithm != "none" else None, algorithm=algorithm)


@pytest.fixture(scope="module")
def api_key_ambassador(engine, module_ambassadors) -> Ambassador:
    return module_ambassadors.start(API_KEYS, engine.url)


@pytest.fixture(scope="module")
def jwt_ambassador(engine, module_ambassadors) -> Ambassador:
    return module_ambassadors.start(JWT, engine.url)


@pytest.mark.parametrize("headers, status, code", [
    pytest.param({}, 401, "unauthorized", id="missing"),
    pytest.param({"Authorization": "Bearer not-a-known-key"}, 401, "unauthorized", id="wrong-bearer"),
    pytest.param({"x-api-key": "not-a-known-key"}, 401, "unauthorized", id="wrong-x-api-key"),
    pytest.param({"Authorization": f"Basic {ORDERS_KEY}"}, 401, "unauthorized", id="basic-scheme"),
    pytest.param({"x-api-key": REPORTS_KEY}, 403, "forbidden", id="flow-not-allowed"),
    pytest.param({"Authorization": f"Bearer {ORDERS_KEY}"}, 200, None, id="valid-bearer"),
    pytest.param({"x-api-key": ORDERS_KEY}, 200, None, id="valid-x-api-key"),
])
def test_api_key_auth(api_key_ambassador, fresh_llm_sim, headers, status, code):
    amb = api_key_ambassador

    resp = amb.run("auth check", headers=headers)

    if status == 200:
        # x-api-key is what the engine reads first: it never got the caller's key
        assert resp.status_code == 200, resp.text
        assert resp.json()["output"] == expected_output("auth check")
        assert fresh_llm_sim.stats()["chat_completions_started"] == 1
    else:
        assert_error_contract(resp, status, code)
        if status == 401:
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert fresh_llm_sim.stats()["chat_completions_started"] == 0


@pytest.mark.parametrize("make, status", [
    pytest.param(lambda: None, 401, id="missing"),
    pytest.param(lambda: token(exp=int(time.time()) - 3600), 401, id="expired"),
    pytest.param(lambda: token(aud="someone-else"), 401, id="wrong-audience"),
    pytest.param(lambda: token(algorithm="none"), 401, id="alg-none"),
    pytest.param(lambda: token(secret="another-secret-of-enough-length-000"), 401, id="bad-signature"),
    pytest.param(lambda: token(exp=None), 401, id="no-exp"),
    pytest.param(lambda: token(nbf=int(time.time()) + 3600), 401, id="not-yet-valid"),
    pytest.param(lambda: token(flows=["reports-only"]), 403, id="flow-not-allowed"),
    pytest.param(lambda: token(flows=None), 403, id="no-flows-claim-means-no-flow"),
    pytest.param(lambda: token(tenant=7), 401, id="tenant-not-a-string"),
    pytest.param(lambda: token(), 200, id="valid"),
    pytest.param(lambda: token(flows=[FLOW_ID]), 200, id="valid-with-flows"),
])
def test_jwt_auth(jwt_ambassador, fresh_llm_sim, make, status):
    amb = jwt_ambassador
    jwt_token = make()
    headers = {"Authorization": f"Bearer {jwt_token}"} if jwt_token else {}

    resp = amb.run("jwt check", headers=headers)

    if status == 200:
        assert resp.status_code == 200, resp.text
        assert fresh_llm_sim.stats()["chat_completions_started"] == 1
    else:
        assert_error_contract(resp, status, "unauthorized" if status == 401 else "forbidden")
        assert fresh_llm_sim.stats()["chat_completions_started"] == 0


def test_run_events_need_credentials(api_key_ambassador, fresh_llm_sim):
    run_id = api_key_ambassador.run("events auth", headers={"x-api-key": ORDERS_KEY}).json()["run_id"]

    bare = requests.get(f"{api_key_ambassador.url}/runs/{run_id}/events", timeout=10)
    owner = requests.get(f"{api_key_ambassador.url}/runs/{run_id}/events",
                         headers={"x-api-key": ORDERS_KEY}, stream=True, timeout=30)

    assert_error_contract(bare, 401, "unauthorized")
    assert [e.event for _, e in sse_events(owner)][-1] == "run_finished"


def test_run_events_respect_flow_restrictions(api_key_ambassador, fresh_llm_sim):
    run_id = api_key_ambassador.run("secret order", headers={"x-api-key": ORDERS_KEY}).json()["run_id"]

    other = requests.get(f"{api_key_ambassador.url}/runs/{run_id}/events",
                         headers={"x-api-key": REPORTS_KEY}, timeout=30)

    assert other.status_code in (403, 404), other.text[:300]


def test_a_malformed_flows_claim_does_not_grant_every_flow(jwt_ambassador, fresh_llm_sim):
    resp = jwt_ambassador.run("jwt check", headers={
        "Authorization": f"Bearer {token(flows='reports-only')}"})

    assert resp.status_code in (401, 403), resp.text
    assert fresh_llm_sim.stats()["chat_completions_started"] == 0


def hs256_signed_with(key: bytes, payload: dict[str, Any]) -> str:
    """An HS256 JWT made by hand (PyJWT refuses to use a PEM key as an HMAC secret)."""
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + \
        b64(json.dumps(payload).encode())
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


def test_rs256_rejects_algorithm_confusion(engine, start_ambassador, fresh_llm_sim, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "jwt.pub").write_bytes(public_pem)
    amb = start_ambassador({"inbound_auth": {"mode": "jwt", "jwt": {
        "algorithm": "RS256", "public_key_file": str(tmp_path / "jwt.pub"),
        "audience": JWT_AUDIENCE}}}, engine.url)
    now = int(time.time())
    claims = {"sub": "orders-app", "aud": JWT_AUDIENCE, "flows": [FLOW_ID], "exp": now + 300}

    def call(jwt_token: str) -> requests.Response:
        return amb.run("rs256", headers={"Authorization": f"Bearer {jwt_token}"})

    valid = call(jwt.encode(claims, private, algorithm="RS256"))
    confused = call(hs256_signed_with(public_pem, claims))
    shared_secret = call(token(secret=JWT_SECRET))

    assert valid.status_code == 200, valid.text
    assert_error_contract(confused, 401, "unauthorized")
    assert_error_contract(shared_secret, 401, "unauthorized")
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


class RecordingEngine:
    """A stand-in upstream that records what the ambassador sends and answers like a run."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.seen.append({"path": self.path, "headers": dict(self.headers.items()),
                                      "body": json.loads(body or b"null")})
                answer = json.dumps({"run_id": "r1", "flow_id": FLOW_ID, "output": "ok"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingEngine:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def recording_ambassador(module_ambassadors):
    """``get(config)`` → (recorder, ambassador in front of it); one ambassador per config,
    the recorder's log emptied for each call."""
    started: dict[str, Ambassador] = {}
    with RecordingEngine() as upstream:
        def get(config: dict[str, Any]) -> tuple[RecordingEngine, Ambassador]:
            name = json.dumps(config, sort_keys=True)
            if name not in started:
                started[name] = module_ambassadors.start(config, upstream.url)
            upstream.seen.clear()
            return upstream, started[name]

        yield get


@pytest.mark.parametrize("config, headers, identity", [
    pytest.param(API_KEYS, {"Authorization": f"Bearer {ORDERS_KEY}"}, "orders-app", id="api-key-bearer"),
    pytest.param(API_KEYS, {"x-api-key": ORDERS_KEY}, "orders-app", id="api-key-header"),
    pytest.param(JWT, {"Authorization": "Bearer {jwt}"}, "orders-app", id="jwt"),
    pytest.param({}, {"Authorization": "Bearer caller-secret", "x-api-key": "caller-secret"}, None,
                 id="auth-none"),
])
def test_the_engine_never_receives_caller_credentials(recording_ambassador, config, headers,
                                                     identity):
    upstream, amb = recording_ambassador(config)
    jwt_token = token()
    headers = {k: v.replace("{jwt}", jwt_token) for k, v in headers.items()}
    headers["X-Flowgate-Identity"] = "root"  # a caller cannot choose its identity
    headers["Cookie"] = "session=caller-cookie"

    resp = amb.run("who am i", headers=headers)

    assert resp.status_code == 200, resp.text
    [seen] = upstream.seen
    got = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == f"/api/v1/run/{FLOW_ID}"
    assert seen["body"] == {"input_value": "who am i"}
    assert got["authorization"] == f"Bearer {ENGINE_KEY}"
    assert "x-api-key" not in got and "cookie" not in got
    assert got.get("x-flowgate-identity") == identity
    if identity is not None:
        assert got["x-flowgate-tenant"] == "shop"
    secrets = [v for k, v in headers.items() if k.lower() in ("authorization", "x-api-key")]
    for value in got.values():
        for secret in secrets:
            assert secret.removeprefix("Bearer ") not in value
    assert got["traceparent"].split("-")[1] == resp.headers["X-Trace-ID"]
    assert got["idempotency-key"]


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, names", [
    pytest.param("retry:\n  max_attempts: 0\n", ["retry.max_attempts"], id="out-of-range"),
    pytest.param("retry:\n  max_attemps: 3\n", ["retry.max_attemps", "unknown key"], id="unknown-key"),
    pytest.param("upstream:\n  timeouts: {per_try_s: 10, total_s: 5}\n", ["upstream.timeouts"],
                 id="per-try-over-total"),
    pytest.param("inbound_auth: {mode: jwt}\n", ["inbound_auth"], id="jwt-without-section"),
    pytest.param("inbound_auth: {mode: jwt, jwt: {secret: s3cret-s3cret}}\n",
                 ["inbound_auth.jwt.audience", "any other service"], id="jwt-without-audience"),
    pytest.param("inbound_auth: {mode: jwt, jwt: {algorithm: RS256, audience: a, "
                 "jwks_file: /nonexistent/jwks.json}}\n", ["inbound_auth.jwt.jwks_file"],
                 id="unusable-key-file"),
    pytest.param("filters: [trace, auth, cahce]\n", ["filters", "cahce"], id="unknown-filter"),
    pytest.param("retry: {max_attempts: 3\n", ["not valid YAML"], id="not-yaml"),
])
def test_invalid_config_stops_the_start_with_a_message_naming_the_key(tmp_path, text, names):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")

    code, stderr = run_cli(["ambassador", "--port", str(free_port()), "--config", str(path)])

    assert code not in (0, None), stderr
    for name in names:
        assert name in stderr, stderr
    assert "Traceback" not in stderr


def test_refuses_a_public_address_without_inbound_auth(tmp_path):
    path = tmp_path / "open.yaml"
    path.write_text("inbound_auth: {mode: none}\n", encoding="utf-8")

    # refused before it binds: nothing listens on 0.0.0.0 (a start would be killed at 20 s)
    code, stderr = run_cli(["ambassador", "--host", "0.0.0.0", "--port", str(free_port()),
                            "--config", str(path)])

    assert code not in (0, None), stderr
    assert "--force" in stderr and "0.0.0.0" in stderr


def test_config_hot_reload_and_a_bad_edit_keeps_the_last_good_config(engine, start_ambassador,
                                                                      fresh_llm_sim):
    amb = start_ambassador({}, engine.url)
    assert amb.run("reload").headers["X-Cache"] == "BYPASS"

    amb.write_config(yaml.safe_dump(merged(BASE_CONFIG, CACHED)))
    wait_for(lambda: amb.run("reload").headers["X-Cache"] != "BYPASS", 15, interval_s=0.2,
             what="the edited config is in force")
    assert amb.run("reload").headers["X-Cache"] == "HIT"
    assert amb.metric("flowgate_ambassador_config_reload_errors_total") == 0

    amb.write_config(yaml.safe_dump(merged(BASE_CONFIG, {**CACHED, "retry": {"max_attempts": 0}})))

    def rejected() -> bool:
        resp = amb.run("reload")
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Cache"] == "HIT"  # the last good config: caching on
        return amb.metric("flowgate_ambassador_config_reload_errors_total") >= 1

    wait_for(rejected, 15, interval_s=0.2, what="the bad edit is counted")
    verbose = requests.get(amb.url + "/readyz?verbose=1", timeout=5)
    assert verbose.status_code == 200
    assert "retry.max_attempts" in verbose.json()["config"]["last_reload_error"]
    assert amb.run("reload 2").headers["X-Cache"] == "MISS"
    assert amb.proc.alive()
