"""What exporting spans costs: the same engine and ambassador with OpenTelemetry off (no
OTEL_* variables), on for 10 % of requests (what deploy/k8s ships) and on for every request,
spans sent over OTLP/HTTP to a receiver in this process, side by side in one run.

    .venv/bin/python bench/tracing.py [--rounds 5] [--per-round 200] [--seconds 4]

Three engines (2 gevent workers each, SQLite) and an ambassador in front of each; the flow
is the 5-node echo flow of bench/engine_core.py (8 engine spans a request: the request, the
run, 5 nodes, the LLM call; 2 ambassador spans). Reports p50/p99 at concurrency 1
(interleaved in slices of 25 requests, every path alike) and requests/s at concurrency 8
(wrk, modes alternating); then the engine's CPU per run request in this process (its WSGI
app, no sockets: the spans' own cost) with tracing unset, set but sampling nothing, 10 % and
100 %; and what the receiver took. Last line: one JSON object with the ratios to "off".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import Client, free_port, pct, server, timed_ms, wrk
from engine_core import FLOW, QUESTION

KEY = "bench-key"


class Receiver:
    """An OTLP/HTTP endpoint that takes every export (counts requests and bytes only: a
    collector's own cost is not the services')."""

    def __init__(self) -> None:
        self.requests = self.bytes = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests += 1
                receiver.bytes += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def export_env(receiver: Receiver) -> dict[str, str]:
    """A service's environment exporting every span (100 %) to ``receiver``; the other
    benchmarks' ``--otel on`` runs a service so, next to one without."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_TRACES_SAMPLER": "always_on"}


def in_process_cpu(receiver: Receiver, rounds: int, per_round: int) -> dict[str, float]:
    """CPU milliseconds per run request through the engine's WSGI app in this process (no
    sockets, no other process on the cores: the spans' own cost, exporting included), for
    tracing unset, set but sampling nothing, 10 % and every request; interleaved rounds."""
    import os
    import time

    from prometheus_client import CollectorRegistry

    from flow_engine.app import create_app
    from flow_engine.metrics import EngineMetrics

    modes = {"off": {}, "unsampled": {"OTEL_TRACES_SAMPLER": "always_off"},
             "sampled10": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
             "on": {"OTEL_TRACES_SAMPLER": "always_on"}}
    clients, auth = {}, {"Authorization": f"Bearer {KEY}"}
    for mode, env in modes.items():
        names = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"]
        saved = {n: os.environ.pop(n, None) for n in names}
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **env} if env else {})
        try:
            app = create_app({"database_url": f"sqlite:///{tempfile.mkdtemp()}/cpu.db",
                              "api_keys": [KEY], "maintenance_interval_s": 0,
                              "rollout_interval_s": 0, "log_level": "WARNING"},
                             metrics=EngineMetrics(CollectorRegistry()))
        finally:
            for n in names:
                os.environ.pop(n, None)
                if saved[n] is not None:
                    os.environ[n] = saved[n]
        client = app.test_client()
        assert client.post("/api/v1/flows", json=FLOW, headers=auth).status_code == 201
        clients[mode] = client

    def run(client) -> None:
        resp = client.post("/api/v1/run/bench-rag", json={"input_value": QUESTION}, headers=auth)
        resp.close()
        assert resp.status_code == 200

    for client in clients.values():
        for _ in range(100):
            run(client)
    spent = dict.fromkeys(modes, 0.0)
    for _ in range(rounds):
        for mode, client in clients.items():
            started = time.process_time()  # this process: every thread, the exporters' too
            for _ in range(per_round):
                run(client)
            spent[mode] += time.process_time() - started
    return {mode: 1000 * seconds / (rounds * per_round) for mode, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    receiver = Receiver()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    python = sys.executable
    export = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    tracing = {"off": {},
               "sampled10": {**export, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                             "OTEL_TRACES_SAMPLER_ARG": "0.1"},
               "on": export_env(receiver)}
    ports = {mode: (free_port(), free_port()) for mode in tracing}
    servers = []
    for mode, (engine_port, amb_port) in ports.items():
        config = tmp / f"ambassador-{mode}.yaml"
        config.write_text(json.dumps({"upstream": {"url": f"http://127.0.0.1:{engine_port}",
                                                   "key": KEY},
                                      "inbound_auth": {"mode": "none"}}))
        servers.append(([python, "-m", "flowgate.cli", "engine", "--port", str(engine_port)],
                        engine_port, {"FLOW_ENGINE_API_KEYS": KEY, "REDIS_URL": "",
                                      "DATABASE_URL": f"sqlite:///{tmp / f'{mode}.db'}",
                                      "FLOW_ENGINE_WORKERS": "2", **tracing[mode]}))
        servers.append(([python, "-m", "flowgate.cli", "ambassador", "--port", str(amb_port),
                         "--config", str(config)], amb_port,
                        {"REDIS_URL": "", "AMBASSADOR_UPSTREAM_URL": "",
                         "AMBASSADOR_UPSTREAM_KEY": "", **tracing[mode]}))
    contexts = [server(cmd, port, "/readyz", env) for cmd, port, env in servers]
    for ctx in contexts:
        ctx.__enter__()
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        calls = {}
        for mode, (engine_port, amb_port) in ports.items():
            engine, amb = Client(engine_port, auth), Client(amb_port)
            status, text = engine.post("/api/v1/flows", FLOW)
            assert status == 201, text

            def direct(engine=engine):
                status, data = engine.post("/api/v1/run/bench-rag", {"input_value": QUESTION})
                assert status == 200, data

            def proxied(amb=amb):
                status, data = amb.post("/run-flow", {"flow_id": "bench-rag", "input": QUESTION,
                                                      "session_id": "no-cache"})
                assert status == 200, data

            calls[f"engine_{mode}"], calls[f"ambassador_{mode}"] = direct, proxied
        for _ in range(200):  # warm both workers, the compile caches and the exporters
            for call in calls.values():
                call()
        lat = {name: [] for name in calls}
        for _ in range(args.rounds * args.per_round // 25):  # no connection idles out
            for name, call in calls.items():
                lat[name] += timed_ms(call, 25)
        c8 = {name: [] for name in calls}
        for _ in range(2):  # alternate off and on: drift hits both
            for mode, (engine_port, amb_port) in ports.items():
                c8[f"engine_{mode}"].append(wrk(
                    f"http://127.0.0.1:{engine_port}/api/v1/run/bench-rag",
                    {"input_value": QUESTION}, auth, connections=8, seconds=args.seconds)["rps"])
                c8[f"ambassador_{mode}"].append(wrk(
                    f"http://127.0.0.1:{amb_port}/run-flow",
                    {"flow_id": "bench-rag", "input": QUESTION, "session_id": "no-cache"}, {},
                    connections=8, seconds=args.seconds)["rps"])
    finally:
        for ctx in reversed(contexts):
            ctx.__exit__(None, None, None)

    p50 = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: pct(v, 99) for k, v in lat.items()}
    rps = {k: statistics.mean(v) for k, v in c8.items()}
    print(f"{'concurrency 1':<26}{'p50 ms':>10}{'p99 ms':>10}{'c8 req/s':>10}")
    for name in lat:
        print(f"  {name:<24}{p50[name]:>10.3f}{p99[name]:>10.3f}{rps[name]:>10.0f}")
    result = {}
    for path in ("engine", "ambassador"):
        off = f"{path}_off"
        for mode in ("sampled10", "on"):
            on = f"{path}_{mode}"
            result[f"{path}_{mode}_p50_added_ms"] = round(p50[on] - p50[off], 3)
            result[f"{path}_{mode}_c8_rps_ratio"] = round(rps[on] / rps[off], 3)
            print(f"{path} {mode:<9}: p50 {p50[on] - p50[off]:+.3f} ms "
                  f"({p50[on] / p50[off]:.2f}x), c8 throughput {rps[on] / rps[off]:.2f}x of off")
    cpu = in_process_cpu(receiver, args.rounds, args.per_round)
    print("engine CPU per run request, in process:  " + "   ".join(
        f"{mode} {ms:.3f} ms" for mode, ms in cpu.items()))
    for mode in ("unsampled", "sampled10", "on"):
        result[f"engine_cpu_{mode}_over_off"] = round(cpu[mode] / cpu["off"], 3)
    print(f"receiver took {receiver.requests} exports, {receiver.bytes / 1e6:.1f} MB")
    result["exports"] = receiver.requests
    print(json.dumps(result))


if __name__ == "__main__":
    main()
