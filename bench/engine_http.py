"""Engine over HTTP: POST /api/v1/run for the 5-node echo flow through gunicorn, measured
side by side with (a) the same compiled run in-process and (b) a bare Flask endpoint under
the same gunicorn settings (the HTTP floor).

    .venv/bin/python bench/engine_http.py [--rounds 5] [--per-round 300] [--seconds 5]
        [--otel off|on]

Reports p50/p99 at concurrency 1 (engine and floor taking turns in blocks of 20 calls, the
in-process runs in a batch of their own each round; the
over-floor difference and the engine/in-process ratio are medians over rounds, printed
with a calibration loop's time), requests/s and p99/p50 at
concurrency 8 and 16 (wrk), the longest GC pause of a worker (its
flowgate_engine_gc_pause_max_seconds), idle and post-load RSS per worker, and the time from
start to ready. Last line: one JSON object with run_over_floor_p50_ms,
engine_over_in_process_p50_ratio, calibration_ms, runs_per_s_c8, p99_over_p50_c16,
gc_pause_max_ms, rss_mb_per_worker, ready_s.
With ``--otel on``, a second engine exporting every span (sampling 100 %) over OTLP/HTTP to
a receiver in this process (bench/tracing.py's) takes its turns next to the first, which
exports nothing: its p50/p99 at c1 and requests/s at c8 are printed beside it with the
ratios, and the JSON gains ``otel_p50_ratio``, ``otel_added_p50_ms``, ``otel_rps_c8_ratio``,
``otel_engine_p50_ms``, ``otel_runs_per_s_c8`` and ``otel_exports`` (every other key is the
untraced engine's, as without the option).
Targets: ≤ 2 ms over the floor at p50; engine p50 ≤ 2.5 × in-process; ≥ 300 runs/s at c8;
p99 ≤ 4 × p50 at c16; GC
pauses ≤ 30 ms; ≤ 150 MB per worker; ready ≤ 3 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import (
    Client,
    blocks_ms,
    calibration_ms,
    children,
    free_port,
    median_of_rounds,
    pct,
    rss_mb,
    server,
    timed_ms,
    wrk,
)
from engine_core import FLOW, QUESTION
from tracing import Receiver, export_env

from flow_engine.components import default_registry
from flow_engine.flows.compile import CompileCache, compile_flow
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.validate import validate_flow
from flow_engine.runs.runner import RunInput, run

KEY = "bench-key"
BODY = {"input_value": QUESTION}


def metric_value(text: bytes, name: str) -> float:
    """The largest sample of ``name`` in a Prometheus text exposition."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
              if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{")]
    return max(values, default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--otel", choices=("off", "on"), default="off",
                        help="on: also an engine exporting every span, measured beside it")
    args = parser.parse_args()
    python = sys.executable
    engine_port, floor_port, traced_port = free_port(), free_port(), free_port()
    db = Path(tempfile.mkdtemp()) / "bench.db"
    engine_cmd = [python, "-m", "flowgate.cli", "engine", "--port", str(engine_port)]
    floor_cmd = [python, str(Path(__file__).resolve().parent / "floor_app.py"),
                 "--port", str(floor_port)]
    # Two workers, one per core, as a deployment with REDIS_URL runs (without it the default
    # is one worker so that run events stay watchable; see flow_engine/gunicorn_conf.py).
    env = {"FLOW_ENGINE_API_KEYS": KEY, "DATABASE_URL": f"sqlite:///{db}",
           "FLOW_ENGINE_WORKERS": "2"}

    receiver = Receiver() if args.otel == "on" else None

    with server(engine_cmd, engine_port, "/readyz", env) as (engine_proc, ready_s), \
            server(floor_cmd, floor_port, "/readyz") as (_floor_proc, _), \
            traced_engine(receiver, python, traced_port, env, db) as traced:
        engine = Client(engine_port, {"Authorization": f"Bearer {KEY}"})
        floor = Client(floor_port)
        status, text = engine.post("/api/v1/flows", FLOW)
        assert status == 201, text
        workers = children(engine_proc.pid)
        idle_rss = [rss_mb(p) for p in workers]

        registry = default_registry()
        version = FlowVersion("bench-rag", 1, validate_flow(FLOW, registry))
        cache = CompileCache()

        def in_process():
            compiled = cache.get_or_compile(version.key, lambda: compile_flow(version, registry))
            return run(compiled, RunInput(QUESTION))

        def engine_call():
            status, data = engine.post("/api/v1/run/bench-rag", BODY)
            assert status == 200, data

        def floor_call():
            status, data = floor.post("/api/v1/run/bench-rag", BODY)
            assert status == 200, data

        http_calls = {"floor": floor_call, "engine": engine_call}
        if traced is not None:
            http_calls["engine_otel"] = traced
        for _ in range(200):  # warm every worker's compile cache and connections
            for call in (*http_calls.values(), in_process):
                call()
        calibration = calibration_ms()
        # the two HTTP paths take turns in blocks of 20 calls; the in-process runs get their
        # own batch each round (run in this process, they leave its threads busy for a
        # moment, which would tax the HTTP calls right after them); figures are medians
        # over rounds
        rounds: dict[str, list[list[float]]] = {name: [] for name in (*http_calls, "in_process")}
        for _ in range(args.rounds):
            http = blocks_ms(http_calls, 1, args.per_round)
            for name in http_calls:
                rounds[name] += http[name]
            rounds["in_process"].append(timed_ms(in_process, args.per_round))
        lat = {name: [ms for r in by_round for ms in r] for name, by_round in rounds.items()}
        over_in_process = median_of_rounds(rounds["engine"], rounds["in_process"], ratio=True)
        over_floor = median_of_rounds(rounds["engine"], rounds["floor"], ratio=False)

        headers = {"Authorization": f"Bearer {KEY}"}
        floor_c8 = wrk(f"http://127.0.0.1:{floor_port}/api/v1/run/bench-rag", BODY, {},
                       connections=8, seconds=args.seconds)
        engine_c8 = wrk(f"http://127.0.0.1:{engine_port}/api/v1/run/bench-rag", BODY, headers,
                        connections=8, seconds=args.seconds)
        floor_c16 = wrk(f"http://127.0.0.1:{floor_port}/api/v1/run/bench-rag", BODY, {},
                        connections=16, seconds=args.seconds)
        engine_c16 = wrk(f"http://127.0.0.1:{engine_port}/api/v1/run/bench-rag", BODY, headers,
                         connections=16, seconds=args.seconds)
        otel_c8 = None
        if traced is not None:  # then the untraced engine again: drift hits both alike
            otel_c8 = wrk(f"http://127.0.0.1:{traced_port}/api/v1/run/bench-rag", BODY, headers,
                          connections=8, seconds=args.seconds)
            again = wrk(f"http://127.0.0.1:{engine_port}/api/v1/run/bench-rag", BODY, headers,
                        connections=8, seconds=args.seconds)
            otel_c8["off_rps"] = (engine_c8["rps"] + again["rps"]) / 2
        scrape = Client(engine_port).get("/metrics")[1]  # a new connection: the old one idled out
        gc_pause_max_ms = 1000 * metric_value(scrape, "flowgate_engine_gc_pause_max_seconds")
        for line in scrape.decode().splitlines():
            if line.startswith("flowgate_engine_gc_pause_seconds_bucket") and 'generation="2"' in line:
                print(line)
        loaded_rss = [rss_mb(p) for p in children(engine_proc.pid)]

    p50 = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: pct(v, 99) for k, v in lat.items()}
    print(f"{'concurrency 1':<28}{'p50 ms':>10}{'p99 ms':>10}")
    for name in ("floor", "in_process", "engine"):
        print(f"  {name:<26}{p50[name]:>10.3f}{p99[name]:>10.3f}")
    print(f"  engine over floor (p50)   {over_floor:>10.3f}   (target ≤ 2 ms; median of "
          f"{args.rounds} rounds)")
    print(f"  engine / in-process (p50) {over_in_process:>10.2f}   (target ≤ 2.5; median of "
          f"{args.rounds} rounds)")
    print(f"calibration loop {calibration:.1f} ms (this machine's pace during the run)")
    print("concurrency 8 (wrk)")
    for name, r in (("floor", floor_c8), ("engine", engine_c8)):
        print(f"  {name:<10}{r['rps']:>9.0f} req/s   p50 {r['p50_ms']:.2f} ms   p99 "
              f"{r['p99_ms']:.2f} ms   errors {r['non_2xx'] + r['socket_errors'] + r['timeouts']}")
    print(f"  engine/floor throughput   {engine_c8['rps'] / floor_c8['rps']:.2f}   "
          "(target ≥ 300 runs/s)")
    print("concurrency 16 (wrk)")
    for name, r in (("floor", floor_c16), ("engine", engine_c16)):
        print(f"  {name:<10}{r['rps']:>9.0f} req/s   p50 {r['p50_ms']:.2f} ms   p99 "
              f"{r['p99_ms']:.2f} ms   p99/p50 {r['p99_ms'] / r['p50_ms']:.1f}")
    print(f"  engine p99/p50            {engine_c16['p99_ms'] / engine_c16['p50_ms']:>6.1f}   (target ≤ 4)")
    print(f"longest GC pause in a worker {gc_pause_max_ms:.1f} ms (target ≤ 30)")
    print(f"workers {len(workers)}; RSS per worker idle {max(idle_rss):.0f} MB, after load "
          f"{max(loaded_rss):.0f} MB (target ≤ 150)")
    print(f"ready after {ready_s:.2f} s (target ≤ 3 s)")
    otel = {}
    if otel_c8 is not None and receiver is not None:
        otel = otel_figures(rounds, p50, p99, otel_c8, receiver)
    print(json.dumps({
        "run_over_floor_p50_ms": round(over_floor, 3),
        "engine_over_in_process_p50_ratio": round(over_in_process, 2),
        "calibration_ms": round(calibration, 2),
        "engine_p50_ms": round(p50["engine"], 3), "engine_p99_ms": round(p99["engine"], 3),
        "floor_p50_ms": round(p50["floor"], 3), "floor_p99_ms": round(p99["floor"], 3),
        "in_process_p50_ms": round(p50["in_process"], 3),
        "runs_per_s_c8": round(engine_c8["rps"], 1), "floor_rps_c8": round(floor_c8["rps"], 1),
        "p99_over_p50_c8": round(engine_c8["p99_ms"] / engine_c8["p50_ms"], 2),
        "p99_over_p50_c16": round(engine_c16["p99_ms"] / engine_c16["p50_ms"], 2),
        "floor_p99_over_p50_c16": round(floor_c16["p99_ms"] / floor_c16["p50_ms"], 2),
        "gc_pause_max_ms": round(gc_pause_max_ms, 2),
        "engine_errors_c8": engine_c8["non_2xx"] + engine_c8["socket_errors"] + engine_c8["timeouts"],
        "rss_mb_per_worker": round(max(loaded_rss), 1), "rss_mb_per_worker_idle": round(max(idle_rss), 1),
        "workers": len(workers), "ready_s": round(ready_s, 2), **otel,
    }))


@contextmanager
def traced_engine(receiver: Receiver | None, python: str, port: int, env: dict[str, str],
                  db: Path) -> Iterator[Callable[[], None] | None]:
    """With a receiver, an engine like the first exporting every span to it (its own
    SQLite file, the flow created): yields its run call. Without one: None."""
    if receiver is None:
        yield None
        return
    cmd = [python, "-m", "flowgate.cli", "engine", "--port", str(port)]
    traced_env = {**env, "DATABASE_URL": f"sqlite:///{db.with_name('traced.db')}",
                  **export_env(receiver)}
    with server(cmd, port, "/readyz", traced_env):
        client = Client(port, {"Authorization": f"Bearer {KEY}"})
        status, text = client.post("/api/v1/flows", FLOW)
        assert status == 201, text

        def call() -> None:
            status, data = client.post("/api/v1/run/bench-rag", BODY)
            assert status == 200, data

        yield call


def otel_figures(rounds: dict[str, list[list[float]]], p50: dict[str, float],
                 p99: dict[str, float], otel_c8: dict, receiver: Receiver) -> dict[str, float]:
    """Print the traced engine beside the untraced one; its keys of the JSON line."""
    ratio = median_of_rounds(rounds["engine_otel"], rounds["engine"], ratio=True)
    added = median_of_rounds(rounds["engine_otel"], rounds["engine"], ratio=False)
    rps_ratio = otel_c8["rps"] / otel_c8["off_rps"]
    print("OpenTelemetry export (100 % sampled, OTLP/HTTP to a local receiver) vs none")
    print(f"  {'':<26}{'p50 ms':>10}{'p99 ms':>10}{'c8 req/s':>10}")
    print(f"  {'engine, export off':<26}{p50['engine']:>10.3f}{p99['engine']:>10.3f}"
          f"{otel_c8['off_rps']:>10.0f}")
    print(f"  {'engine, export on':<26}{p50['engine_otel']:>10.3f}{p99['engine_otel']:>10.3f}"
          f"{otel_c8['rps']:>10.0f}")
    print(f"  on/off: p50 {ratio:.2f}x ({added:+.3f} ms), c8 throughput {rps_ratio:.2f}x; "
          f"the receiver took {receiver.requests} exports, {receiver.bytes / 1e6:.1f} MB")
    return {"otel_p50_ratio": round(ratio, 3), "otel_added_p50_ms": round(added, 3),
            "otel_rps_c8_ratio": round(rps_ratio, 3),
            "otel_engine_p50_ms": round(p50["engine_otel"], 3),
            "otel_runs_per_s_c8": round(otel_c8["rps"], 1), "otel_exports": receiver.requests}


if __name__ == "__main__":
    main()
