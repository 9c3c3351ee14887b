"""Hot updates: how fast a publish on one engine is seen by another, and what recording run
outcomes for canary analysis costs each run.

    .venv/bin/python bench/hot_update.py [--publishes 40]

(a) Two engine processes (``flowgate engine``, one worker each) sharing PostgreSQL (a fresh
    schema of FLOWGATE_TEST_POSTGRES_URL, default the local server) and a private
    redis-server. A version is published on engine A; from the moment A answers, engine B is
    asked to run the flow in a tight loop until an answer comes from the new version. The
    same is measured side by side on a pair sharing PostgreSQL only (no Redis, so no
    ``flow_changed`` signal): there B sees the change when its cached copy of the flow
    expires (FLOW_ENGINE_FLOW_CACHE_TTL_S, 0.5 s).
(b) In-process: ``OutcomeRecorder.record`` (what every run's end pays) against a
    Prometheus counter increment (what it already pays per metric), interleaved.

Targets: publish visible on the other engine within 1 s at p99 (with Redis); recording an
outcome ≤ 50 µs. Last line: one JSON object with ``publish_visible_p99_s`` and
``outcome_record_us``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from flow_engine.rollouts.outcomes import OutcomeRecorder

# tests/ holds a flow_engine folder too: imported after the real package is
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))

from _support import Client, free_port, pct, server
from support.chaos import PgSchema, RedisServer

KEY = "bench-admin-secret-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}


def flow(label: str) -> dict:
    return {"id": "hot", "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "p", "type": "PromptTemplate", "params": {"template": f"[{label}] {{question}}"}},
        {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
                  {"source": "llm", "target": "out"}]}


def engine(stack: ExitStack, database_url: str, redis_url: str) -> int:
    port = free_port()
    stack.enter_context(server(
        [sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)], port, "/readyz",
        env={"FLOW_ENGINE_API_KEYS": f"bench:admin:{KEY}", "DATABASE_URL": database_url,
             "REDIS_URL": redis_url, "FLOW_ENGINE_WORKERS": "1",
             "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-metrics-")}))
    return port


def visible_after_publish(a: int, b: int, publishes: int) -> list[float]:
    """Seconds from each publish's answer on ``a`` to the first answer of the new version
    on ``b`` (bounded: 10 s per publish)."""
    pa, pb = Client(a, AUTH), Client(b, AUTH)
    status, _ = pa.post("/api/v1/flows", flow("v1"))
    assert status in (201, 409), status
    for _ in range(20):  # both engines have compiled and cached the flow
        pb.post("/api/v1/run/hot", {"input_value": "warm"})
    seen = []
    for _ in range(publishes):
        pa.conn.request("PUT", "/api/v1/flows/hot", body=json.dumps(flow("next")),
                        headers=pa.headers)  # a new version (not live yet)
        version = json.loads(pa.conn.getresponse().read())["version"]
        pb.post("/api/v1/run/hot", {"input_value": "compile"})  # not yet live: B still on old
        status, _ = pa.post("/api/v1/flows/hot/publish", {"version": version})
        assert status == 200, status
        published = time.perf_counter()
        deadline = published + 10
        while time.perf_counter() < deadline:
            status, raw = pb.post("/api/v1/run/hot", {"input_value": "which version?"})
            if status == 200 and json.loads(raw)["version"] == version:
                seen.append(time.perf_counter() - published)
                break
        else:
            raise RuntimeError(f"version {version} not seen on the other engine within 10 s")
    return seen


def record_cost(n: int) -> tuple[float, float]:
    """µs per OutcomeRecorder.record and per prometheus Counter.inc, interleaved rounds."""
    class Nowhere:  # flushing is a background thread's work, not the run's
        def add(self, batch):
            pass

    recorder = OutcomeRecorder(Nowhere())
    counter = Counter("bench_runs", "runs", ["flow", "version", "status"],
                      registry=CollectorRegistry())
    rec, inc = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        for i in range(n):
            recorder.record("faq-rag", 3, i % 50 == 0, 0.2)
        rec.append((time.perf_counter() - t0) / n * 1e6)
        recorder.flush()
        t0 = time.perf_counter()
        for _ in range(n):
            counter.labels("faq-rag", "3", "succeeded").inc()
        inc.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rec), statistics.median(inc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=40)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-hot-"))
    results: dict[str, list[float]] = {}
    with ExitStack() as stack:
        redis_server = RedisServer(workdir).start()
        stack.callback(redis_server.stop)
        for name, redis_url in (("redis", redis_server.url), ("store_only", "")):
            pg = PgSchema()
            stack.callback(pg.drop)
            a = engine(stack, pg.url, redis_url)
            b = engine(stack, pg.url, redis_url)
            results[name] = visible_after_publish(a, b, args.publishes)
    for name, seen in results.items():
        print(f"publish visible on the other engine ({name}): p50 {pct(seen, 50):.3f} s, "
              f"p99 {pct(seen, 99):.3f} s, max {max(seen):.3f} s over {len(seen)} publishes")
    record_us, inc_us = record_cost(100_000)
    print(f"recording a run's outcome: {record_us:.2f} µs (a Prometheus counter inc: "
          f"{inc_us:.2f} µs; ratio {record_us / inc_us:.2f})")
    print(json.dumps({
        "publish_visible_p50_s": round(pct(results["redis"], 50), 4),
        "publish_visible_p99_s": round(pct(results["redis"], 99), 4),
        "publish_visible_p99_s_without_redis": round(pct(results["store_only"], 99), 4),
        "ratio_p99_redis_over_store_only": round(pct(results["redis"], 99)
                                                 / pct(results["store_only"], 99), 3),
        "outcome_record_us": round(record_us, 3),
        "ratio_record_over_counter_inc": round(record_us / inc_us, 3),
        "targets": {"publish_visible_p99_s": 1.0, "outcome_record_us": 50},
    }))


if __name__ == "__main__":
    main()
