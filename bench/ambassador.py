"""Ambassador overhead: the 5-node echo flow straight to the engine, through the ambassador
(no cache, and cache hits) and through a reference proxy, side by side in one run; then
many concurrent slow runs through the ambassador.

    .venv/bin/python bench/ambassador.py [--rounds 5] [--per-round 200] [--seconds 4]
        [--wrk-rounds 2] [--slow 200] [--reference auto|haproxy|nginx|none]
        [--install-reference] [--otel off|on]

One engine (FLOW_ENGINE_WORKERS=2, SQLite in a temp dir) serves every path:

(a) direct: ``POST /api/v1/run/bench-rag`` on the engine (the flow of engine_core.py); also
    "direct + Idempotency-Key", a fresh key per request, because the ambassador's retry
    filter adds one to every run, and with a key the engine inserts the run record before
    the run and updates it after, instead of one write after the response;
(b) ambassador, cache miss: ``POST /run-flow`` for ``bench-rag``, which is not opted in to
    caching (``X-Cache: BYPASS``); default filter chain, inbound auth ``none``;
(c) ambassador, cache hits: the same flow stored as ``bench-rag-cached``, opted in with
    ``flows.bench-rag-cached.cache``, the same input every time (``X-Cache: HIT``);
(d) the reference proxy: haproxy (one thread) or nginx (one worker), whichever is
    installed, proxying to the engine with keep-alive on both sides. Neither installed:
    skipped, unless ``--install-reference`` (then ``apt-get install -y haproxy``).
(e) the floor: bench/proxy_floor.py, a bare WSGI proxy served like the ambassador (gunicorn,
    one gevent worker) with the ambassador's HTTP client and nothing else (no Flask, filters,
    metrics or logs): what the stack itself costs. Ambassador − floor is what its features
    cost.

Concurrency 1: interleaved rounds on keep-alive connections (p50/p99; CPU per request of the
proxy and of the engine, read around each batch). Concurrency 16: wrk,
``--wrk-rounds`` rounds of ``--seconds`` per path (direct with a fresh Idempotency-Key per
request among them: what the claim costs the engine under load), alternating order (requests/s, latency,
and CPU ms per request of the proxy and of the engine, read from /proc/<pid>/stat of each
gunicorn master and its workers before and after). Then ``--slow`` requests at once, each a
run of ChatInput → ChatModel(openai) → ChatOutput against llm-sim with ttft 1 s, straight to
the engine (reference: without and with a fresh Idempotency-Key each) and through the
ambassador; every one must succeed; the ambassador's RSS is sampled during the test.

``--otel on`` adds an engine and an ambassador in front of it that export every span
(sampling 100 %) over OTLP/HTTP to a receiver in this process (bench/tracing.py's): "direct,
export on" and "ambassador, export on" take their turns at c1 and c16 with the other paths,
whose servers export nothing, and the on/off ratios are printed side by side; the JSON gains
``otel_*`` keys (every other key is as without the option).

Targets: ambassador − floor ≤ 0.3 ms p50 at c1 and ≥ 85 % of the floor's requests/s at
c16 (the floor measured in the same run); cache-hit p50 below the direct p50; all slow
requests succeed (and, as before, added p50 at c1 ≤ 0.7 ms, ≥ 60 % of direct at c16). Last
line: one JSON object (``ambassador_over_floor_p50_c1_ms``,
``throughput_ratio_vs_floor_c16``, ``added_p50_c1_ms``, ``cache_hit_p50_ms``,
``throughput_ratio_c16``, ``slow_ok``, ``slow_failed``, …).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import (
    FRESH,
    Client,
    calibration_ms,
    children,
    cpu_seconds,
    free_port,
    median_of_rounds,
    pct,
    process_tree,
    rss_mb,
    server,
    timed_ms,
    wrk,
)
from engine_core import FLOW, QUESTION
from tracing import Receiver, export_env

KEY = "bench-key"
CACHED_FLOW = {**FLOW, "id": "bench-rag-cached", "name": "bench cached"}
SLOW_FLOW = {
    "id": "bench-slow", "name": "bench slow",
    "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "llm", "type": "ChatModel",
         "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
        {"id": "out", "type": "ChatOutput"},
    ],
    "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}],
}
SIM_TTFT_S = 1.0
# issue #14 restated the targets against the floor (what a gevent WSGI proxy with the same
# HTTP client costs on this machine): the ambassador's features add ≤ 0.3 ms at c1 and keep
# ≥ 85 % of the floor's throughput at c16; the older absolute ones are still printed
TARGETS = {"added_p50_c1_ms": 0.7, "throughput_ratio_c16": 0.6,
           "over_floor_p50_c1_ms": 0.3, "throughput_ratio_vs_floor_c16": 0.85}
FLOOR = "floor: bare gevent WSGI proxy"
OTEL_DIRECT, OTEL_AMB = "direct, export on", "ambassador, export on"


class Caller(Client):
    """One c1 path: a keep-alive connection (as ``Client``) sending one fixed request, with
    the answer checked (status, ``X-Cache``) and the ambassador's own overhead header kept."""

    def __init__(self, name: str, port: int, path: str, body: dict, *,
                 headers: dict[str, str] | None = None, x_cache: tuple[str, ...] = (),
                 fresh_key: bool = False) -> None:
        super().__init__(port, headers)
        self.name, self.port, self.path, self.payload = name, port, path, json.dumps(body)
        self.x_cache, self.fresh_key = x_cache, fresh_key
        self.overhead_ms: list[float] = []

    def __call__(self) -> None:
        headers = self.headers
        if self.fresh_key:
            headers = {**headers, "Idempotency-Key": f"bench-{uuid.uuid4().hex}"}
        for attempt in (1, 2):  # twice only if the server closed an idle keep-alive under us
            try:
                self.conn.request("POST", self.path, body=self.payload, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                break
            except ConnectionError:
                self.conn.close()
                if attempt == 2:
                    raise
        if response.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {response.status}: {data[:300]!r}")
        if self.x_cache and response.getheader("X-Cache") not in self.x_cache:
            raise RuntimeError(f"{self.name}: X-Cache {response.getheader('X-Cache')!r}, "
                               f"expected one of {self.x_cache}")
        overhead = response.getheader("X-Ambassador-Overhead-Ms")
        if overhead is not None:
            self.overhead_ms.append(float(overhead))


# -- the reference proxy -----------------------------------------------------------------------

def haproxy_config(port: int, engine_port: int) -> str:
    return f"""global
  nbthread 1
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 75s
frontend bench
  bind 127.0.0.1:{port}
  default_backend engine
backend engine
  server engine 127.0.0.1:{engine_port}
"""


def nginx_config(port: int, engine_port: int, tmp: Path) -> str:
    temp_paths = "\n".join(f"  {kind}_temp_path {tmp / kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
worker_processes 1;
pid {tmp / 'nginx.pid'};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp_paths}
  upstream engine {{ server 127.0.0.1:{engine_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    location / {{
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def find_reference(choice: str, install: bool) -> tuple[str | None, str]:
    """(name, why) of the reference proxy to use; name None when it is skipped."""
    if choice == "none":
        return None, "skipped (--reference none)"
    names = ("haproxy", "nginx") if choice == "auto" else (choice,)
    for name in names:
        if shutil.which(name):
            return name, shutil.which(name)
    if not install:
        return None, (f"skipped: {' or '.join(names)} not installed (run with "
                      "--install-reference to apt-get install it)")
    package = names[0]
    if apt_install(package):
        return package, f"{shutil.which(package)} (installed by this run)"
    return None, f"skipped: apt-get install -y {package} failed"


def apt_install(package: str) -> bool:
    """``apt-get install -y package``; once more after ``apt-get update`` if that fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for steps in ([["install", "-y", package]], [["update"], ["install", "-y", package]]):
        for step in steps:
            done = subprocess.run(["apt-get", *step], capture_output=True, text=True,
                                  timeout=600, env=env)
        if done.returncode == 0 and shutil.which(package):
            return True
    return False


@contextmanager
def reference_proxy(name: str | None, engine_port: int, tmp: Path):
    """Yield ``(proc, port)`` of the running reference proxy, or ``(None, None)``."""
    if name is None:
        yield None, None
        return
    port = free_port()
    conf = tmp / f"{name}.conf"
    if name == "haproxy":
        conf.write_text(haproxy_config(port, engine_port))
        cmd = [shutil.which("haproxy"), "-db", "-f", str(conf)]
    else:
        conf.write_text(nginx_config(port, engine_port, tmp))
        cmd = [shutil.which("nginx"), "-e", "stderr", "-p", str(tmp), "-c", str(conf)]
    with server(cmd, port, "/readyz") as (proc, _):
        yield proc, port


# -- concurrency 1 and 16 ----------------------------------------------------------------------------

def c1_rounds(callers: list[Caller], front: dict[str, int], engine_pid: int, rounds: int,
              per_round: int, engines: dict[str, int] | None = None,
              ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Latencies (ms) per path in interleaved rounds, the order flipped each round so no path
    always goes first; and CPU seconds [proxy in front (pid in ``front``, 0 for none),
    engine (``engine_pid``, or the path's in ``engines``)] per path, read around each batch:
    only that path's servers are busy then."""
    engines = engines or {}
    lat: dict[str, list[float]] = {c.name: [] for c in callers}
    by_round: dict[str, list[list[float]]] = {c.name: [] for c in callers}
    cpu = {c.name: [0.0, 0.0] for c in callers}
    for i in range(rounds):
        for caller in (callers if i % 2 == 0 else callers[::-1]):
            proxy_pids = process_tree(front[caller.name]) if front[caller.name] else []
            engine_pids = process_tree(engines.get(caller.name, engine_pid))
            before = cpu_seconds(proxy_pids), cpu_seconds(engine_pids)
            by_round[caller.name].append(timed_ms(caller, per_round))
            lat[caller.name] += by_round[caller.name][-1]
            cpu[caller.name][0] += cpu_seconds(proxy_pids) - before[0]
            cpu[caller.name][1] += cpu_seconds(engine_pids) - before[1]
    for caller in callers:
        caller.conn.close()
    return lat, cpu, by_round


def wrk_rounds(paths: dict[str, tuple[str, dict, dict[str, str], int]], *, rounds: int,
               seconds: float, engine_pid: int,
               engines: dict[str, int] | None = None) -> dict[str, dict]:
    """wrk at 16 connections on each path, ``rounds`` times in alternating order; CPU of the
    proxy in front (its pid, 0 for none) and of the engine (``engine_pid``, or the path's in
    ``engines``) per request."""
    engines = engines or {}
    out = {name: {"requests": 0, "duration": 0.0, "p50": [], "p99": [], "errors": 0,
                  "proxy_cpu_s": 0.0, "engine_cpu_s": 0.0} for name in paths}
    for i in range(rounds):
        for name in (list(paths) if i % 2 == 0 else list(paths)[::-1]):
            url, body, headers, proxy_pid = paths[name]
            engine_pids = process_tree(engines.get(name, engine_pid))
            proxy_pids = process_tree(proxy_pid) if proxy_pid else []
            engine_before, proxy_before = cpu_seconds(engine_pids), cpu_seconds(proxy_pids)
            r = wrk(url, body, headers, connections=16, seconds=seconds)
            acc = out[name]
            acc["engine_cpu_s"] += cpu_seconds(engine_pids) - engine_before
            acc["proxy_cpu_s"] += cpu_seconds(proxy_pids) - proxy_before
            acc["requests"] += r["requests"]
            acc["duration"] += r["requests"] / r["rps"] if r["rps"] else seconds
            acc["p50"].append(r["p50_ms"])
            acc["p99"].append(r["p99_ms"])
            acc["errors"] += r["non_2xx"] + r["socket_errors"] + r["timeouts"]
    for acc in out.values():
        n = max(1, acc["requests"])
        acc.update(rps=acc["requests"] / acc["duration"], p50_ms=statistics.mean(acc["p50"]),
                   p99_ms=statistics.mean(acc["p99"]), proxy_cpu_ms=acc["proxy_cpu_s"] * 1000 / n,
                   engine_cpu_ms=acc["engine_cpu_s"] * 1000 / n)
    return out


# -- the slow-flow test ------------------------------------------------------------------------

def concurrent_posts(port: int, path: str, body: dict, headers: dict[str, str], n: int,
                     timeout_s: float, *, fresh_key: bool = False) -> dict:
    """``n`` POSTs at once, one connection and one thread each, released together
    (``fresh_key``: each with its own Idempotency-Key)."""
    payload = json.dumps(body)
    headers = {"Content-Type": "application/json", **headers}
    barrier = threading.Barrier(n)
    # start, end, error ("" = ok), upstream attempts (the ambassador's X-Upstream-Attempts)
    results: list[tuple[float, float, str, int] | None] = [None] * n

    def one(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        start, attempts = time.perf_counter(), 1
        try:
            conn.connect()
            barrier.wait(timeout=timeout_s)
            start = time.perf_counter()
            conn.request("POST", path, body=payload, headers={
                **headers, **({"Idempotency-Key": uuid.uuid4().hex} if fresh_key else {})})
            response = conn.getresponse()
            data = response.read()
            attempts = int(response.getheader("X-Upstream-Attempts") or 1)
            error = "" if response.status == 200 and json.loads(data).get("output") else \
                f"HTTP {response.status}: {data[:200]!r}"
        except Exception as exc:  # every failure is a result to count, not a crash
            barrier.abort()
            error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        results[i] = (start, time.perf_counter(), error, attempts)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s + 10
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    done = [r for r in results if r is not None]
    ok = [r for r in done if not r[2]]
    durations = [r[1] - r[0] for r in ok]
    return {"ok": len(ok), "failed": n - len(ok), "retried": sum(r[3] > 1 for r in done),
            "wall_s": max(r[1] for r in done) - min(r[0] for r in done) if done else float("nan"),
            "p50_s": statistics.median(durations) if durations else float("nan"),
            "p99_s": pct(durations, 99) if durations else float("nan"),
            "reasons": sorted({r[2] for r in done if r[2]} |
                              ({"no answer in time"} if len(done) < n else set()))[:3]}


class PeakRSS:
    """Samples the RSS of a process tree every 50 ms in a thread; ``peak`` is the largest
    total seen (MB)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            with suppress(OSError):
                self.peak = max(self.peak, sum(rss_mb(p) for p in process_tree(self.pid)))
            if self._stop.wait(0.05):
                return

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


# -- main --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved c1 rounds")
    parser.add_argument("--per-round", type=int, default=200, help="requests per path and round")
    parser.add_argument("--seconds", type=float, default=4.0, help="wrk seconds per path and round")
    parser.add_argument("--wrk-rounds", type=int, default=2)
    parser.add_argument("--slow", type=int, default=200, help="concurrent slow requests")
    parser.add_argument("--reference", choices=("auto", "haproxy", "nginx", "none"), default="auto")
    parser.add_argument("--install-reference", action="store_true",
                        help="apt-get install -y haproxy when no reference proxy is installed")
    parser.add_argument("--otel", choices=("off", "on"), default="off",
                        help="on: also an engine and an ambassador exporting every span")
    args = parser.parse_args()
    reference, reference_note = find_reference(args.reference, args.install_reference)

    python = sys.executable
    sim_port, engine_port, amb_port = free_port(), free_port(), free_port()
    tmp_dir = tempfile.TemporaryDirectory(prefix="bench-ambassador-")
    tmp = Path(tmp_dir.name)
    amb_config = tmp / "ambassador.yaml"
    amb_config.write_text(json.dumps({  # JSON is YAML
        "upstream": {"url": f"http://127.0.0.1:{engine_port}", "key": KEY},
        "inbound_auth": {"mode": "none"},
        "flows": {CACHED_FLOW["id"]: {"cache": {"ttl_s": 3600}}},
    }, indent=2))
    # Empty = unset: each server's own defaults, whatever this shell exports.
    engine_env = {"FLOW_ENGINE_API_KEYS": KEY, "DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
                  "FLOW_ENGINE_WORKERS": "2", "REDIS_URL": "",
                  "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
                  "OPENAI_API_KEY": "bench-no-key", "FLOW_ENGINE_GRACEFUL_TIMEOUT": "5",
                  "PROMETHEUS_MULTIPROC_DIR": str(tmp / "engine-metrics")}
    amb_env = {"REDIS_URL": "", "AMBASSADOR_WORKERS": "1", "AMBASSADOR_GRACEFUL_TIMEOUT": "5",
               "AMBASSADOR_UPSTREAM_URL": "", "AMBASSADOR_UPSTREAM_KEY": "",
               "PROMETHEUS_MULTIPROC_DIR": ""}  # one worker: in-process metrics, as deployed
    sim_cmd = [python, "-m", "flowgate.llm_sim", "--port", str(sim_port),
               "--ttft", str(SIM_TTFT_S), "--reply-tokens", "20"]
    engine_cmd = [python, "-m", "flowgate.cli", "engine", "--port", str(engine_port)]
    amb_cmd = [python, "-m", "flowgate.cli", "ambassador", "--port", str(amb_port),
               "--config", str(amb_config)]
    floor_port = free_port()
    floor_cmd = [python, str(Path(__file__).resolve().parent / "proxy_floor.py"), "--port",
                 str(floor_port), "--engine-port", str(engine_port), "--key", KEY]
    auth = {"Authorization": f"Bearer {KEY}"}
    direct_body = {"input_value": QUESTION}
    started = time.monotonic()

    with tmp_dir, ExitStack() as stack:
        stack.enter_context(server(sim_cmd, sim_port, "/v1/models"))
        engine_proc, _ = stack.enter_context(server(engine_cmd, engine_port, "/readyz", engine_env))
        amb_proc, amb_ready_s = stack.enter_context(server(amb_cmd, amb_port, "/readyz", amb_env))
        ref_proc, ref_port = stack.enter_context(reference_proxy(reference, engine_port, tmp))
        floor_proc, _ = stack.enter_context(server(floor_cmd, floor_port, "/readyz",
                                                   {"PROMETHEUS_MULTIPROC_DIR": ""}))
        receiver = Receiver() if args.otel == "on" else None
        traced = stack.enter_context(traced_pair(receiver, tmp, engine_env, amb_env))
        for flow in (FLOW, CACHED_FLOW, SLOW_FLOW):
            status, text = Client(engine_port, auth).post("/api/v1/flows", flow)
            assert status == 201, text

        callers = [
            Caller("direct", engine_port, f"/api/v1/run/{FLOW['id']}", direct_body, headers=auth),
            Caller("direct + Idempotency-Key", engine_port, f"/api/v1/run/{FLOW['id']}",
                   direct_body, headers=auth, fresh_key=True),
            Caller("ambassador, no cache", amb_port, "/run-flow",
                   {"flow_id": FLOW["id"], "input": QUESTION}, x_cache=("BYPASS", "MISS")),
            Caller("ambassador, cache hit", amb_port, "/run-flow",
                   {"flow_id": CACHED_FLOW["id"], "input": QUESTION}, x_cache=("HIT", "MISS")),
        ]
        if ref_port:
            callers.append(Caller(reference, ref_port, f"/api/v1/run/{FLOW['id']}", direct_body,
                                  headers=auth))
        callers.append(Caller(FLOOR, floor_port, "/run-flow", {"flow_id": FLOW["id"],
                                                               "input": QUESTION}))
        if traced:
            callers += [Caller(OTEL_DIRECT, traced["engine_port"], f"/api/v1/run/{FLOW['id']}",
                               direct_body, headers=auth),
                        Caller(OTEL_AMB, traced["amb_port"], "/run-flow",
                               {"flow_id": FLOW["id"], "input": QUESTION},
                               x_cache=("BYPASS", "MISS"))]
        traced_engines = {OTEL_DIRECT: traced["engine_pid"],
                          OTEL_AMB: traced["engine_pid"]} if traced else {}
        for _ in range(200):  # warm every worker's compile cache, the pools, the cache entry
            for caller in callers:
                caller()
        callers[3].x_cache = ("HIT",)
        for caller in callers:
            caller.overhead_ms.clear()

        front = {c.name: (amb_proc.pid if c.port == amb_port else ref_proc.pid
                          if c.port == ref_port else floor_proc.pid if c.port == floor_port
                          else 0) for c in callers}
        if traced:
            front[OTEL_AMB] = traced["amb_pid"]
        calibration = calibration_ms()
        lat, cpu_c1, by_round = c1_rounds(callers, front, engine_proc.pid, args.rounds,
                                          args.per_round, traced_engines)
        overhead = {c.name: c.overhead_ms for c in callers if c.overhead_ms}

        # concurrency 16, wrk
        amb_body = {"flow_id": FLOW["id"], "input": QUESTION}
        paths = {
            "direct": (f"http://127.0.0.1:{engine_port}/api/v1/run/{FLOW['id']}", direct_body,
                       auth, 0),
            "direct + Idempotency-Key": (f"http://127.0.0.1:{engine_port}/api/v1/run/"
                                         f"{FLOW['id']}", direct_body,
                                         {**auth, "Idempotency-Key": FRESH}, 0),
            "ambassador, no cache": (f"http://127.0.0.1:{amb_port}/run-flow", amb_body, {},
                                     amb_proc.pid),
            "ambassador, cache hit": (f"http://127.0.0.1:{amb_port}/run-flow",
                                      {**amb_body, "flow_id": CACHED_FLOW["id"]}, {}, amb_proc.pid),
        }
        if ref_port:
            paths[reference] = (f"http://127.0.0.1:{ref_port}/api/v1/run/{FLOW['id']}",
                                direct_body, auth, ref_proc.pid)
        paths[FLOOR] = (f"http://127.0.0.1:{floor_port}/run-flow", amb_body, {}, floor_proc.pid)
        if traced:
            paths[OTEL_DIRECT] = (f"http://127.0.0.1:{traced['engine_port']}/api/v1/run/"
                                  f"{FLOW['id']}", direct_body, auth, 0)
            paths[OTEL_AMB] = (f"http://127.0.0.1:{traced['amb_port']}/run-flow", amb_body, {},
                               traced["amb_pid"])
        c16 = wrk_rounds(paths, rounds=args.wrk_rounds, seconds=args.seconds,
                         engine_pid=engine_proc.pid, engines=traced_engines)

        # many concurrent slow runs
        slow_direct_path = f"/api/v1/run/{SLOW_FLOW['id']}"
        slow_amb_body = {"flow_id": SLOW_FLOW["id"], "input": QUESTION}
        warm = concurrent_posts(amb_port, "/run-flow", slow_amb_body, {}, 8, 30)
        if warm["failed"]:
            raise RuntimeError(f"warm-up of the slow flow failed: {warm['reasons']}")
        timeout_s = 30 + args.slow * 0.1
        slow_direct: dict[str, dict] = {}
        for name, fresh_key in (("direct", False), ("direct + Idempotency-Key", True)):
            engine_cpu = cpu_seconds(process_tree(engine_proc.pid))
            slow_direct[name] = concurrent_posts(engine_port, slow_direct_path, direct_body, auth,
                                                 args.slow, timeout_s, fresh_key=fresh_key)
            slow_direct[name]["engine_cpu_s"] = cpu_seconds(process_tree(engine_proc.pid)) - engine_cpu
        amb_workers = children(amb_proc.pid)
        rss_idle = sum(rss_mb(p) for p in process_tree(amb_proc.pid))
        worker_rss_idle = max(rss_mb(p) for p in amb_workers)
        engine_cpu, amb_cpu = (cpu_seconds(process_tree(p.pid)) for p in (engine_proc, amb_proc))
        with PeakRSS(amb_proc.pid) as peak:
            slow_amb = concurrent_posts(amb_port, "/run-flow", slow_amb_body, {}, args.slow,
                                        timeout_s)
        slow_amb["engine_cpu_s"] = cpu_seconds(process_tree(engine_proc.pid)) - engine_cpu
        slow_amb["ambassador_cpu_s"] = cpu_seconds(process_tree(amb_proc.pid)) - amb_cpu
        rss_after = sum(rss_mb(p) for p in process_tree(amb_proc.pid))
        worker_rss_after = max(rss_mb(p) for p in children(amb_proc.pid))

    n_c1 = args.rounds * args.per_round
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: pct(v, 99) for k, v in lat.items()}
    direct, amb, hit = "direct", "ambassador, no cache", "ambassador, cache hit"
    added = p50[amb] - p50[direct]
    ratio = c16[amb]["rps"] / c16[direct]["rps"]
    own = statistics.median(overhead[amb]) if overhead.get(amb) else float("nan")
    print(f"engine: 2 workers, SQLite; ambassador: {len(amb_workers)} worker, default filters, "
          f"ready in {amb_ready_s:.2f} s; reference proxy: {reference or '-'} ({reference_note})")
    print(f"concurrency 1 ({args.rounds} interleaved rounds × {args.per_round}, {n_c1} per path)"
          f"{'p50 ms':>12}{'p99 ms':>10}{'p50 − direct':>14}{'CPU ms/request proxy, engine':>31}")
    cpu_ms = {name: [seconds * 1000 / n_c1 for seconds in v] for name, v in cpu_c1.items()}
    for name in lat:
        proxy_cpu = f"{cpu_ms[name][0]:.3f}" if front[name] else "-"
        print(f"  {name:<56}{p50[name]:>10.3f}{p99[name]:>10.3f}{p50[name] - p50[direct]:>+14.3f}"
              f"{proxy_cpu:>17}{cpu_ms[name][1]:>10.3f}")
    print(f"  added by the ambassador (p50)   {added:+.3f} ms   (target ≤ {TARGETS['added_p50_c1_ms']} ms)"
          f"   {'ok' if added <= TARGETS['added_p50_c1_ms'] else 'MISSED'}")
    print(f"  its own X-Ambassador-Overhead-Ms (p50) {own:.3f} ms")
    print(f"  cache-hit p50 {p50[hit]:.3f} ms vs direct {p50[direct]:.3f} ms   "
          f"(target: below direct)   {'ok' if p50[hit] < p50[direct] else 'MISSED'}")
    if ref_port:
        print(f"  added by {reference} (p50)   {p50[reference] - p50[direct]:+.3f} ms")
    print(f"  added by the floor (p50)   {p50[FLOOR] - p50[direct]:+.3f} ms; the ambassador over "
          f"the floor {p50[amb] - p50[FLOOR]:+.3f} ms (its features; direct + Idempotency-Key "
          f"accounts for {p50['direct + Idempotency-Key'] - p50[direct]:+.3f} ms of it)")
    print(f"concurrency 16 (wrk, {args.wrk_rounds} rounds × {args.seconds:g} s){'req/s':>16}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'proxy CPU':>11}{'engine CPU':>12}   ms/request")
    for name, r in c16.items():
        proxy_cpu = f"{r['proxy_cpu_ms']:.3f}" if paths[name][3] else "-"
        print(f"  {name:<38}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['errors']:>8}{proxy_cpu:>11}{r['engine_cpu_ms']:>12.3f}")
    print(f"  throughput ambassador/direct   {ratio:.2f}   (target ≥ {TARGETS['throughput_ratio_c16']:.2f})"
          f"   {'ok' if ratio >= TARGETS['throughput_ratio_c16'] else 'MISSED'}")
    if ref_port:
        print(f"  throughput {reference}/direct   {c16[reference]['rps'] / c16[direct]['rps']:.2f}")
    print(f"  throughput floor/direct   {c16[FLOOR]['rps'] / c16[direct]['rps']:.2f}")
    keyed = c16["direct + Idempotency-Key"]
    print(f"  throughput direct + Idempotency-Key/direct   {keyed['rps'] / c16[direct]['rps']:.2f}"
          f"   (the claim every run through the ambassador makes)")
    # the median over rounds of each round's difference: one noisy round moves it less
    over_floor = median_of_rounds(by_round[amb], by_round[FLOOR], ratio=False)
    vs_floor = c16[amb]["rps"] / c16[FLOOR]["rps"]
    print(f"  against the floor: ambassador − floor p50 c1 {over_floor:+.3f} ms (target ≤ "
          f"{TARGETS['over_floor_p50_c1_ms']} ms)   "
          f"{'ok' if over_floor <= TARGETS['over_floor_p50_c1_ms'] else 'MISSED'}; "
          f"throughput ambassador/floor c16 {vs_floor:.2f} (target ≥ "
          f"{TARGETS['throughput_ratio_vs_floor_c16']:.2f})   "
          f"{'ok' if vs_floor >= TARGETS['throughput_ratio_vs_floor_c16'] else 'MISSED'}; "
          f"CPU ms/request ambassador {c16[amb]['proxy_cpu_ms']:.3f}, floor "
          f"{c16[FLOOR]['proxy_cpu_ms']:.3f}")
    print(f"{args.slow} concurrent slow runs (llm-sim ttft {SIM_TTFT_S:g} s)"
          f"{'ok':>6}{'failed':>8}{'wall s':>9}{'p50 s':>8}{'p99 s':>8}{'CPU s engine/amb':>19}")
    for name, r in (*slow_direct.items(), ("ambassador", slow_amb)):
        amb_cpu_s = f"{r['ambassador_cpu_s']:.2f}" if "ambassador_cpu_s" in r else "-"
        print(f"  {name:<44}{r['ok']:>6}{r['failed']:>8}{r['wall_s']:>9.2f}{r['p50_s']:>8.2f}"
              f"{r['p99_s']:>8.2f}{r['engine_cpu_s']:>12.2f} / {amb_cpu_s}")
        for reason in r["reasons"]:
            print(f"    failed: {reason}")
    print(f"  all succeed through the ambassador: {'ok' if slow_amb['failed'] == 0 else 'MISSED'}; "
          f"{slow_amb['retried']} needed a second upstream attempt (X-Upstream-Attempts)")
    print(f"  ambassador RSS (master + worker): {rss_idle:.0f} MB before, peak {peak.peak:.0f} MB "
          f"during, {rss_after:.0f} MB after; worker {worker_rss_idle:.0f} → {worker_rss_after:.0f} MB")
    otel = otel_figures(p50, p99, c16, receiver) if receiver is not None else {}
    print(f"calibration loop {calibration:.1f} ms (this machine's pace during the run); "
          f"total {time.monotonic() - started:.0f} s")

    def ms(x: float) -> float:
        return round(x, 3)

    result = {
        "added_p50_c1_ms": ms(added), "direct_p50_c1_ms": ms(p50[direct]),
        "direct_p99_c1_ms": ms(p99[direct]), "ambassador_p50_c1_ms": ms(p50[amb]),
        "ambassador_p99_c1_ms": ms(p99[amb]), "cache_hit_p50_ms": ms(p50[hit]),
        "cache_hit_p99_ms": ms(p99[hit]),
        "direct_idempotency_key_p50_c1_ms": ms(p50["direct + Idempotency-Key"]),
        "ambassador_reported_overhead_p50_ms": ms(own),
        "ambassador_cpu_ms_per_request_c1": ms(cpu_ms[amb][0]),
        "ambassador_cpu_ms_per_cache_hit_c1": ms(cpu_ms[hit][0]),
        "engine_cpu_ms_per_request_c1_direct": ms(cpu_ms[direct][1]),
        "engine_cpu_ms_per_request_c1_via_ambassador": ms(cpu_ms[amb][1]),
        "throughput_ratio_c16": round(ratio, 3),
        "direct_rps_c16": round(c16[direct]["rps"], 1), "ambassador_rps_c16": round(c16[amb]["rps"], 1),
        "cache_hit_rps_c16": round(c16[hit]["rps"], 1),
        "direct_p50_c16_ms": ms(c16[direct]["p50_ms"]), "direct_p99_c16_ms": ms(c16[direct]["p99_ms"]),
        "ambassador_p50_c16_ms": ms(c16[amb]["p50_ms"]), "ambassador_p99_c16_ms": ms(c16[amb]["p99_ms"]),
        "ambassador_cpu_ms_per_request": ms(c16[amb]["proxy_cpu_ms"]),
        "ambassador_cpu_ms_per_cache_hit": ms(c16[hit]["proxy_cpu_ms"]),
        "engine_cpu_ms_per_request_direct": ms(c16[direct]["engine_cpu_ms"]),
        "engine_cpu_ms_per_request_via_ambassador": ms(c16[amb]["engine_cpu_ms"]),
        "errors_c16": sum(r["errors"] for r in c16.values()),
        "reference": reference, "reference_note": reference_note,
        "slow_ok": slow_amb["ok"], "slow_failed": slow_amb["failed"],
        "slow_wall_s": round(slow_amb["wall_s"], 2), "slow_p99_s": round(slow_amb["p99_s"], 2),
        "slow_direct_ok": slow_direct["direct"]["ok"],
        "slow_direct_wall_s": round(slow_direct["direct"]["wall_s"], 2),
        "slow_direct_idempotency_key_wall_s": round(slow_direct["direct + Idempotency-Key"]["wall_s"], 2),
        "slow_ambassador_cpu_s": round(slow_amb["ambassador_cpu_s"], 2),
        "slow_retried": slow_amb["retried"],
        "ambassador_rss_mb_peak": round(peak.peak, 1), "ambassador_rss_mb_idle": round(rss_idle, 1),
        "ambassador_worker_rss_mb": round(worker_rss_after, 1),
    }
    result.update({
        "floor_added_p50_c1_ms": ms(p50[FLOOR] - p50[direct]),
        "floor_cpu_ms_per_request_c1": ms(cpu_ms[FLOOR][0]),
        "floor_throughput_ratio_c16": round(c16[FLOOR]["rps"] / c16[direct]["rps"], 3),
        "ambassador_over_floor_p50_c1_ms": ms(over_floor),
        "throughput_ratio_vs_floor_c16": round(vs_floor, 3),
        "calibration_ms": round(calibration, 2),
        "floor_cpu_ms_per_request": ms(c16[FLOOR]["proxy_cpu_ms"]),
        "keyed_throughput_ratio_c16": round(keyed["rps"] / c16[direct]["rps"], 3),
        "engine_cpu_ms_per_keyed_request": ms(keyed["engine_cpu_ms"]),
        **otel,
    })
    if ref_port:
        result.update({
            "reference_p50_c1_ms": ms(p50[reference]),
            "reference_added_p50_c1_ms": ms(p50[reference] - p50[direct]),
            "reference_rps_c16": round(c16[reference]["rps"], 1),
            "reference_throughput_ratio_c16": round(c16[reference]["rps"] / c16[direct]["rps"], 3),
            "reference_cpu_ms_per_request": ms(c16[reference]["proxy_cpu_ms"]),
        })
    result["targets_met"] = {
        "added_p50_c1": added <= TARGETS["added_p50_c1_ms"],
        "cache_hit_below_direct": p50[hit] < p50[direct],
        "throughput_ratio_c16": ratio >= TARGETS["throughput_ratio_c16"],
        "slow_all_ok": slow_amb["failed"] == 0,
        "over_floor_p50_c1": over_floor <= TARGETS["over_floor_p50_c1_ms"],
        "throughput_ratio_vs_floor_c16": vs_floor >= TARGETS["throughput_ratio_vs_floor_c16"],
    }
    print(json.dumps(result))


@contextmanager
def traced_pair(receiver: Receiver | None, tmp: Path, engine_env: dict[str, str],
                amb_env: dict[str, str]):
    """With a receiver: an engine (its own SQLite file, the bench flow created) and an
    ambassador in front of it (default filters, no cache), both exporting every span to it;
    yields their ports and master pids. Without one: an empty dict."""
    if receiver is None:
        yield {}
        return
    python, engine_port, amb_port = sys.executable, free_port(), free_port()
    config = tmp / "ambassador-otel.yaml"
    config.write_text(json.dumps({"upstream": {"url": f"http://127.0.0.1:{engine_port}",
                                               "key": KEY}, "inbound_auth": {"mode": "none"}}))
    export = export_env(receiver)
    engine_cmd = [python, "-m", "flowgate.cli", "engine", "--port", str(engine_port)]
    amb_cmd = [python, "-m", "flowgate.cli", "ambassador", "--port", str(amb_port),
               "--config", str(config)]
    with server(engine_cmd, engine_port, "/readyz", {
            **engine_env, "DATABASE_URL": f"sqlite:///{tmp / 'otel.db'}",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp / "otel-engine-metrics"), **export}) as (
            engine_proc, _), server(amb_cmd, amb_port, "/readyz", {**amb_env, **export}) as (
            amb_proc, _):
        status, text = Client(engine_port, {"Authorization": f"Bearer {KEY}"}).post(
            "/api/v1/flows", FLOW)
        assert status == 201, text
        yield {"engine_port": engine_port, "amb_port": amb_port, "engine_pid": engine_proc.pid,
               "amb_pid": amb_proc.pid}


def otel_figures(p50: dict[str, float], p99: dict[str, float], c16: dict[str, dict],
                 receiver: Receiver) -> dict[str, float]:
    """Print the servers exporting every span beside those exporting none; the JSON keys."""
    amb = "ambassador, no cache"
    pairs = (("direct", "direct", OTEL_DIRECT), ("ambassador", amb, OTEL_AMB))
    print("OpenTelemetry export (100 % sampled, OTLP/HTTP to a local receiver) vs none"
          f"{'p50 c1 off/on ms':>22}{'on/off':>8}{'c16 req/s off/on':>20}{'on/off':>8}")
    out: dict[str, float] = {}
    for key, off, on in pairs:
        p50_ratio, rps_ratio = p50[on] / p50[off], c16[on]["rps"] / c16[off]["rps"]
        print(f"  {key:<73}{p50[off]:>9.3f}/{p50[on]:<9.3f}{p50_ratio:>7.2f}x"
              f"{c16[off]['rps']:>10.0f}/{c16[on]['rps']:<8.0f}{rps_ratio:>6.2f}x")
        out.update({f"otel_{key}_p50_c1_ms": round(p50[on], 3),
                    f"otel_{key}_p99_c1_ms": round(p99[on], 3),
                    f"otel_{key}_p50_c1_ratio": round(p50_ratio, 3),
                    f"otel_{key}_rps_c16": round(c16[on]["rps"], 1),
                    f"otel_{key}_rps_c16_ratio": round(rps_ratio, 3)})
    added_on = p50[OTEL_AMB] - p50[OTEL_DIRECT]
    print(f"  added by the ambassador (p50), export on {added_on:+.3f} ms, off "
          f"{p50[amb] - p50['direct']:+.3f} ms; the receiver took {receiver.requests} exports, "
          f"{receiver.bytes / 1e6:.1f} MB")
    out.update({"otel_added_p50_c1_ms": round(added_on, 3), "otel_exports": receiver.requests})
    return out


if __name__ == "__main__":
    main()
