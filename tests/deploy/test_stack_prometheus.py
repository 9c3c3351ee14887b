"""The Grafana dashboards and the alert rules against the running stack (issue 6, "Verified
in CI, not by eye").

``flowgate up`` (what ``make run`` runs) starts llm-sim, the engine and the ambassador on free
ports, with the ambassador config docker compose deploys (deploy/compose/ambassador.yaml:
a cached flow with a fallback, a rate-limited flow) plus inbound API keys and test-sized
limits and timeouts. A real Prometheus scrapes the engine and the ambassador every second
with the scrape jobs of deploy/prometheus/prometheus.yml (their relabelling included; only
the DNS discovery is swapped for the local targets) and loads deploy/prometheus/rules.yml.
Traffic goes through the ambassador's public API: plain and streamed runs, a cache miss and
hit, a failing run, a fallback answer, a retry after a per-try timeout (answered from the
engine's idempotency record), a 404, a 401, a 429 and a client that leaves a stream early.

Then every dashboard query is sent to Prometheus's HTTP API with Grafana's variables
resolved twice — set to All (``.*``) and set to every value Prometheus lists for them — and
must parse; every panel must show data (a finite value from at least one of its queries);
every metric a panel or rule names must have series in Prometheus, i.e. be exported by a
scraped service; every rule expression must evaluate, and Prometheus must have loaded and
evaluated every rule without error. Beyond "has data": the panels that chart what the
traffic did (a retry, a cache hit, a client leaving a stream, ...) must show it above 0, and
the gauges must be back at idle once the traffic is over.

Last, the keys ``flowgate up`` hands out (issue 10): the CLI's admin key in a 0600 file, the
ambassador's processes holding only the runner+proxy key (read from /proc), and the engine
refusing to publish with that key.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support.procs import free_port
from support.prom import metric_value
from support.waiting import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
DASHBOARD_FILES = ("ambassador.json", "flow-engine.json")
COMPOSE_AMBASSADOR = REPO / "deploy" / "compose" / "ambassador.yaml"

SCRAPE_INTERVAL_S = 1
# Grafana's built-in interval variables. $__rate_interval is at least 4 scrape intervals:
# with the deployed 15 s scrape interval that is 1m, which also covers all of this test's traffic.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m",
                     "__range_s": "300", "__range_ms": "300000"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
METRIC = re.compile(r"\bflowgate_[a-z0-9_]+\b")

# Labelled metrics that have no series until their event happens, and which this test cannot
# cause through the public API. Any other metric without series fails the panel that names it.
QUIET = {
    "flowgate_ambassador_cache_errors_total":
        "counted when the shared (Redis) cache store fails; `flowgate up` uses the in-memory store",
    "flowgate_engine_ws_rejected_total":
        "counted when a worker refuses a WebSocket past FLOW_ENGINE_WS_MAX_CONNECTIONS (500)",
    "flowgate_ambassador_faults_injected_total":
        "counted only during a fault drill (docs/production.md, \"Fault drills\"; "
        "tests/integration/test_ambassador_faults.py); the stack here runs none",
}

APP_KEY = "stack-test-app-key-0001"
APP = {"x-api-key": APP_KEY}
PER_TRY_S = 3.0  # the ambassador's per-try timeout; a run slower than this is retried
SLOW_TTFT_S = 3.5  # the LLM's time to first token while the retry is provoked
STARTUP_S = 60
# Environment that would change what `flowgate up` starts or where its metrics go.
FOREIGN_ENV = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR",
               "AMBASSADOR_UPSTREAM_URL", "AMBASSADOR_UPSTREAM_KEY", "FLOW_ENGINE_API_KEYS",
               "FLOW_ENGINE_API_KEY_FILE", "FLOW_ENGINE_INSECURE_NO_AUTH")


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    return wait_until(check, what, timeout_s, interval_s)  # a stalled machine gets its time back


# -- the deployment files --------------------------------------------------------------------

def load_dashboard(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text(encoding="utf-8"))


def data_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return panels


def query_variables(dashboard: dict) -> list[dict]:
    return [v for v in dashboard["templating"]["list"] if v["type"] == "query"]


def variable_query(variable: dict) -> tuple[str, str]:
    """(series selector, label) of a ``label_values(selector, label)`` variable."""
    query = variable["query"]
    query = query["query"] if isinstance(query, dict) else query
    found = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
    assert found, f"variable {variable['name']}: {query!r} is not label_values(selector, label)"
    return found.group(1), found.group(2)


def rules() -> list[dict]:
    data = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def rule_name(rule: dict) -> str:
    return rule.get("alert") or rule["record"]


def resolve(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables in ``expr`` replaced: built-in intervals by GRAFANA_INTERVALS,
    dashboard variables by ``values``. A variable the dashboard does not define fails."""
    def sub(found: re.Match[str]) -> str:
        name = found.group(1) or found.group(2) or found.group(3)
        if name in GRAFANA_INTERVALS:
            return GRAFANA_INTERVALS[name]
        if name not in values:
            raise KeyError(name)
        return values[name]

    try:
        return VARIABLE.sub(sub, expr)
    except KeyError as exc:
        pytest.fail(f"{expr}\nuses the variable ${exc.args[0]}, which the dashboard does not define "
                    f"(it has {sorted(values)})", pytrace=False)


def as_regex(values: list[str]) -> str:
    """A multi-value selection as Grafana formats it for a Prometheus regex matcher."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


# The run-time tweak the traffic uses to make a run fail (see `traffic`). Tweaks are opt-in
# per flow ("tweakable" in the definition); the demo flows open none, so the stack gets
# copies of them that open exactly these.
FAILING_TWEAK = {"llm": {"timeout": 0.001, "max_retries": 0}}  # the LLM call times out
TWEAKED_FLOWS = ("chat", "faq-rag")


def demo_flows(folder: Path) -> Path:
    """examples/*.json, with FAILING_TWEAK's params made tweakable in TWEAKED_FLOWS."""
    folder.mkdir()
    for path in sorted((REPO / "examples").glob("*.json")):
        flow = json.loads(path.read_text(encoding="utf-8"))
        if flow["id"] in TWEAKED_FLOWS:
            flow["tweakable"] = {node: sorted(params) for node, params in FAILING_TWEAK.items()}
        (folder / path.name).write_text(json.dumps(flow), encoding="utf-8")
    return folder


def ambassador_config() -> dict:
    """The compose sidecar config, with inbound API keys, a rate limit that three requests
    exceed, and timeouts short enough for a test."""
    config = yaml.safe_load(COMPOSE_AMBASSADOR.read_text(encoding="utf-8"))
    config["upstream"].pop("url", None)  # `flowgate up` sets AMBASSADOR_UPSTREAM_URL
    config["upstream"]["timeouts"].update(per_try_s=PER_TRY_S, total_s=20)
    config["inbound_auth"] = {"mode": "api_keys", "api_keys": [{"key": APP_KEY, "identity": "stack-test"}]}
    assert config["flows"]["faq-rag"]["cache"] and config["flows"]["faq-rag"]["fallback"], \
        "the compose config no longer caches faq-rag with a fallback; adapt this test's traffic"
    config["flows"]["support-router"]["ratelimit"] = {"requests_per_s": 0.01, "burst": 2}
    return config


def prometheus_config(ports: dict[int, int], rules_file: Path) -> tuple[dict, dict[str, int]]:
    """deploy/prometheus/prometheus.yml with a 1 s interval, DNS discovery swapped for static
    local targets (keeping ``__meta_dns_name`` so the relabelling sets ``app`` and ``pod`` as
    in compose), and ``ports`` mapping each deployed port to the local one."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"].update(scrape_interval=f"{SCRAPE_INTERVAL_S}s", scrape_timeout=f"{SCRAPE_INTERVAL_S}s",
                            evaluation_interval=f"{SCRAPE_INTERVAL_S}s")
    assert config["rule_files"] == ["rules.yml"], config["rule_files"]
    config["rule_files"] = [str(rules_file)]
    jobs = {}
    for job in config["scrape_configs"]:
        (sd,) = job.pop("dns_sd_configs")
        assert sd["port"] in ports, f"job {job['job_name']}: no local service for port {sd['port']}"
        port = ports[sd["port"]]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"], "labels": {"__meta_dns_name": name}}
                                 for name in sd["names"]]
        jobs[job["job_name"]] = port
    return config, jobs


# -- the stack, Prometheus, traffic ----------------------------------------------------------

@dataclass
class Stack:
    ambassador: str
    engine: str
    llm: str
    prometheus: str
    jobs: dict[str, int]  # scrape job → local port
    up: Any  # conftest.Background: `flowgate up`
    log_dir: Path

    def logs(self) -> str:
        tails = []
        for log in sorted(self.log_dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {log.name} (tail)\n" + "\n".join(lines))
        return "\n".join(tails)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, processes) -> Iterator[Stack]:
    prometheus_bin = processes.tool("prometheus", "apt-get install prometheus (the Prometheus server)")
    tmp = tmp_path_factory.mktemp("stack")
    amb, eng, llm, prom = (free_port() for _ in range(4))
    config_file = tmp / "ambassador.yaml"
    config_file.write_text(yaml.safe_dump(ambassador_config()), encoding="utf-8")
    rules_file = tmp / "rules.yml"
    rules_file.write_bytes((PROMETHEUS_DIR / "rules.yml").read_bytes())
    prom_config, jobs = prometheus_config({8000: eng, 8080: amb}, rules_file)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_config), encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(AMBASSADOR_CONFIG=str(config_file), PYTHONUNBUFFERED="1")
    started = []
    try:
        prometheus = processes.start(
            [prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom}"], cwd=tmp, env=env, log=tmp / "prometheus.out")
        started.append(prometheus)
        up = processes.start([sys.executable, "-m", "flowgate.cli", "up", "--ambassador-port", str(amb),
                              "--engine-port", str(eng), "--llm-port", str(llm),
                              "--examples", str(demo_flows(tmp / "examples"))],
                             cwd=tmp, env=env, log=tmp / "flowgate-up.out")
        started.append(up)
        up.wait_for_output(r"^Flowgate is up\.", STARTUP_S)
        prometheus.wait_for_output(r"Server is ready to receive web requests", 30)
        yield Stack(f"http://127.0.0.1:{amb}", f"http://127.0.0.1:{eng}", f"http://127.0.0.1:{llm}",
                    f"http://127.0.0.1:{prom}", jobs, up, tmp / ".flowgate")
    finally:
        for proc in reversed(started):
            proc.interrupt(40)
            proc.kill()  # whatever did not stop


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: Any) -> dict:
        resp = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        try:
            return resp.json()
        except ValueError:
            return {"status": "error", "errorType": f"HTTP {resp.status_code}", "error": resp.text[:500]}

    def query(self, expr: str, at: float | None = None) -> dict:
        return self.api("query", query=expr, **({"time": f"{at:.3f}"} if at else {}))

    def targets(self) -> list[dict]:
        return requests.get(f"{self.url}/api/v1/targets", params={"state": "active"},
                            timeout=10).json()["data"]["activeTargets"]

    def last_scrape(self, job: str) -> float:
        result = self.query(f'timestamp(up{{job="{job}"}} == 1)').get("data", {}).get("result", [])
        return max((float(r["value"][1]) for r in result), default=0.0)


def post_run(stack: Stack, body: dict, headers: dict | None = None) -> dict:
    t0 = time.monotonic()
    resp = requests.post(f"{stack.ambassador}/run-flow", json=body,
                         headers=APP if headers is None else headers, timeout=30)
    try:
        data = resp.json()
    except ValueError:
        data = {"not json": resp.text[:300]}
    return {"status": resp.status_code, "headers": dict(resp.headers), "body": data,
            "seconds": round(time.monotonic() - t0, 2)}


def stream_run(stack: Stack, body: dict, leave_after: int | None = None) -> dict:
    """Event types of a streamed run; ``leave_after`` token events: hang up early."""
    events: list[str] = []
    with requests.post(f"{stack.ambassador}/run-flow", json={**body, "stream": True}, headers=APP,
                       stream=True, timeout=30) as resp:
        for line in resp.iter_lines(decode_unicode=True):
            if line and line.startswith("event:"):
                events.append(line.partition(":")[2].strip())
                if leave_after is not None and events.count("token") >= leave_after:
                    break
        return {"status": resp.status_code, "content_type": resp.headers.get("Content-Type", ""),
                "events": events}


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Prometheus:
    prom = Prometheus(stack.prometheus)

    def both_up() -> bool | list:
        health = {t["labels"]["job"]: t["health"] for t in prom.targets()}
        return all(health.get(job) == "up" for job in stack.jobs) or health

    wait_for(both_up, 20, f"Prometheus scraping jobs {sorted(stack.jobs)} at {stack.prometheus}")
    return prom


@pytest.fixture(scope="module")
def traffic(stack: Stack, prometheus: Prometheus) -> dict[str, Any]:
    """Requests through the ambassador while Prometheus scrapes; returns what came back.
    Nothing is asserted here (test_traffic_went_as_planned does): a surprise in one answer
    must not hide what the dashboards show."""
    r: dict[str, Any] = {}
    r["rollout"] = guarded_canary(stack, prometheus)
    slow_llm = FAILING_TWEAK  # the LLM call times out: the run fails
    plan = {
        "faq_miss": lambda: post_run(stack, {"flow_id": "faq-rag", "input": "How long do refunds take?"}),
        "chat": lambda: post_run(stack, {"flow_id": "chat", "input": "Hello there"}),
        "router_1": lambda: post_run(stack, {"flow_id": "support-router", "input": "I want my money back"}),
        "router_2": lambda: post_run(stack, {"flow_id": "support-router", "input": "Do you sell hats?"}),
        "router_3": lambda: post_run(stack, {"flow_id": "support-router", "input": "Where is my parcel?"}),
        "stream_faq": lambda: stream_run(stack, {"flow_id": "faq-rag", "input": "Is shipping free?"}),
        "stream_chat": lambda: stream_run(stack, {"flow_id": "chat", "input": "Tell me a story"}),
        "failed": lambda: post_run(stack, {"flow_id": "chat", "input": "fail", "tweaks": slow_llm}),
        "fallback": lambda: post_run(stack, {"flow_id": "faq-rag", "input": "fail", "tweaks": slow_llm}),
        "unknown_flow": lambda: post_run(stack, {"flow_id": "no-such-flow", "input": "x"}),
        "no_key": lambda: post_run(stack, {"flow_id": "chat", "input": "x"}, headers={}),
    }
    with concurrent.futures.ThreadPoolExecutor(len(plan)) as pool:
        futures = {name: pool.submit(call) for name, call in plan.items()}
        for name, future in futures.items():
            try:
                r[name] = future.result(timeout=60)
            except Exception as exc:  # recorded, asserted by test_traffic_went_as_planned
                r[name] = {"exception": repr(exc)}
    r["faq_hit"] = post_run(stack, {"flow_id": "faq-rag", "input": "How long do refunds take?"})

    sim = requests.get(f"{stack.llm}/sim/config", timeout=5).json()

    # A stream's series (by flow) is born at its first observation, an increase Prometheus
    # cannot show: let it scrape chat's before the next chat stream (the one left early) adds
    # to it, or the Stream duration panel shows nothing whenever both fall between two scrapes.
    wait_for(lambda: prometheus.query(
        'flowgate_ambassador_stream_duration_seconds_count{flow="chat"}').get("data", {}).get("result"),
        15, "Prometheus holding the ambassador's stream series of chat")

    # A client that leaves a stream early, while tokens still come (5 per second): the engine
    # sees the hang-up at its next write and counts a disconnect. With the answer sent at
    # once, the run could end before the hang-up reached it, and nothing would be counted.
    def disconnects() -> float:
        text = requests.get(f"{stack.engine}/metrics", timeout=10).text
        return metric_value(text, "flowgate_engine_stream_disconnects_total", transport="sse")

    requests.post(f"{stack.llm}/sim/config", json={"tokens_per_s": 5}, timeout=5).raise_for_status()
    try:
        before = disconnects()
        r["stream_left"] = stream_run(stack, {"flow_id": "chat", "input": "Goodbye"}, leave_after=2)
        # a token or two more: the engine writes into the closed connection and counts it
        wait_for(lambda: disconnects() > before, 15, "the engine counting the stream left early")
    finally:
        requests.post(f"{stack.llm}/sim/config", json={"tokens_per_s": sim["tokens_per_s"]},
                      timeout=5).raise_for_status()

    # A retry: the LLM gets slower than the ambassador's per-try timeout for one run. The
    # retry carries the same Idempotency-Key, so the engine answers it with the first run.
    requests.post(f"{stack.llm}/sim/config", json={"ttft_s": SLOW_TTFT_S}, timeout=5).raise_for_status()
    try:
        r["retried"] = post_run(stack, {"flow_id": "chat", "input": "Are you slow today?"})
    finally:
        requests.post(f"{stack.llm}/sim/config", json={"ttft_s": sim["ttft_s"]}, timeout=5).raise_for_status()
    r["finished_at"] = time.time()

    # Prometheus has scraped both services after the last request, and evaluated the rules.
    for job in stack.jobs:
        wait_for(lambda job=job: prometheus.last_scrape(job) > r["finished_at"] + 0.5, 15,
                 f"a scrape of job {job} after the traffic")

    def all_rules_evaluated() -> bool | list:
        groups = prometheus.api("rules").get("data", {}).get("groups", [])
        pending = [rule["name"] for g in groups for rule in g["rules"] if rule.get("health") == "unknown"]
        return (bool(groups) and not pending) or pending

    wait_for(all_rules_evaluated, 15, "Prometheus evaluating every rule once")
    return r


def guarded_canary(stack: Stack, prometheus: Prometheus) -> dict[str, Any]:
    """A guarded canary of chat (a copy of its live version) that the engine promotes by
    itself once it served a run: the Rollouts row's panels and the audit annotations."""
    engine = f"{stack.engine}/api/v1/flows/chat"
    admin = {"x-api-key": (stack.log_dir / "engine.key").read_text(encoding="utf-8").strip()}
    flow = requests.get(engine, headers=admin, timeout=10).json()
    new = requests.put(engine, json=flow["definition"], headers=admin, timeout=10).json()
    # The latency guard is off: one run is v2's whole p95 here, and a first run on a loaded
    # machine may well take twice the live version's p95 (the guard has its own tests).
    canary = {"version": new["version"], "steps": [100], "step_after_s": 1,
              "guard": {"min_runs": 1, "max_latency_ratio": 100}}
    requests.put(f"{engine}/routing", json={"canary": canary, "message": "stack test"},
                 headers=admin, timeout=10).raise_for_status()
    # The controller creates the flow's action series at 0 first: Prometheus must see that
    # 0 before the promotion, or the promotion is no increase it can show.
    promoted = 'flowgate_engine_rollout_actions_total{flow="chat", action="canary_promoted"}'
    wait_for(lambda: prometheus.query(promoted).get("data", {}).get("result"), 20,
             "the rollout action series of chat at 0")
    run = post_run(stack, {"flow_id": "chat", "input": "Hello canary"})

    def promotion() -> list[str]:
        entries = requests.get(f"{engine}/audit", headers=admin, timeout=10).json()["entries"]
        actions = [e["action"] for e in entries]
        return actions if "canary_promoted" in actions else []

    return {"canary_version": canary["version"], "run_version": run["headers"].get("X-Flow-Version"),
            "actions": wait_for(promotion, 20, "the engine promoting the guarded canary of chat")}


@pytest.fixture(scope="module")
def series_names(prometheus: Prometheus, traffic: dict) -> set[str]:
    return set(prometheus.api("label/__name__/values")["data"])


# -- the tests -------------------------------------------------------------------------------

def test_prometheus_scrapes_the_deployed_jobs(stack, prometheus, traffic):
    targets = {t["labels"]["job"]: t for t in prometheus.targets()}
    assert set(targets) == set(stack.jobs), targets
    for job, target in targets.items():
        assert target["health"] == "up", f"{job}: {target['lastError']}"
        assert target["scrapeUrl"].endswith(f":{stack.jobs[job]}/metrics"), target["scrapeUrl"]
        # the labels the dashboards' variables and the alerts group by
        assert target["labels"].get("pod") == "127.0.0.1", (job, target["labels"])
        assert target["labels"].get("app"), (job, target["labels"])


def test_traffic_went_as_planned(traffic, stack):
    r = traffic
    problems = []

    def expect(name: str, ok: bool, what: str) -> None:
        if not ok:
            problems.append(f"{name}: expected {what}; got {json.dumps(r.get(name), default=str)[:600]}")

    for name in ("faq_miss", "chat", "faq_hit", "retried"):
        answer = r[name]
        expect(name, answer.get("status") == 200 and bool(answer["body"].get("output")), "200 with an output")
    expect("faq_miss", r["faq_miss"].get("headers", {}).get("X-Cache") == "MISS", "X-Cache: MISS")
    expect("faq_hit", r["faq_hit"].get("headers", {}).get("X-Cache") == "HIT", "X-Cache: HIT")
    routed = sorted(r[f"router_{i}"].get("status") for i in (1, 2, 3))
    expect("router_1", routed == [200, 200, 429], "two of three support-router runs 200, one 429 (burst 2)")
    for name in ("stream_faq", "stream_chat"):
        events = r[name].get("events", [])
        is_sse = "text/event-stream" in r[name].get("content_type", "")
        expect(name, r[name].get("status") == 200 and is_sse and "token" in events
               and events[-1:] == ["run_finished"], "SSE with tokens, ending in run_finished")
    left = r["stream_left"].get("events", [])
    expect("stream_left", left.count("token") == 2 and "run_finished" not in left,
           "two tokens, then the hang-up before the run's end")
    expect("failed", str(r["failed"].get("status", "")).startswith("5"), "a 5xx (the LLM call timed out)")
    expect("fallback", r["fallback"].get("status") == 200 and r["fallback"]["body"].get("fallback") is True
           and r["fallback"].get("headers", {}).get("X-Fallback") == "true", "faq-rag's fallback answer")
    expect("unknown_flow", r["unknown_flow"].get("status") == 404, "404")
    expect("no_key", r["no_key"].get("status") == 401, "401 without an API key")
    attempts = r["retried"].get("headers", {}).get("X-Upstream-Attempts", "0")
    expect("retried", int(attempts) >= 2,
           f"X-Upstream-Attempts >= 2 (the LLM's time to first token, {SLOW_TTFT_S} s, "
           f"exceeds the per-try timeout, {PER_TRY_S} s)")
    rollout = r["rollout"]
    expect("rollout", rollout["run_version"] == str(rollout["canary_version"])
           and rollout["actions"][:2] == ["canary_promoted", "routing"],
           "the canary served the run, then the engine promoted it")
    assert not problems, "\n".join(problems) + "\n" + stack.logs()


def dashboard_panels() -> list:
    params = []
    for name in DASHBOARD_FILES:
        for panel in data_panels(load_dashboard(name)):
            params.append(pytest.param(name, panel["id"], id=f"{name}:{panel['id']}:{panel['title']}"))
    return params


def dashboard_variables() -> list:
    return [pytest.param(name, v["name"], id=f"{name}:${v['name']}")
            for name in DASHBOARD_FILES for v in query_variables(load_dashboard(name))]


def variable_values(prometheus: Prometheus, dashboard: dict, at: float) -> tuple[dict, dict, list[str]]:
    """The variables set to All, set to every value they list, and the problems met."""
    all_values: dict[str, str] = {}
    listed: dict[str, str] = {}
    problems = []
    for variable in query_variables(dashboard):
        selector, label = variable_query(variable)
        all_values[variable["name"]] = variable.get("allValue") or ".*"
        answer = prometheus.api(f"label/{label}/values", **{"match[]": resolve(selector, listed),
                                                          "start": f"{at - 300:.3f}", "end": f"{at:.3f}"})
        values = sorted(answer.get("data") or [])
        if answer.get("status") != "success" or not values:
            problems.append(f"${variable['name']} = label_values({resolve(selector, listed)}, {label}) lists "
                            f"nothing: {answer.get('error') or 'no series has the label'}")
        listed[variable["name"]] = as_regex(values) if values else "^$"
    return all_values, listed, problems


@pytest.mark.parametrize(("name", "variable"), dashboard_variables())
def test_dashboard_variable_lists_values(prometheus, traffic, name, variable):
    dashboard = load_dashboard(name)
    _all, listed, problems = variable_values(prometheus, dashboard, time.time())
    mine = [p for p in problems if p.startswith(f"${variable} ")]
    assert not mine, f"{name}: " + "\n".join(mine)
    if variable == "flow":
        assert "faq-rag" in listed[variable], f"{name}: $flow lists {listed[variable]}, not faq-rag"


def describe(answer: dict) -> tuple[bool, str]:
    """(shows data, what Prometheus answered) for one query."""
    if answer.get("status") != "success":
        return False, f"Prometheus refused it: {answer.get('errorType')}: {answer.get('error')}"
    values = [float(value) for _labels, value in samples(answer)]
    finite = [v for v in values if math.isfinite(v)]
    if not values:
        return False, "no series"
    if not finite:
        return False, f"{len(values)} series, every value {sorted(set(map(str, values)))} (nothing counted)"
    return True, f"{len(values)} series, e.g. {finite[0]:g}"


def samples(answer: dict) -> list[tuple[dict, str]]:
    """(labels, value) of every sample of an instant query's answer."""
    data = answer.get("data") or {}
    if data.get("resultType") == "scalar":
        return [({}, data["result"][1])]
    if data.get("resultType") == "vector":
        return [(r["metric"], r["value"][1]) for r in data["result"]]
    return []


def unexported(expr: str, series_names: set[str], exported_metrics: dict) -> list[str]:
    """Why each metric ``expr`` names is missing from Prometheus, for those that are."""
    problems = []
    for metric in sorted(set(METRIC.findall(expr))):
        if metric in series_names or metric in QUIET:
            continue
        if metric in exported_metrics:
            problems.append(f"{metric} has no series in Prometheus: it is defined in flow_engine/metrics.py "
                            f"or ambassador/metrics.py, but nothing in this test made the services export it "
                            f"(cause it in `traffic`, or add it to QUIET with the reason)")
        else:
            problems.append(f"{metric} has no series in Prometheus: neither the engine's nor the "
                            f"ambassador's /metrics exports it, and no service defines it")
    return problems


@pytest.mark.parametrize(("name", "panel_id"), dashboard_panels())
def test_dashboard_panel_shows_data(prometheus, traffic, series_names, exported_metrics, name, panel_id):
    dashboard = load_dashboard(name)
    panel = next(p for p in data_panels(dashboard) if p["id"] == panel_id)
    where = f"{name}, panel {panel['title']!r} (id {panel_id})"
    at = time.time()
    all_values, listed, variable_problems = variable_values(prometheus, dashboard, at)
    targets = [t for t in panel.get("targets", []) if t.get("expr", "").strip() and not t.get("hide")]
    assert targets, f"{where} has no query"
    problems = []
    selections = (("variables set to All", all_values), ("variables set to every listed value", listed))
    for selection, values in selections:
        report, shown, refused = [], False, 0
        for target in targets:
            expr = resolve(target["expr"], values)
            ok, what = describe(prometheus.query(expr, at))
            shown |= ok
            if what.startswith("Prometheus refused"):
                refused += 1
                problems.append(f"[{target['refId']}] fails with the {selection}:\n    {expr}\n    {what}")
            report.append(f"  [{target['refId']}] {expr}\n      → {what}")
        if not shown and refused < len(targets):
            problems.append(f"shows no data with the {selection}:\n" + "\n".join(report))
    for target in targets:
        problems += [f"[{target['refId']}] {why}\n    {target['expr']}"
                     for why in unexported(target["expr"], series_names, exported_metrics)]
    if problems and variable_problems:
        problems.append("the dashboard's variables: " + "; ".join(variable_problems))
    assert not problems, f"{where}:\n" + "\n".join(problems)


# Panels that must move with this test's traffic: (dashboard, panel, query, labels of the
# series to look at, what in `traffic` moves it). Counters whose series only appear at their
# first increment are left out: Prometheus never sees that first 0 → 1 step, so rate() of a
# brand-new series stays 0 until the second event.
MOVES = [
    ("ambassador.json", "Latency (time to answer)", "C", {"route": "/run-flow"}, "every run"),
    ("ambassador.json", "Stream duration", "A", {"route": "/run-flow"}, "the streamed runs"),
    ("ambassador.json", "Sidecar CPU by pod", "A", {}, "the ambassador serving the traffic"),
    ("flow-engine.json", "CPU by pod", "A", {}, "the engine running the traffic"),
    ("flow-engine.json", "Workers busy", "A", {}, "the engine running the traffic"),
    ("ambassador.json", "Upstream attempts by outcome", "A", {"outcome": "timeout"}, "the timed-out attempt"),
    ("ambassador.json", "Retries", "A", {"reason": "timeout"}, "the retry after a per-try timeout"),
    ("ambassador.json", "Cache hit ratio", "A", {}, "the cache hit"),
    ("ambassador.json", "Cache lookups", "A", {"result": "hit"}, "the cache hit"),
    ("flow-engine.json", "Run latency", "A", {"flow": "chat"}, "the chat runs"),
    ("flow-engine.json", "Time to first token", "A", {"flow": "chat"}, "the chat runs"),
    ("flow-engine.json", "LLM tokens", "A", {"flow": "chat", "direction": "output"}, "the chat runs"),
    ("flow-engine.json", "Stream events sent", "A", {"transport": "sse"}, "the streamed runs"),
    ("flow-engine.json", "Stream disconnects and refusals", "A", {"transport": "sse"},
     "the client that left a slow stream early"),
    ("flow-engine.json", "Compile cache lookups", "A", {"result": "hit"}, "runs of an already compiled flow"),
    ("flow-engine.json", "Rollout actions", "A", {"flow": "chat", "action": "canary_promoted"},
     "the guarded canary of chat, promoted by the engine"),
    ("flow-engine.json", "Store and event log errors", "C", {},
     "the retry, answered from the engine's Idempotency-Key record"),
]


@pytest.mark.parametrize(("name", "title", "ref", "labels", "cause"), MOVES,
                         ids=[f"{m[0]}:{m[1]}[{m[2]}]" for m in MOVES])
def test_dashboard_panel_shows_the_traffic(prometheus, traffic, name, title, ref, labels, cause):
    dashboard = load_dashboard(name)
    (panel,) = [p for p in data_panels(dashboard) if p["title"] == title]
    (target,) = [t for t in panel["targets"] if t["refId"] == ref]
    all_values, _listed, _problems = variable_values(prometheus, dashboard, time.time())
    expr = resolve(target["expr"], all_values)
    answer = prometheus.query(expr)
    picked = [(m, float(v)) for m, v in samples(answer) if all(m.get(k) == v for k, v in labels.items())]
    assert any(math.isfinite(v) and v > 0 for _m, v in picked), (
        f"{name}, panel {title!r} [{ref}] does not show {cause}: no series with {labels} above 0\n"
        f"    {expr}\n    → {samples(answer) or answer}")


@pytest.mark.parametrize(("name", "title", "idle"), [
    pytest.param("ambassador.json", "In-flight requests", (0, 0), id="ambassador in-flight"),
    pytest.param("flow-engine.json", "Active runs", (0, 0), id="engine active runs"),
    pytest.param("flow-engine.json", "Active streams", (0, 0), id="engine active streams"),
])
def test_gauge_panels_return_to_idle(prometheus, traffic, name, title, idle):
    """Once the traffic is over nothing is in flight (the ambassador counts the scrape itself)."""
    dashboard = load_dashboard(name)
    (panel,) = [p for p in data_panels(dashboard) if p["title"] == title]
    all_values, _listed, _problems = variable_values(prometheus, dashboard, time.time())
    for target in panel["targets"]:
        expr = resolve(target["expr"], all_values)
        values = [float(v) for _m, v in samples(prometheus.query(expr))]
        assert values and all(idle[0] <= v <= idle[1] for v in values), \
            f"{name}, panel {title!r} [{target['refId']}] shows {values} after the traffic, " \
            f"not {idle}\n    {expr}"


@pytest.mark.parametrize("rule", rules(), ids=rule_name)
def test_rule_expression_evaluates(prometheus, traffic, series_names, exported_metrics, rule):
    name = rule_name(rule)
    answer = prometheus.query(rule["expr"])
    assert answer.get("status") == "success", \
        f"rules.yml {name}: {answer.get('errorType')}: {answer.get('error')}\n{rule['expr']}"
    unknown = unexported(rule["expr"], series_names, exported_metrics)
    assert not unknown, f"rules.yml {name} could never fire:\n" + "\n".join(unknown) + f"\n{rule['expr']}"
    loaded = {r["name"]: r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]}
    assert name in loaded, f"Prometheus did not load rule {name} from rules.yml (loaded: {sorted(loaded)})"
    assert loaded[name]["health"] == "ok", f"{name}: Prometheus evaluates it with {loaded[name]}"


def test_the_hpa_custom_metric_is_served_by_the_adapter_rule(prometheus, traffic, render):
    """The prod HPA scales on a Pods metric that prometheus-adapter serves with the rule of
    deploy/prometheus/adapter-values.yaml: its query, templated as the adapter templates it
    for one pod, must give one finite value per engine process here."""
    (rule,) = yaml.safe_load((PROMETHEUS_DIR / "adapter-values.yaml").read_text())["rules"]["custom"]
    (hpa,) = [d for d in render("prod") if d["kind"] == "HorizontalPodAutoscaler"]
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == [rule["name"]["as"]], f"the HPA asks for {pods}, the adapter serves {rule['name']}"
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    query = (rule["metricsQuery"].replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", 'job="flow-engine"').replace("<<.GroupBy>>", "instance"))
    values = [float(v) for _m, v in samples(prometheus.query(query))]
    assert values and all(math.isfinite(v) and v >= 0 for v in values), f"{query} → {values}"


# -- the keys `flowgate up` hands out (issue 10) ---------------------------------------------

def process_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def service_processes(stack: Stack, service: str) -> list:
    """The processes of one service `flowgate up` started (its gunicorn master and workers)."""
    pattern = re.compile(rf"flowgate\.cli {service}\b|flowgate-{service}\b")
    found = [p for p in stack.up.snapshot() if pattern.search(p.cmdline)]
    assert found, f"no {service} process under `flowgate up`: " + \
        "; ".join(str(p) for p in stack.up.snapshot())
    return found


def test_flowgate_up_gives_the_cli_an_admin_key_and_the_ambassador_a_runner_key(stack):
    from flow_engine.auth import parse_keys

    key_file = stack.log_dir / "engine.key"
    assert key_file.is_file() and (key_file.stat().st_mode & 0o777) == 0o600, f"{key_file}: not 0600"
    admin = key_file.read_text(encoding="utf-8").strip()

    engines = [process_environ(p.pid) for p in service_processes(stack, "engine")]
    keys = {k.name: k for k in parse_keys(engines[0]["FLOW_ENGINE_API_KEYS"].split(","))}
    assert (keys["cli"].role, keys["cli"].proxy, keys["cli"].secret.decode()) == ("admin", False, admin)
    assert (keys["ambassador"].role, keys["ambassador"].proxy) == ("runner", True)
    runner = keys["ambassador"].secret.decode()

    for proc in service_processes(stack, "ambassador"):
        env = process_environ(proc.pid)
        assert env.get("AMBASSADOR_UPSTREAM_KEY") == runner, f"{proc}: not the runner+proxy key"
        leaked = sorted(name for name, value in env.items() if admin in value)
        assert not leaked, f"{proc} holds the admin secret in {leaked}"
        assert "FLOW_ENGINE_API_KEYS" not in env, f"{proc} holds the engine's key list"

    # The engine enforces the split: the ambassador's key runs and reads, never publishes.
    flows = f"{stack.engine}/api/v1/flows"
    as_runner = requests.get(flows, headers={"x-api-key": runner}, timeout=10)
    assert as_runner.status_code == 200, as_runner.text
    refused = requests.post(f"{flows}/chat/publish", json={"version": 1}, headers={"x-api-key": runner},
                            timeout=10)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden", refused.text
    versions = requests.get(f"{flows}/chat/versions", headers={"Authorization": f"Bearer {admin}"},
                            timeout=10)
    assert versions.status_code == 200, versions.text
