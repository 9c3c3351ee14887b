"""Chaos drill machinery: a whole Flowgate deployment of real processes, a small bounded load
generator, fault injectors and a tally of what every request got.

Used by ``tests/chaos`` (one drill per test) and by ``bench/soak.py``; nothing here needs
pytest. A deployment (:class:`Stack`) is what production looks like on one machine:

- an llm-sim (the tests' session simulator, or one started by :func:`start_llm_sim`);
- a ``flowgate engine`` with two gevent workers on PostgreSQL (a fresh schema of the shared
  server, :class:`PgSchema`) and a Redis of its own (:class:`RedisServer`, a throwaway
  ``redis-server`` on a free port, append-only with fsync on every write, so a kill -9 loses
  nothing it acknowledged);
- a ``flowgate ambassador`` in front of it (same Redis: cache and rate limits).

The engine holds two named keys (flow_engine/auth.py): ``admin`` for the drill's own flow
changes, ``ambassador`` (runner+proxy) for the ambassador.

The load (:class:`Load`) is a few threads, each with its own keep-alive session, sending a
bounded number of requests through the ambassador: runs, streamed runs and cache hits, each
run with an ``Idempotency-Key`` of its own and an input that carries a unique *tag*, so that
:class:`LlmCalls` (support/llm_calls.py) can count the chat completions llm-sim saw per
request. :class:`Outcomes` keeps what each request got, and :func:`verdict` turns it into
the four numbers a drill asserts: requests lost (no answer), LLM calls duplicated, 5xx
outside the contract (502/503/504, in the JSON error shape) and answers past the
ambassador's deadline.

No assertion here depends on timing: faults are injected when a number of requests have been
answered, and recovery is waited for with bounded loops.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import sseclient
import yaml

from support.llm_calls import LlmCalls
from support.procs import ServerProcess, free_port, listens_on, start_owned
from support.waiting import wait_until

ADMIN_SECRET = "chaos-admin-secret-0001"
PROXY_SECRET = "chaos-ambassador-secret-0001"
ENGINE_KEYS = f"admin:admin:{ADMIN_SECRET},ambassador:runner+proxy:{PROXY_SECRET}"
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
POSTGRES_URL = os.environ.get("FLOWGATE_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")

FLOW_ID = "chaos-chat"  # runs and streams: every input is new, so every run calls the LLM
CACHED_FLOW_ID = "chaos-cached"  # opted in to the ambassador's cache: few inputs, many hits
CONTRACT_5XX = frozenset({502, 503, 504})

# The ambassador's deadlines in every drill; clients wait CLIENT_TIMEOUT_S, longer than any.
TOTAL_S = 12.0
CLIENT_TIMEOUT_S = TOTAL_S + 13.0
# An answer later than the deadline plus this is a miss. Generous (a loaded 2-core machine
# may deschedule the client for seconds): a deadline not enforced at all shows up far beyond
# it — three tries of per_try_s (24 s) or no answer within CLIENT_TIMEOUT_S.
DEADLINE_SLACK_S = 5.0
# The drills' breaker backs off up to BREAKER_OPEN_S between failed trials. Once the engine is
# back (ready, its workers warm), a run must be sent through the ambassador successfully
# within RECOVERY_BOUND_S: a breaker that follows the engine's readiness lets traffic through
# within a probe interval or two, one that waits out its backoff (trials against an engine
# not yet ready, or a fixed open period) takes tens of seconds. The gap between the two is
# what makes the bound generous without letting that regression through.
BREAKER_OPEN_S = 60.0
RECOVERY_BOUND_S = 15.0
AMBASSADOR_CONFIG: dict[str, Any] = {
    "upstream": {"timeouts": {"connect_s": 0.5, "per_try_s": 8, "total_s": TOTAL_S,
                              "stream_first_byte_s": 8, "stream_idle_s": 8}},
    "retry": {"backoff_base_s": 0.05, "backoff_max_s": 0.3},
    # otherwise the breaker keeps its defaults: how fast it lets traffic through is under test
    "breaker": {"open_s": BREAKER_OPEN_S},
    "flows": {CACHED_FLOW_ID: {"cache": {"ttl_s": 600, "stale_if_error_s": 3600}}},
}


def new_tag(seq: int) -> str:
    return f"q{uuid.uuid4().hex[:8]}n{seq}"


def flow(flow_id: str, label: str) -> dict[str, Any]:
    """ChatInput → PromptTemplate ``[label] {question}`` → llm-sim → ChatOutput. llm-sim quotes
    the start of the prompt in its reply, so the output tells which definition ran."""
    return {
        "id": flow_id, "name": f"Chaos {flow_id}",
        "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "p", "type": "PromptTemplate", "params": {"template": f"[{label}] {{question}}"}},
            {"id": "llm", "type": "ChatModel",
             "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
            {"id": "out", "type": "ChatOutput"},
        ],
        "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
                  {"source": "llm", "target": "out"}],
    }


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy (support/waiting.py)."""
    return wait_until(check, what, timeout_s, interval_s)


def missing_tools() -> list[str]:
    """What a drill needs that this machine lacks (empty when it can run)."""
    problems = []
    if shutil.which("redis-server") is None:
        problems.append("redis-server is not installed (apt-get install redis-server)")
    try:
        import psycopg

        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except Exception as exc:
        problems.append(f"PostgreSQL is not reachable at {POSTGRES_URL} ({type(exc).__name__}); "
                        "start it or set FLOWGATE_TEST_POSTGRES_URL")
    return problems


# -- processes --------------------------------------------------------------------------------


class Sim:
    """llm-sim over HTTP: counters, recorded requests, settings."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.base_url = url + "/v1"

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/sim/stats")

    def reset(self) -> dict[str, Any]:
        return self._call("POST", "/sim/reset")

    def requests(self) -> list[dict[str, Any]]:
        return self._call("GET", "/sim/requests")

    def configure(self, **settings: Any) -> dict[str, Any]:
        return self._call("POST", "/sim/config", settings)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        resp = requests.request(method, self.url + path, json=body, timeout=10)
        resp.raise_for_status()
        return resp.json()


def start_llm_sim() -> ServerProcess:
    return start_owned(lambda port: ServerProcess(
        [sys.executable, "-m", "flowgate.llm_sim", "--port", str(port)],
        port=port, ready_path="/sim/stats", name="llm-sim"))


class RedisServer:
    """A throwaway redis-server on a free loopback port (never the shared one), restartable on
    the same port with the same data directory. Append-only with ``appendfsync always``: a
    kill -9 loses no write it acknowledged, as with a production Redis that persists."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir / "redis"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._port_given = port is not None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Started (again); the first start moves to another free port when the one chosen
        was taken meanwhile (another process bound it, or answers there), a restart never."""
        first = self.proc is None and not self._port_given
        for attempt in range(1, 6):
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_for(self.ping, 10, f"redis-server on port {self.port} answers PING")
                if listens_on(self.proc.pid, self.port):
                    return self
            except AssertionError:
                if not first or self.proc.poll() is None or attempt == 5:
                    self.kill()
                    raise
            self.kill()
            if not first or attempt == 5:
                raise AssertionError(f"port {self.port} is held by another process")
            self.port = free_port()
        raise AssertionError("unreachable")

    def ping(self) -> bool:
        import redis

        assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; clients see their connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        self.kill()


class PgSchema:
    """A fresh schema of the shared PostgreSQL for one deployment; its connections carry an
    ``application_name`` of their own, so a drill can terminate exactly those."""

    def __init__(self, admin_url: str = POSTGRES_URL) -> None:
        import psycopg
        from psycopg import sql

        self.admin_url = admin_url
        self.schema = f"flowgate_chaos_{uuid.uuid4().hex[:12]}"
        self.application_name = f"fg-{self.schema}"
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))

    @property
    def url(self) -> str:
        sep = "&" if "?" in self.admin_url else "?"
        return (f"{self.admin_url}{sep}options=-csearch_path%3D{self.schema}"
                f"&application_name={self.application_name}")

    def backends(self) -> int:
        return len(self._pids())

    def terminate_backends(self) -> int:
        """pg_terminate_backend on every connection of this deployment; how many it ended."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (self.application_name,)).fetchall()
        return sum(1 for (ok,) in rows if ok)

    def _pids(self) -> list[int]:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                (self.application_name,)).fetchall()
        return [pid for (pid,) in rows]

    def drop(self) -> None:
        import psycopg
        from psycopg import sql

        with contextlib.suppress(psycopg.Error):
            self.terminate_backends()
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(self.schema)))


def kill_group(proc: ServerProcess) -> None:
    """SIGKILL a server's whole process group (gunicorn master and workers) at once."""
    if proc.proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.proc.wait(10)


def group_rss_mb(pid: int) -> float:
    """Resident memory of every process in the session ``pid`` leads (master + workers)."""
    total_kb = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != pid:  # field 6 of stat: the session id
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return round(total_kb / 1024, 1)


class Stack:
    """llm-sim → engine (2 gevent workers, PostgreSQL, Redis) ← ambassador, all real
    processes. The engine can be killed and restarted on the same port; so can Redis."""

    def __init__(self, workdir: Path, sim: Sim, *, ambassador_config: dict[str, Any] | None = None,
                 engine_env: dict[str, str] | None = None,
                 ambassador_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.sim = sim
        self.ambassador_config = _merged(AMBASSADOR_CONFIG, ambassador_config or {})
        self.engine_env = engine_env or {}
        self.ambassador_env = ambassador_env or {}
        self.redis = RedisServer(workdir)
        self.pg: PgSchema | None = None
        self.engine_port = free_port()
        self.engine: ServerProcess | None = None
        self.ambassador: ServerProcess | None = None
        self._engines: list[ServerProcess] = []

    # -- lifecycle
    def start(self) -> Stack:
        try:
            self.redis.start()
            self.pg = PgSchema()
            self.start_engine()
            self.create_flows()
            self.start_ambassador()
            self.warm_up()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in [self.ambassador, *self._engines]:
            if proc is not None:
                kill_group(proc)
                proc.stop()
        self.redis.stop()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.drop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"

    @property
    def url(self) -> str:
        assert self.ambassador is not None
        return self.ambassador.url

    def start_engine(self) -> ServerProcess:
        """The engine: on a free port of its own the first time, on the same port after."""
        assert self.pg is not None

        def make(port: int) -> ServerProcess:
            assert self.pg is not None
            cmd = [sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)]
            proc = ServerProcess(cmd, port=port, ready_path="/readyz", name="engine",
                                 ready_timeout=40, cwd=self.workdir, stop_timeout=5,
                                 env={"FLOW_ENGINE_API_KEYS": ENGINE_KEYS,
                                      "DATABASE_URL": self.pg.url,
                                      "REDIS_URL": self.redis.url,
                                      "OPENAI_BASE_URL": self.sim.base_url,
                                      "FLOW_ENGINE_WORKERS": "2",
                                      "FLOW_ENGINE_GRACEFUL_TIMEOUT": "2",
                                      "FLOW_ENGINE_SSE_KEEPALIVE_S": "1",
                                      "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / "engine-metrics"),
                                      **self.engine_env})
            self._engines.append(proc)  # stopped at the end, whatever happens
            return proc

        proc = start_owned(make, self.engine_port if self.engine is not None else None)
        self.engine_port = proc.port
        self.engine = proc
        return proc

    def kill_engine(self) -> None:
        """kill -9 of the engine's master and both workers at once."""
        assert self.engine is not None
        kill_group(self.engine)

    def restart_engine(self) -> ServerProcess:
        """A new engine on the same port, store and Redis (as a supervisor would)."""
        if self.engine is not None and self.engine.alive():
            self.kill_engine()
        proc = self.start_engine()
        # a fresh worker imports the LLM client on its first run (seconds): not on the load
        self._warm_engine_workers()
        return proc

    def start_ambassador(self) -> ServerProcess:
        path = self.workdir / "ambassador.yaml"
        path.write_text(yaml.safe_dump(self.ambassador_config), encoding="utf-8")

        def make(port: int) -> ServerProcess:
            cmd = [sys.executable, "-m", "flowgate.cli", "ambassador", "--port", str(port)]
            self.ambassador = ServerProcess(
                cmd, port=port, ready_path="/readyz", name="ambassador", ready_timeout=30,
                cwd=self.workdir, stop_timeout=5,
                env={"AMBASSADOR_CONFIG": str(path),
                     "AMBASSADOR_UPSTREAM_URL": self.engine_url,
                     "AMBASSADOR_UPSTREAM_KEY": PROXY_SECRET,
                     "REDIS_URL": self.redis.url,
                     "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / "amb-metrics"),
                     **self.ambassador_env})
            return self.ambassador

        return start_owned(make)

    def create_flows(self) -> None:
        for flow_id in (FLOW_ID, CACHED_FLOW_ID):
            resp = requests.post(self.engine_url + "/api/v1/flows", json=flow(flow_id, "v1"),
                                 headers=ADMIN, timeout=10)
            assert resp.status_code in (201, 409), resp.text

    def _warm_engine_workers(self) -> None:
        """A few runs straight to the engine, so that both workers have imported the LLM
        client (each worker's first run takes seconds)."""
        def one(i: int) -> None:
            with contextlib.suppress(requests.RequestException):
                requests.post(f"{self.engine_url}/api/v1/run/{FLOW_ID}", headers=ADMIN,
                              json={"input_value": f"warm up {i}"}, timeout=30)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)

    def warm_up(self) -> None:
        self._warm_engine_workers()
        resp = requests.post(self.url + "/run-flow", json={"flow_id": FLOW_ID, "input": "warm"},
                             timeout=CLIENT_TIMEOUT_S)
        assert resp.status_code == 200, resp.text

    # -- checks
    def run_once(self, tag: str | None = None, timeout: float = CLIENT_TIMEOUT_S) -> requests.Response:
        tag = tag or new_tag(0)
        return requests.post(self.url + "/run-flow", json={"flow_id": FLOW_ID, "input": f"probe {tag}"},
                             headers={"Idempotency-Key": tag, "Connection": "close"}, timeout=timeout)

    def wait_recovered(self, timeout_s: float = 90.0) -> float:
        """Bounded: until a run through the ambassador answers 200; the seconds from the call
        until that run was sent (how long it then took is the machine's speed, not the
        ambassador's recovery)."""
        started = time.monotonic()
        seq = [0]
        sent = [started]

        def ok() -> bool:
            seq[0] += 1
            sent[0] = time.monotonic()
            try:
                return self.run_once(new_tag(90_000 + seq[0]), timeout=TOTAL_S + 2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ok, timeout_s, "a run through the ambassador succeeds again", interval_s=0.2)
        return sent[0] - started

    def rss_mb(self) -> dict[str, float]:
        out = {}
        for name, proc in (("engine", self.engine), ("ambassador", self.ambassador)):
            if proc is not None and proc.alive():
                assert proc.proc is not None
                out[name] = group_rss_mb(proc.proc.pid)
        if self.redis.alive():
            assert self.redis.proc is not None
            out["redis"] = group_rss_mb(self.redis.proc.pid)
        return out

    def logs(self, lines: int = 30) -> str:
        """The last ``lines`` lines of each process's output other than INFO (access) lines."""
        parts = []
        for proc in [*self._engines, self.ambassador]:
            if proc is not None and proc.log_path is not None and proc.log_path.exists():
                kept = [ln for ln in proc.log_path.read_text(errors="replace").splitlines()
                        if '"level": "info"' not in ln]
                parts.append(f"--- {proc.name} :{proc.port} ---\n" + "\n".join(kept[-lines:]))
        return "\n".join(parts)


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


# -- outcomes ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one request got. ``status`` None: no answer at all (a lost request)."""

    kind: str  # run | stream | cached | resume | health
    tag: str
    started: float
    ended: float = 0.0
    status: int | None = None
    error: str | None = None  # the client's exception, or what is wrong with the answer
    code: str | None = None  # the error contract's code
    version: int | None = None
    run_id: str | None = None
    first_byte_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


class Outcomes:
    """A thread-safe tally of every request's outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.items.append(outcome)

    def all(self) -> list[Outcome]:
        with self._lock:
            return list(self.items)

    def done(self) -> int:
        """Requests that ended: answered, or given up on (lost)."""
        with self._lock:
            return len(self.items)


def _error_code(resp: requests.Response) -> tuple[str | None, str | None]:
    """(code, problem): the error contract's code, and what breaks the contract, if anything."""
    try:
        body = resp.json()
    except ValueError:
        return None, f"not JSON: {resp.text[:120]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return None, f"not the error contract: {str(body)[:120]}"
    return error["code"], None


def sse_events(resp: requests.Response) -> Iterator[tuple[str | None, str, str]]:
    """(id, event, data) of an SSE response as its bytes arrive."""
    for event in sseclient.SSEClient(resp.iter_content(chunk_size=None)).events():
        yield event.id, event.event, event.data


def check_stream(events: list[tuple[str | None, str, str]]) -> tuple[str | None, dict[str, Any]]:
    """What is wrong with a whole run's event stream (None: nothing), and what it says."""
    info: dict[str, Any] = {"events": len(events)}
    if not events:
        return "no event", info
    ids = [e[0] for e in events if e[0] is not None]
    if ids != [str(i) for i in range(1, len(ids) + 1)]:
        return f"event ids not contiguous from 1: {ids[:50]}", info
    last = events[-1]
    if last[1] not in ("run_finished", "error"):
        return f"stream ended without run_finished or error (last: {last[1]})", info
    if last[1] == "run_finished" and last[0] is None:
        return (f"events {len(ids) + 1}.. are missing: after event {len(ids)} came a run_finished "
                "without an id (the engine's summary of a run whose events it does not have)"), info
    try:
        datas = [json.loads(e[2]) for e in events]
    except ValueError as exc:
        return f"event data not JSON: {exc}", info
    if events[0][1] == "run_started":
        info["version"] = datas[0].get("version")
        info["run_id"] = datas[0].get("run_id")
    if last[1] == "run_finished":
        info["final_version"] = datas[-1].get("version")
        info["output"] = datas[-1].get("output")
        tokens = "".join(d.get("text", "") for e, d in zip(events, datas, strict=True)
                         if e[1] == "token")
        if tokens != datas[-1].get("output"):
            return "the tokens do not add up to the output", info
        if "version" in info and info["version"] != info["final_version"]:
            return (f"started on version {info['version']}, finished on "
                    f"{info['final_version']}"), info
        problem = version_mismatch(info["final_version"], info["output"])
        if problem:
            return problem, info
    else:
        info["code"] = datas[-1].get("code")
    return None, info


# -- load -------------------------------------------------------------------------------------


class Load:
    """A bounded, steady load through the ambassador: ``threads`` senders, each with its own
    keep-alive session, sending request *i* no earlier than ``i / rate_per_s`` after the
    start (a steady rate whether answers are fast errors or slow runs; slower when all
    senders are busy), at most ``max_requests`` in all.

    ``mix`` weighs the kinds of request: ``run`` (POST /run-flow, a new input), ``stream``
    (the same with ``"stream": true``, read to its end), ``ws`` (the same over WS
    /ws/run-flow, a connection each) and ``cached`` (one of a few inputs of the cached
    flow). Every run carries an ``Idempotency-Key`` of its own. The load stops
    by itself at ``max_requests``, or earlier with :meth:`finish_after`."""

    def __init__(self, stack: Stack, outcomes: Outcomes, *, threads: int = 4, max_requests: int = 150,
                 rate_per_s: float = 12.0, mix: dict[str, float] | None = None, seed: int = 7) -> None:
        self.stack, self.outcomes = stack, outcomes
        self.threads_n, self.max_requests, self.rate_per_s = threads, max_requests, rate_per_s
        self.mix = mix or {"run": 0.7, "stream": 0.2, "cached": 0.1}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._issued = 0
        self._limit = max_requests
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0

    # control
    def start(self) -> Load:
        self._t0 = time.monotonic()
        self._spawn()
        return self

    def _spawn(self) -> None:
        self._threads = [threading.Thread(target=self._worker, name=f"load-{i}", daemon=True)
                         for i in range(self.threads_n)]
        for t in self._threads:
            t.start()

    def issued(self) -> int:
        with self._lock:
            return self._issued

    def wait_done(self, n: int, timeout_s: float = 60.0) -> None:
        """Until ``n`` requests have ended (or the load has)."""
        wait_for(lambda: self.outcomes.done() >= min(n, self.max_requests) or not self.running(),
                 timeout_s, f"{n} requests of the load ended", interval_s=0.05)

    def finish_after(self, n: int) -> int:
        """Send exactly ``n`` more requests (even past ``max_requests``, at the same rate from
        now), then stop; the sequence number of the first of them."""
        with self._lock:
            first = self._issued
            self._limit = self._issued + n
            if n and not self.running():  # the senders stopped at max_requests: new ones
                self._t0 = time.monotonic() - first / self.rate_per_s
                self._spawn()
            return first

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not self.running(), f"the load did not finish within {timeout_s:g} s"

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:  # the drill failed: stop sending, let what is out finish
            with self._lock:
                self._limit = min(self._limit, self._issued)
        self.join()

    # sending
    def _next(self) -> tuple[int, str, float] | None:
        with self._lock:
            if self._issued >= self._limit:
                return None
            seq = self._issued
            self._issued += 1
            kinds, weights = zip(*self.mix.items(), strict=True)
            return seq, self._rng.choices(kinds, weights)[0], self._t0 + seq / self.rate_per_s

    def _worker(self) -> None:
        session = requests.Session()
        try:
            while (job := self._next()) is not None:
                seq, kind, not_before = job
                time.sleep(max(0.0, not_before - time.monotonic()))
                outcome = send(session, self.stack.url, kind, seq)
                outcome.detail["seq"] = seq
                self.outcomes.add(outcome)
        finally:
            session.close()


def send(session: requests.Session, url: str, kind: str, seq: int) -> Outcome:
    """One request of the load; never raises."""
    if kind == "ws":
        return send_ws(url, seq)
    tag = new_tag(seq)
    flow_id = CACHED_FLOW_ID if kind == "cached" else FLOW_ID
    text = f"faq {seq % 4}" if kind == "cached" else f"ask {tag}"
    body: dict[str, Any] = {"flow_id": flow_id, "input": text}
    headers = {"Idempotency-Key": tag}
    if kind == "stream":
        body |= {"stream": True, "on_disconnect": "continue"}
    outcome = Outcome(kind, tag, time.monotonic())
    try:
        resp = session.post(url + "/run-flow", json=body, headers=headers, stream=kind == "stream",
                            timeout=(5, CLIENT_TIMEOUT_S))
        outcome.first_byte_s = time.monotonic() - outcome.started
        with resp:
            _read_answer(resp, outcome)
    except requests.RequestException as exc:
        outcome.status, outcome.error = None, f"{type(exc).__name__}: {exc}"[:300]
    outcome.ended = time.monotonic()
    return outcome


def send_ws(url: str, seq: int) -> Outcome:
    """A run over the ambassador's WebSocket (a connection of its own), read to its last
    event and checked like a stream; never raises."""
    import websocket

    tag = new_tag(seq)
    outcome = Outcome("ws", tag, time.monotonic())
    events: list[tuple[str | None, str, str]] = []
    try:
        ws = websocket.create_connection(url.replace("http", "ws", 1) + "/ws/run-flow",
                                         timeout=CLIENT_TIMEOUT_S)
        try:
            ws.send(json.dumps({"type": "run", "flow_id": FLOW_ID, "input": f"ask {tag}",
                                "idempotency_key": tag}))
            outcome.first_byte_s = None
            while True:
                message = json.loads(ws.recv())
                if outcome.first_byte_s is None:
                    outcome.first_byte_s = time.monotonic() - outcome.started
                kind, seq_no = message.pop("type"), message.pop("seq", None)
                if kind == "error" and seq_no is None and not events:  # refused outright
                    outcome.status, outcome.code = 200, message.get("code")
                    outcome.error = f"error event {message.get('code')}"
                    break
                events.append((None if seq_no is None else str(seq_no), kind,
                               json.dumps(message)))
                if kind in ("run_finished", "error"):
                    break
        finally:
            ws.close()
    except (OSError, ValueError, websocket.WebSocketException) as exc:
        outcome.status, outcome.error = None, f"{type(exc).__name__}: {exc}"[:300]
        outcome.ended = time.monotonic()
        return outcome
    if outcome.status is None:
        outcome.status = 200
        _read_stream(events, outcome)
    outcome.ended = time.monotonic()
    return outcome


def _read_stream(events: list[tuple[str | None, str, str]], outcome: Outcome) -> str | None:
    """Fill ``outcome`` from a whole run's events (SSE or WebSocket); what is wrong with
    them (None: nothing). An error event is an answered failure, not a problem."""
    problem, info = check_stream(events)
    outcome.detail.update(info)
    outcome.version = info.get("final_version", info.get("version"))
    outcome.run_id = info.get("run_id")
    if problem:
        outcome.error = problem
    elif info.get("code"):
        outcome.code, outcome.error = info["code"], f"error event {info['code']}"
    return problem


def _read_answer(resp: requests.Response, outcome: Outcome) -> None:
    outcome.status = resp.status_code
    outcome.detail["cache"] = resp.headers.get("X-Cache")
    outcome.detail["attempts"] = resp.headers.get("X-Upstream-Attempts")
    if resp.status_code != 200:
        outcome.code, problem = _error_code(resp)
        if problem:
            outcome.error = problem
        return
    if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = list(sse_events(resp))
        if _read_stream(events, outcome) and events and events[-1][1] not in ("run_finished",
                                                                               "error"):
            outcome.status = None  # cut off with no terminal event: the caller was left hanging
        return
    try:
        data = resp.json()
    except ValueError:
        outcome.error = f"200 without JSON: {resp.text[:120]!r}"
        return
    outcome.version, outcome.run_id = data.get("version"), data.get("run_id")
    outcome.detail["output"] = data.get("output")
    outcome.error = version_mismatch(outcome.version, data.get("output"))


_LABEL_RE = re.compile(r'^\[simulated reply\] you said: "\[v(\d+)\]')


def version_mismatch(version: Any, output: Any) -> str | None:
    """The flows here label their prompt ``[vN]`` and llm-sim quotes it: an answer saying
    version N must hold the output of version N's definition."""
    match = _LABEL_RE.match(output) if isinstance(output, str) else None
    if match and int(match.group(1)) != version:
        return f"the answer says version {version} but version {match.group(1)}'s definition ran"
    return None


# -- streams dropped and resumed ---------------------------------------------------------------


def dropped_and_resumed(url: str, tag: str, drops_after: list[int], *,
                        resume_timeout_s: float = 30.0, gate: threading.Event | None = None,
                        dropped: Callable[[], None] | None = None) -> Outcome:
    """Start a streamed run through the ambassador, drop the connection after each count in
    ``drops_after`` (cumulative events), and resume it each time with ``Last-Event-ID`` via
    ``GET /runs/{id}/events``. Resumes answered 503 (the contract's "try again") are retried
    within ``resume_timeout_s``. With ``gate``, the first resume waits (bounded) until the
    gate is set, after calling ``dropped``. The outcome holds every event seen, in order."""
    outcome = Outcome("resume", tag, time.monotonic())
    seen: list[tuple[str | None, str, str]] = []
    resumes = 0
    body = {"flow_id": FLOW_ID, "input": f"ask {tag}", "stream": True, "on_disconnect": "continue"}
    try:
        resp = requests.post(url + "/run-flow", json=body, stream=True,
                             headers={"Idempotency-Key": tag}, timeout=(5, CLIENT_TIMEOUT_S))
        outcome.status = resp.status_code
        if resp.status_code != 200:
            outcome.code, outcome.error = _error_code(resp)[0], f"run answered {resp.status_code}"
            resp.close()
            outcome.ended = time.monotonic()
            return outcome
        run_id = resp.headers.get("X-Run-ID")
        outcome.run_id = run_id
        targets = list(drops_after)
        cuts: list[int] = []  # streams the server ended without a terminal event: after which id
        while True:
            target = targets[0] if targets else None
            finished = dropped_here = False
            with resp:
                for event in sse_events(resp):
                    if event[0] is not None or event[1] in ("run_finished", "error"):
                        seen.append(event)
                    if event[1] in ("run_finished", "error"):
                        finished = True
                        break
                    if target is not None and len(seen) >= target:
                        dropped_here = True
                        break
            if finished:
                break
            if dropped_here:
                targets.pop(0)
            else:  # the server ended the stream with no terminal event: resume it anyway
                cuts.append(_last_id(seen))
                if len(cuts) > 5:
                    break
            outcome.detail["cuts"] = cuts
            if gate is not None and resumes == 0:
                if dropped is not None:
                    dropped()
                if not gate.wait(resume_timeout_s * 3):
                    raise AssertionError("the gate of the first resume never opened")
            resp = _resume(url, run_id, _last_id(seen), resume_timeout_s)
            resumes += 1
            if resp.status_code != 200:
                outcome.status, outcome.code = resp.status_code, _error_code(resp)[0]
                outcome.error = f"resume answered {resp.status_code}: {resp.text[:200]}"
                resp.close()
                break
    except requests.RequestException as exc:
        outcome.status, outcome.error = None, f"{type(exc).__name__}: {exc}"[:300]
    outcome.ended = time.monotonic()
    outcome.detail["resumes"] = resumes
    outcome.detail["ids"] = [e[0] for e in seen]
    outcome.detail["trace"] = [f"{e[0]}:{e[1]}" for e in seen]
    if outcome.error is None:
        problem, info = check_stream(seen)
        outcome.detail.update(info)
        outcome.version = info.get("final_version")
        if problem:
            outcome.error = problem
        elif outcome.detail.get("cuts"):
            outcome.error = (f"the server ended the stream without run_finished or error after "
                             f"event(s) {outcome.detail['cuts']} (the client had not dropped it)")
    return outcome


def _last_id(seen: list[tuple[str | None, str, str]]) -> int:
    ids = [int(e[0]) for e in seen if e[0] is not None and e[0].isdigit()]
    return ids[-1] if ids else 0


def _resume(url: str, run_id: str | None, last: int, timeout_s: float) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        resp = requests.get(f"{url}/runs/{run_id}/events", headers={"Last-Event-ID": str(last)},
                            stream=True, timeout=(5, CLIENT_TIMEOUT_S))
        if resp.status_code != 503 or time.monotonic() > deadline:
            return resp
        resp.close()
        time.sleep(0.2)


# -- verdict ----------------------------------------------------------------------------------


@dataclass
class Verdict:
    requests: int
    by_status: dict[str, int]
    lost: list[Outcome]
    bad_5xx: list[Outcome]
    late: list[Outcome]
    broken: list[Outcome]  # answered, but the answer breaks its contract (ids, shape)
    failed_after_recovery: list[Outcome]
    duplicated: int
    repeated: dict[str, int]
    llm_calls: int
    llm_overflowed: bool
    successes: int
    p50_s: float
    p99_s: float
    recoveries: list[float] = field(default_factory=list)
    retried: int = 0
    sent_after_recovery: int = 0

    def numbers(self) -> dict[str, Any]:
        return {"requests": self.requests, "successes": self.successes, "lost": len(self.lost),
                "duplicated": self.duplicated, "bad_5xx": len(self.bad_5xx),
                "late": len(self.late), "broken": len(self.broken),
                "failed_after_recovery": len(self.failed_after_recovery),
                "llm_calls": self.llm_calls, "by_status": self.by_status,
                "recovery_s": [round(r, 1) for r in self.recoveries], "retried": self.retried,
                "p50_ms": round(self.p50_s * 1000, 1), "p99_ms": round(self.p99_s * 1000, 1)}

    def problems(self) -> list[str]:
        out = []

        def show(items: list[Outcome]) -> str:
            return "; ".join(f"{o.kind} {o.tag} status={o.status} code={o.code} "
                             f"{o.seconds:.1f}s {o.error or ''}".strip() for o in items[:6])

        if self.lost:
            out.append(f"{len(self.lost)} lost (no answer): {show(self.lost)}")
        if self.duplicated:
            out.append(f"{self.duplicated} duplicated LLM calls: {dict(list(self.repeated.items())[:6])}")
        if self.llm_overflowed:
            out.append("llm-sim's request log overflowed between reads: LLM calls not all counted")
        if self.bad_5xx:
            out.append(f"{len(self.bad_5xx)} 5xx outside the contract: {show(self.bad_5xx)}")
        if self.late:
            out.append(f"{len(self.late)} answers past the {TOTAL_S:g} s deadline: {show(self.late)}")
        if self.broken:
            out.append(f"{len(self.broken)} answers that break their contract: {show(self.broken)}")
        slow = [round(r, 1) for r in self.recoveries if r > RECOVERY_BOUND_S]
        if slow:
            out.append(f"runs went through the ambassador again only {slow} s after the engine "
                       f"was back (bound: {RECOVERY_BOUND_S:g} s)")
        if self.failed_after_recovery:
            out.append(f"{len(self.failed_after_recovery)} failures after the fault was healed "
                       f"and recovery seen: {show(self.failed_after_recovery)}")
        return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def verdict(outcomes: list[Outcome], calls: LlmCalls | None, *, recovered_from_seq: int | None = None,
            recoveries: list[float] | None = None, deadline_s: float = TOTAL_S) -> Verdict:
    """The drill's numbers. ``recovered_from_seq``: load requests from this sequence number on
    were sent after the fault was healed and recovery seen; each must succeed.
    ``recoveries``: how long, each time, runs took to go through again once the fault was
    healed (:meth:`Stack.wait_recovered`); each must be within RECOVERY_BOUND_S."""
    lost = [o for o in outcomes if o.status is None]
    bad = [o for o in outcomes if o.status is not None and o.status >= 500 and (
        o.status not in CONTRACT_5XX or (o.error is not None and o.error.startswith("not ")))]
    late = []
    for o in outcomes:
        if o.status is None or o.kind in ("resume",):
            continue
        took = o.first_byte_s if o.kind == "stream" and o.status == 200 else o.seconds
        if took is not None and took > deadline_s + DEADLINE_SLACK_S:
            late.append(o)
    broken = [o for o in outcomes if o.status == 200 and o.error is not None
              and not o.error.startswith("error event")]
    after = [o for o in outcomes if recovered_from_seq is not None
             and o.detail.get("seq", -1) >= recovered_from_seq and not o.ok]
    sent_after = sum(1 for o in outcomes if recovered_from_seq is not None
                     and o.detail.get("seq", -1) >= recovered_from_seq)
    statuses = Counter(str(o.status) for o in outcomes)
    times = [o.seconds for o in outcomes if o.status is not None and o.kind != "resume"]
    return Verdict(
        requests=len(outcomes), by_status=dict(sorted(statuses.items())), lost=lost, bad_5xx=bad,
        late=late, broken=broken, failed_after_recovery=after,
        duplicated=calls.duplicated() if calls else 0,
        repeated=calls.repeated() if calls else {}, llm_calls=calls.calls() if calls else 0,
        llm_overflowed=calls.overflowed if calls else False,
        successes=sum(1 for o in outcomes if o.ok), p50_s=_percentile(times, 0.5),
        p99_s=_percentile(times, 0.99), recoveries=list(recoveries or []), sent_after_recovery=sent_after,
        retried=sum(1 for o in outcomes if (o.detail.get("attempts") or "1") not in ("1", None)))


# -- slow loris -------------------------------------------------------------------------------


class SlowLoris:
    """``n`` connections that each send a request a byte or so at a time, never finishing
    within the drill: most stop in the middle of their headers, some declare a body (some
    larger than the ambassador accepts) and trickle it. One thread drips on every socket every
    ``drip_s``; :meth:`stop` closes them all. It records which connections the server closed
    and what each answered, if anything."""

    def __init__(self, port: int, n: int = 200, *, drip_s: float = 0.5, body_limit: int = 1_048_576) -> None:
        self.port, self.n, self.drip_s, self.body_limit = port, n, drip_s, body_limit
        self.socks: list[socket.socket] = []
        self.kinds: list[str] = []
        self.pending: list[bytes] = []
        self.closed_by_server: Counter[str] = Counter()
        self.answers: dict[int, bytes] = {}
        self.answered_at: dict[int, float] = {}
        self.opened_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _script(self, i: int) -> tuple[str, bytes]:
        if i % 8 == 0:  # a body larger than max_body_bytes, declared up front
            size = self.body_limit * 4
            return "oversize_body", (f"POST /run-flow HTTP/1.1\r\nHost: localhost\r\n"
                                     "Content-Type: application/json"
                                     f"\r\nContent-Length: {size}\r\n\r\n").encode() + b"{" + b" " * 4000
        if i % 8 == 1:  # a small body, trickled
            return "slow_body", (b"POST /run-flow HTTP/1.1\r\nHost: localhost\r\n"
                                 b"Content-Type: application/json"
                                 b"\r\nContent-Length: 4000\r\n\r\n" + b" " * 3999)
        return "slow_headers", (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                + b"".join(b"X-Pad-%d: %s\r\n" % (k, b"a" * 20) for k in range(200)))

    def start(self) -> SlowLoris:
        self.opened_at = time.monotonic()
        for i in range(self.n):
            kind, script = self._script(i)
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.setblocking(False)
            self.socks.append(s)
            self.kinds.append(kind)
            head_end = script.find(b"\r\n\r\n")
            first = script[:head_end + 4] if kind != "slow_headers" else script[:20]
            with contextlib.suppress(OSError):
                s.send(first)
            self.pending.append(script[len(first):])
        self._thread = threading.Thread(target=self._drip, name="slow-loris", daemon=True)
        self._thread.start()
        return self

    def _drip(self) -> None:
        while not self._stop.wait(self.drip_s):
            self._read_answers()
            for i, s in enumerate(self.socks):
                if i in self.answers or s.fileno() < 0 or not self.pending[i]:
                    continue
                try:
                    sent = s.send(self.pending[i][:1])
                    self.pending[i] = self.pending[i][sent:]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._closed(i)

    def _closed(self, i: int) -> None:
        with self._lock:
            if i not in self.answers:
                self.answers[i] = b""
                self.answered_at[i] = time.monotonic()
                self.closed_by_server[self.kinds[i]] += 1
        with contextlib.suppress(OSError):
            self.socks[i].close()

    def _read_answers(self) -> None:
        live = [s for i, s in enumerate(self.socks) if i not in self.answers and s.fileno() >= 0]
        if not live:
            return
        readable, _, _ = select.select(live, [], [], 0)
        for s in readable:
            i = self.socks.index(s)
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            with self._lock:
                if data:
                    self.answers[i] = data
                    self.answered_at[i] = time.monotonic()
                else:
                    self.answers[i] = b""
                    self.answered_at[i] = time.monotonic()
                    self.closed_by_server[self.kinds[i]] += 1

    def open_count(self) -> int:
        with self._lock:
            return sum(1 for i in range(len(self.socks)) if i not in self.answers)

    def status_of(self, kind: str) -> Counter[str]:
        """Per kind, what the server did: the status line it answered, or 'closed', or 'open'."""
        out: Counter[str] = Counter()
        with self._lock:
            for i, k in enumerate(self.kinds):
                if k != kind:
                    continue
                data = self.answers.get(i)
                if data is None:
                    out["open"] += 1
                elif not data:
                    out["closed"] += 1
                else:
                    out[data.split(b"\r\n", 1)[0].decode(errors="replace")] += 1
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


# -- flows: publishes, rollbacks, versions ------------------------------------------------------


def admin(method: str, url: str, body: Any = None, timeout: float = 10) -> requests.Response:
    return requests.request(method, url, json=body, headers=ADMIN, timeout=timeout)


class Timeline:
    """Which versions of a flow may serve a run, over time.

    Each acknowledged change (publish, rollback, routing) is recorded with the moment it was
    sent and the moment it was acknowledged, and the flow's ``live_version`` and canary after
    it. A state may serve from the moment its change was sent until the next change was
    acknowledged plus ``slack_s`` (workers trust their copy of the live pointer for
    ``FLOW_ENGINE_FLOW_CACHE_TTL_S``). A run sent at ``t0`` and answered at ``t1`` started
    on some version that may serve at a moment within that span."""

    def __init__(self, live: int = 1, canary: int | None = None, *, slack_s: float = 1.5) -> None:
        self.slack_s = slack_s
        self.states: list[tuple[float, set[int]]] = [(float("-inf"), _serving(live, canary))]
        self.acked: list[float] = []

    def record(self, sent: float, acked: float, flow_json: dict[str, Any]) -> None:
        canary = ((flow_json.get("routing") or {}).get("canary") or {}).get("version")
        self.states.append((sent, _serving(flow_json["live_version"], canary)))
        self.acked.append(acked)

    def allowed(self, t0: float, t1: float) -> set[int]:
        out: set[int] = set()
        for k, (start, versions) in enumerate(self.states):
            end = self.acked[k] + self.slack_s if k < len(self.acked) else float("inf")
            if start <= t1 and end >= t0:
                out |= versions
        return out


def _serving(live: int | None, canary: int | None) -> set[int]:
    return {v for v in (live, canary) if v is not None}


class Publisher:
    """Adds a version and publishes it, again and again, until the engine stops answering:
    what it was told (acknowledged) and what it had sent when the answers stopped."""

    def __init__(self, engine_url: str, flow_id: str) -> None:
        self.base = f"{engine_url}/api/v1/flows/{flow_id}"
        self.flow_id = flow_id
        self.created: dict[int, str] = {}  # acknowledged versions: their label
        self.published: list[int] = []  # acknowledged publishes, in order
        self.in_flight: int | None = None  # the publish sent when the answers stopped
        self.stopped_by: str | None = None

    def run(self, limit: int = 200) -> None:
        for i in range(limit):
            label = f"v{i + 2}"
            try:
                created = admin("PUT", self.base, flow(self.flow_id, label), timeout=10)
            except requests.RequestException as exc:
                self.stopped_by = f"PUT: {type(exc).__name__}"
                return
            if created.status_code != 201:
                self.stopped_by = f"PUT answered {created.status_code}"
                return
            number = created.json()["version"]
            self.created[number] = label
            self.in_flight = number
            try:
                published = admin("POST", self.base + "/publish", {"version": number}, timeout=10)
            except requests.RequestException as exc:
                self.stopped_by = f"publish: {type(exc).__name__}"
                return
            if published.status_code != 200:
                self.stopped_by = f"publish answered {published.status_code}"
                return
            self.in_flight = None
            self.published.append(number)

    def acked(self) -> int:
        return len(self.published)


def store_inconsistencies(publishers: list[Publisher]) -> list[str]:
    """What is wrong with the flows the publishers changed, read back from the engine: versions
    not contiguous from 1, an acknowledged version missing or not the definition sent, a live
    version that is neither the last acknowledged publish nor the one in flight."""
    inconsistent: list[str] = []
    for p in publishers:
        listed = admin("GET", f"{p.base}/versions")
        if listed.status_code != 200:
            inconsistent.append(f"{p.flow_id}: GET versions answered {listed.status_code}")
            continue
        body = listed.json()
        numbers = [v["version"] for v in body["versions"]]
        if sorted(numbers) != list(range(1, len(numbers) + 1)):
            inconsistent.append(f"{p.flow_id}: versions not contiguous: {numbers}")
        for number, label in p.created.items():
            got = admin("GET", f"{p.base}/versions/{number}")
            template = got.json().get("definition", {}).get("nodes", [{}, {}])[1].get(
                "params", {}).get("template", "") if got.status_code == 200 else ""
            if not template.startswith(f"[{label}]"):
                inconsistent.append(f"{p.flow_id}: acknowledged version {number} ({label}) is "
                                    f"{got.status_code} {template[:30]!r}")
        live = body["live_version"]
        allowed = {p.published[-1] if p.published else 1, p.in_flight} - {None}
        if live not in numbers or live not in allowed:
            inconsistent.append(f"{p.flow_id}: live version {live}; acknowledged publishes "
                                f"{p.published}, in flight {p.in_flight}, versions {numbers}")
    return inconsistent
