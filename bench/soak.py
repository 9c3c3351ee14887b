"""Soak: a steady mixed load through the ambassador for --minutes (30), with a fault every
--fault-every seconds (60) rotating through the chaos drills of tests/chaos.

    .venv/bin/python bench/soak.py [--minutes 30] [--fault-every 60] [--rate 10]
                                   [--warmup-s 120] [--warmup-requests 0] [--event-ttl-s 60]

The deployment is the drills' (tests/support/chaos.py): its own llm-sim, the engine with two
gevent workers on PostgreSQL (a fresh schema of FLOWGATE_TEST_POSTGRES_URL, default the
local server) and a private redis-server, the ambassador in front. The load is runs, streams
and cache hits (60/20/20), each run with its own Idempotency-Key. Faults, in turn:

    engine-kill      SIGKILL of the engine (master and workers), restart
    redis-kill       SIGKILL of Redis; back after 40 answers
    pg-terminate     pg_terminate_backend of every engine connection
    publish          10 publishes, canaries and rollbacks of the flow being run
    stream-resume    5 streamed runs, each dropped and resumed 5 times with Last-Event-ID
    publish-kill     kill -9 of the engine during a burst of publishes; store checked after
    slow-loris       200 slow-loris connections for 15 s

The load first runs for a warm-up without faults (--warmup-s, or --warmup-requests answers
if that comes first): imports, compile caches, connection pools and allocator arenas fill
then, and would otherwise count as growth. The RSS baseline is taken after it (a process
restarted by a fault gets a new baseline once it has served --warmup-requests answers, or
50), then --minutes of load with faults.

Redis's memory is the data it is told to keep: each finished run's events stay there for
``FLOW_ENGINE_EVENT_TTL_S`` (3600 s by default), so under a steady load it grows for that long
and then stays level. The soak sets it to --event-ttl-s (60 s, within the warm-up) so that
Redis is at its steady state when the baseline is taken and its growth means what the
others' does. Its key census (keys by family, ``used_memory``, keys expired) is printed at the
baseline and at the end: a family that keeps growing is a key without a TTL. The bytes per
retained run (``redis_bytes_per_run``) size a production Redis: runs per second x
FLOW_ENGINE_EVENT_TTL_S x that (docs/configuration.md, "Sizing Redis").

Each minute a progress line; at the end requests, failures by kind, p50/p99, the RSS of
every process at start, after the warm-up and at the end, with each one's growth since its
baseline in MB and %, and as the last line one JSON object: ``lost`` (requests without an
answer), ``duplicated`` (LLM calls made twice for one request), ``bad_5xx`` (5xx outside
502/503/504), ``late`` (answers past the ambassador's deadline), ``rss_growth_mb``,
``rss_growth_pct`` (the largest growth of one process, in % of its baseline) and the rest.
Targets: lost, duplicated, bad_5xx, late all 0; rss_growth_pct at most 10.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.chaos import (
    FLOW_ID,
    LlmCalls,
    Load,
    Outcome,
    Outcomes,
    Publisher,
    Sim,
    SlowLoris,
    Stack,
    admin,
    dropped_and_resumed,
    flow,
    group_rss_mb,
    missing_tools,
    new_tag,
    start_llm_sim,
    store_inconsistencies,
    verdict,
    wait_for,
)


class Soak:
    def __init__(self, stack: Stack, load: Load, outcomes: Outcomes, *, rewarm: int = 50) -> None:
        self.stack, self.load, self.outcomes = stack, load, outcomes
        self.rewarm = rewarm  # answers a restarted process serves before its new baseline
        self.notes: list[dict[str, Any]] = []
        self.extra: list[Outcome] = []  # resumed streams
        self.latest_version = 1
        self.rss_base: dict[str, float] = {}
        self.burst = 0

    def note(self, fault: str, **what: Any) -> None:
        self.notes.append({"fault": fault, **what})
        print(f"  fault {fault}: {what}", flush=True)

    def rebase(self, name: str) -> None:
        """A new RSS baseline for a restarted process, once it is warm again."""
        self.load.wait_done(self.outcomes.done() + self.rewarm, timeout_s=120)
        self.rss_base[name] = self.stack.rss_mb().get(name, 0.0)

    def rss_engine_base(self) -> None:
        self.rebase("engine")

    # -- faults
    def engine_kill(self) -> None:
        self.stack.kill_engine()
        self.load.wait_done(self.outcomes.done() + 10)
        self.stack.restart_engine()
        self.note("engine-kill", recovery_s=round(self.stack.wait_recovered(), 1))
        self.rss_engine_base()

    def redis_kill(self) -> None:
        self.stack.redis.kill()
        self.load.wait_done(self.outcomes.done() + 40)
        self.stack.redis.start()
        self.note("redis-kill", recovery_s=round(self.stack.wait_recovered(), 1))
        self.rebase("redis")

    def pg_terminate(self) -> None:
        wait_for(self.stack.pg.backends, 10, "engine connections")
        n = self.stack.pg.terminate_backends()
        self.load.wait_done(self.outcomes.done() + 10)
        self.note("pg-terminate", terminated=n, recovery_s=round(self.stack.wait_recovered(), 1))

    def publish(self) -> None:
        base = f"{self.stack.engine_url}/api/v1/flows/{FLOW_ID}"
        failed = []
        for i in range(10):
            self.load.wait_done(self.outcomes.done() + 3)
            if i % 4 == 3:
                resp = admin("POST", base + "/rollback")
            else:
                created = admin("PUT", base, flow(FLOW_ID, f"v{self.latest_version + 1}"))
                if created.status_code != 201:
                    failed.append(created.status_code)
                    continue
                self.latest_version = created.json()["version"]
                if i % 4 == 1:
                    resp = admin("PUT", base + "/routing",
                                 {"canary": {"version": self.latest_version, "percent": 50}})
                else:
                    resp = admin("POST", base + "/publish", {"version": self.latest_version})
            if resp.status_code != 200:
                failed.append(resp.status_code)
        self.note("publish", changes=10, failed=failed, latest_version=self.latest_version)

    def stream_resume(self) -> None:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(
                lambda i: dropped_and_resumed(self.stack.url, new_tag(800_000 + len(self.extra) + i),
                                              [2, 5, 8, 11, 14]), range(5)))
        self.extra += results
        self.note("stream-resume", ok=sum(r.ok for r in results),
                  resumes=sum(r.detail.get("resumes", 0) for r in results),
                  errors=[r.error for r in results if not r.ok][:3])

    def publish_kill(self) -> None:
        self.burst += 1
        flows = [f"soak-burst-{self.burst}-{c}" for c in "ab"]
        for flow_id in flows:
            admin("POST", self.stack.engine_url + "/api/v1/flows", flow(flow_id, "v1"))
        publishers = [Publisher(self.stack.engine_url, f) for f in flows]
        threads = [threading.Thread(target=p.run, daemon=True) for p in publishers]
        for t in threads:
            t.start()
        wait_for(lambda: all(p.acked() >= 3 for p in publishers), 60, "a burst of publishes")
        self.stack.kill_engine()
        for t in threads:
            t.join(30)
        self.stack.restart_engine()
        recovery = self.stack.wait_recovered()
        self.rss_engine_base()
        self.note("publish-kill", recovery_s=round(recovery, 1),
                  acked=[p.acked() for p in publishers], inconsistent=store_inconsistencies(publishers))

    def slow_loris(self) -> None:
        assert self.stack.ambassador is not None
        loris = SlowLoris(self.stack.ambassador.port, 200).start()
        try:
            self.load.wait_done(self.outcomes.done() + 160, timeout_s=60)  # ~15 s at 10/s
        finally:
            kinds = {k: dict(loris.status_of(k)) for k in ("slow_headers", "slow_body", "oversize_body")}
            loris.stop()
        self.note("slow-loris", loris=kinds)


FAULTS = ["engine_kill", "redis_kill", "pg_terminate", "publish", "stream_resume", "publish_kill",
          "slow_loris"]


def redis_census(url: str) -> dict[str, Any]:
    """What Redis holds: keys by family (the key's first two ``:``-separated parts, and
    ``:owner`` for a run's owner key), ``used_memory`` in MB and the keys expired so far."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        families: Counter[str] = Counter()
        for key in client.scan_iter(count=1000):
            name = key.decode(errors="replace")
            families[":".join(name.split(":")[:2]) + (":owner" if name.endswith(":owner") else "")] += 1
        memory, stats = client.info("memory"), client.info("stats")
    finally:
        client.close()
    return {"keys": sum(families.values()), "families": dict(families.most_common(12)),
            "used_memory_mb": round(memory["used_memory"] / 2**20, 1),
            "expired_keys": stats["expired_keys"]}


def bytes_per_run(census: dict[str, Any], empty_mb: float) -> int | None:
    """Redis bytes per run whose events it keeps (``used_memory`` above an empty Redis's,
    over the event logs held)."""
    logs = census["families"].get("flowgate:run", 0)  # a run's event stream (RedisEventLog.key)
    return round((census["used_memory_mb"] - empty_mb) * 2**20 / logs) if logs else None


def rss_all(stack: Stack, sim_proc: Any) -> dict[str, float]:
    out = stack.rss_mb()
    out["llm-sim"] = group_rss_mb(sim_proc.proc.pid)
    return out


def growth(base: dict[str, float], end: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Per process: RSS growth since its baseline in MB, and in % of that baseline."""
    mb = {name: round(end[name] - base.get(name, 0.0), 1) for name in end}
    pct = {name: round(100 * mb[name] / base[name], 1) for name in end if base.get(name)}
    return mb, pct


def warm_up(outcomes: Outcomes, seconds: float, answers: int) -> None:
    """Until the load has run ``seconds``, or (``answers`` > 0) that many requests ended."""
    started = time.monotonic()
    while time.monotonic() - started < seconds and not (answers and outcomes.done() >= answers):
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second")
    p.add_argument("--warmup-s", type=float, default=120.0,
                   help="seconds of load without faults before the RSS baseline")
    p.add_argument("--warmup-requests", type=int, default=0,
                   help="end the warm-up once this many requests were answered (0: by time)")
    p.add_argument("--event-ttl-s", type=float, default=60.0,
                   help="FLOW_ENGINE_EVENT_TTL_S of the engine: how long Redis keeps a finished "
                        "run's events (keep it within the warm-up, see above)")
    args = p.parse_args()
    problems = missing_tools()
    if problems:
        sys.exit("soak needs: " + "; ".join(problems))

    duration = args.minutes * 60
    sim_proc = start_llm_sim()
    sim = Sim(sim_proc.url)
    sim.configure(ttft_s=0.1, tokens_per_s=50, reply_tokens=8)
    workdir = Path(tempfile.mkdtemp(prefix="flowgate-soak-"))
    stack = Stack(workdir, sim, engine_env={"FLOW_ENGINE_EVENT_TTL_S": f"{args.event_ttl_s:g}"})
    outcomes = Outcomes()
    try:
        stack.start()
        rss_start = rss_all(stack, sim_proc)
        redis_empty = redis_census(stack.redis.url)
        print(f"soak: {args.minutes:g} min at {args.rate:g} req/s, a fault every "
              f"{args.fault_every:g} s; RSS at start (MB): {rss_start}", flush=True)
        calls = LlmCalls(sim).start()
        load = Load(stack, outcomes, threads=6, rate_per_s=args.rate,
                    max_requests=int((duration + args.warmup_s) * args.rate * 1.2) + 100,
                    mix={"run": 0.6, "stream": 0.2, "cached": 0.2}).start()
        soak = Soak(stack, load, outcomes, rewarm=args.warmup_requests or 50)
        warm_up(outcomes, args.warmup_s, args.warmup_requests)
        rss_warm = rss_all(stack, sim_proc)
        soak.rss_base = dict(rss_warm)
        redis_warm = redis_census(stack.redis.url)
        print(f"warm after {outcomes.done()} requests; RSS baseline (MB): {rss_warm}; "
              f"Redis holds {redis_warm}", flush=True)
        started = time.monotonic()
        next_fault, turn, last_report = args.fault_every, 0, 0
        while (elapsed := time.monotonic() - started) < duration:
            if elapsed >= next_fault:
                name = FAULTS[turn % len(FAULTS)]
                turn += 1
                try:
                    getattr(soak, name)()
                except Exception as exc:  # a fault that could not be healed is a result too
                    soak.note(name, error=f"{type(exc).__name__}: {exc}"[:300])
                    if stack.engine is None or not stack.engine.alive():
                        stack.restart_engine()
                    if not stack.redis.alive():
                        stack.redis.start()
                next_fault += args.fault_every
            if int(elapsed // 60) > last_report:
                last_report = int(elapsed // 60)
                done = outcomes.all()
                print(f"  {elapsed / 60:4.1f} min: {len(done)} requests, "
                      f"{sum(o.ok for o in done)} ok, "
                      f"{dict(Counter(str(o.status) for o in done if not o.ok))} failed", flush=True)
            time.sleep(0.2)
        load.finish_after(0)
        load.join(120)
        calls.stop()
        rss_end = rss_all(stack, sim_proc)
        redis_end = redis_census(stack.redis.url)
    finally:
        stack.stop()
        sim_proc.stop()

    everything = outcomes.all() + soak.extra
    v = verdict(everything, calls)
    by_kind = Counter(f"{o.kind} {o.status} {o.code or o.error or ''}".strip()
                      for o in everything if not o.ok)
    times = {kind: [o.seconds for o in everything if o.kind == kind and o.ok]
             for kind in ("run", "stream", "cached")}
    growth_mb, growth_pct = growth(soak.rss_base, rss_end)
    print(f"requests: {v.requests} ({dict(Counter(o.kind for o in everything))}), "
          f"ok {v.successes}")
    print(f"failures by kind: {dict(by_kind.most_common())}")
    for kind, values in times.items():
        print(f"{kind}: p50 {percentile(values, 0.5) * 1000:.0f} ms, "
              f"p99 {percentile(values, 0.99) * 1000:.0f} ms")
    print(f"RSS at start (MB): {rss_start}")
    print(f"RSS after warm-up (MB): {rss_warm}")
    print(f"RSS at end (MB): {rss_end}; baseline (MB): {soak.rss_base} (a restarted process's "
          "once it was warm again)")
    for name in rss_end:
        pct = f"{growth_pct[name]:+.1f} %" if name in growth_pct else "n/a"
        print(f"RSS growth {name}: {growth_mb[name]:+.1f} MB, {pct}")
    per_run = bytes_per_run(redis_end, redis_empty["used_memory_mb"])
    print(f"Redis after warm-up: {redis_warm}")
    print(f"Redis at end: {redis_end}; about {per_run} bytes per run it keeps events of")
    for problem in v.problems():
        print("problem:", problem)
    print(json.dumps({
        "minutes": args.minutes, "faults": len(soak.notes), "requests": v.requests,
        "successes": v.successes, "lost": len(v.lost), "duplicated": v.duplicated,
        "bad_5xx": len(v.bad_5xx), "late": len(v.late), "broken": len(v.broken),
        "failed": v.requests - v.successes, "failures_by_kind": dict(by_kind.most_common()),
        "llm_calls": v.llm_calls, "llm_log_overflowed": v.llm_overflowed,
        "p50_ms": round(v.p50_s * 1000, 1), "p99_ms": round(v.p99_s * 1000, 1),
        "p50_ms_by_kind": {k: round(percentile(t, 0.5) * 1000, 1) for k, t in times.items()},
        "p99_ms_by_kind": {k: round(percentile(t, 0.99) * 1000, 1) for k, t in times.items()},
        "rss_mb_start": rss_start, "rss_mb_warm": rss_warm, "rss_mb_baseline": soak.rss_base,
        "rss_mb_end": rss_end, "rss_growth_mb_by_process": growth_mb,
        "rss_growth_pct_by_process": growth_pct,
        "rss_growth_mb": round(sum(growth_mb.values()), 1),
        "rss_growth_pct": max(growth_pct.values(), default=0.0),
        "event_ttl_s": args.event_ttl_s, "redis_warm": redis_warm, "redis_end": redis_end,
        "redis_bytes_per_run": per_run,
        "fault_notes": soak.notes,
    }))


if __name__ == "__main__":
    main()
