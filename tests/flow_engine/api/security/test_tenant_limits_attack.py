"""One tenant floods the engine — many concurrent runs, or runs that burn LLM tokens — to
starve the others. Past its own limit it gets 429 ``tenant_limit`` with ``Retry-After``
while other tenants keep running; with Redis the limit holds across processes. Metrics name
only known tenants."""

from __future__ import annotations

import json
import time

import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families
from support.keys import as_, tenant
from support.procs import free_port
from support.waiting import wait_until

from flow_engine.config import ConfigError, Settings
from flow_engine.tenants import TenantLimits, TenantPolicy

BODY = {"input_value": "hello there"}


def metric(client, name: str, **labels: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def refused(resp, limit: str) -> dict:
    assert resp.status_code == 429, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert (error["code"], error["limit"]) == ("tenant_limit", limit)
    assert int(resp.headers["Retry-After"]) == error["retry_after_s"] >= 1
    return error


class Busy:
    """A streamed run in progress (its slot taken) until ``stop()``."""

    def __init__(self, client, headers) -> None:
        self.client, self.headers = client, headers
        self.resp = client.post("/api/v1/run/llm?stream=true", json=BODY, headers=headers,
                                buffered=False)
        assert self.resp.status_code == 200
        assert b"run_started" in next(self.resp.response)  # it holds its slot from here
        self.run_id = self.resp.headers["X-Run-ID"]

    def stop(self) -> None:
        """Leave the stream (the run is cancelled) and wait until the run has ended."""
        self.resp.close()
        deadline = time.monotonic() + 10
        while self.client.get(f"/api/v1/runs/{self.run_id}", headers=self.headers).get_json()[
                "status"] == "running":
            assert time.monotonic() < deadline, "the cancelled run never ended"
            time.sleep(0.01)


@pytest.fixture
def slow_run(fresh_llm_sim):
    """``slow_run(client, headers)``: a Busy run whose model streams until it is stopped
    (100 s at most): however late the test's next requests come, its slot is still taken.
    Other runs get the sim's defaults (answered at once)."""

    def start(client, headers) -> Busy:
        streaming = fresh_llm_sim.stats()["active_streams"]
        fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=2000)
        try:
            busy = Busy(client, headers)
            # the sim takes its settings when the run's call arrives, after run_started
            wait_until(lambda: fresh_llm_sim.stats()["active_streams"] > streaming,
                       what="the busy run's call at the model")
        finally:
            fresh_llm_sim.restore_defaults()
        return busy

    return start


def test_concurrent_runs_over_the_tenant_limit_are_429(keyed_app, defs, fresh_llm_sim, slow_run):
    app = keyed_app(openai_base_url=fresh_llm_sim.base_url, tenant_max_runs=1,
                    tenant_limits=json.dumps({"shop-b": {"max_runs": 2}}))
    client = app.test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=as_("admin")).status_code == 201
    busy = slow_run(client, tenant("shop-a"))
    try:
        error = refused(client.post("/api/v1/run/llm", json=BODY, headers=tenant("shop-a")), "runs")
        assert "shop-a" in error["message"] and "1 runs in progress" in error["message"]
        refused(client.post("/api/v1/run/llm?stream=true", json=BODY, headers=tenant("shop-a")),
                "runs")
        # other tenants are not held back by shop-a
        assert client.post("/api/v1/run/llm", json=BODY, headers=tenant("shop-b")).status_code == 200
        assert client.post("/api/v1/run/llm", json=BODY, headers=as_("other")).status_code == 200
    finally:
        busy.stop()
    assert client.post("/api/v1/run/llm", json=BODY, headers=tenant("shop-a")).status_code == 200
    # a proxy's tenants are counted under the proxy key's name (bounded labels)
    assert metric(client, "flowgate_engine_tenant_limited_total", tenant="ambassador",
                  limit="runs") == 2


def one_minute(app, monkeypatch):
    """The tenant limits' clock fixed mid-minute: the token window cannot turn mid-test."""
    monkeypatch.setattr(app.extensions["flowgate"].runs.executor.limits, "_clock",
                        lambda: 1_000_000 * 60 + 30.0)
    return app


def test_tokens_per_minute_over_the_limit_are_429(keyed_app, defs, monkeypatch):
    client = one_minute(keyed_app(tenant_tokens_per_minute=5), monkeypatch).test_client()
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin")).status_code == 201

    assert client.post("/api/v1/run/f", json=BODY, headers=as_("runner")).status_code == 200
    error = refused(client.post("/api/v1/run/f", json=BODY, headers=as_("runner")), "tokens")
    assert error["retry_after_s"] == 30  # the rest of the minute
    assert client.post("/api/v1/run/f", json=BODY, headers=as_("other")).status_code == 200
    assert metric(client, "flowgate_engine_tenant_llm_tokens_total", tenant="orders-app") > 5


def test_the_run_limit_holds_across_processes_with_redis(keyed_app, defs, fresh_llm_sim, redis_url,
                                                         slow_run):
    shop = f"shop-{free_port()}"  # a tenant of this test alone in the shared Redis
    config = {"openai_base_url": fresh_llm_sim.base_url, "redis_url": redis_url,
              "tenant_max_runs": 1}
    a, b = keyed_app(**config).test_client(), keyed_app(**config).test_client()
    assert a.post("/api/v1/flows", json=defs.openai(id="llm"), headers=as_("admin")).status_code == 201
    busy = slow_run(a, tenant(shop))
    try:
        refused(b.post("/api/v1/run/llm", json=BODY, headers=tenant(shop)), "runs")
    finally:
        busy.stop()
    assert b.post("/api/v1/run/llm", json=BODY, headers=tenant(shop)).status_code == 200
    leases = redis_lib.Redis.from_url(redis_url)
    assert leases.exists(f"flowgate:tenant:ambassador/{shop}:runs") in (0, 1)  # the real key
    assert leases.zcard(f"flowgate:tenant:ambassador/{shop}:runs") == 0  # every slot back


def test_the_token_limit_holds_across_processes_with_redis(keyed_app, defs, redis_url,
                                                           monkeypatch):
    """Tokens one engine process counted for a tenant hold the tenant back on another: a
    tenant cannot spread its runs over replicas (or workers) to multiply its budget."""
    shop = f"shop-{free_port()}"  # a tenant of this test alone in the shared Redis
    config = {"redis_url": redis_url, "tenant_tokens_per_minute": 5}
    a, b = keyed_app(**config), keyed_app(**config)
    minute = int(time.time() // 60)
    for app in (a, b):  # one fixed minute for both: the window cannot turn mid-test
        monkeypatch.setattr(app.extensions["flowgate"].runs.executor.limits, "_clock",
                            lambda: minute * 60 + 30.0)
    a, b = a.test_client(), b.test_client()
    assert a.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin")).status_code == 201

    assert a.post("/api/v1/run/f", json=BODY, headers=tenant(shop)).status_code == 200
    used = redis_lib.Redis.from_url(redis_url).get(f"flowgate:tenant:ambassador/{shop}:tokens:{minute}")
    assert int(used or 0) > 5

    error = refused(b.post("/api/v1/run/f", json=BODY, headers=tenant(shop)), "tokens")
    assert f"ambassador/{shop}" in error["message"] and error["retry_after_s"] == 30
    refused(a.post("/api/v1/run/f", json=BODY, headers=tenant(shop)), "tokens")
    # another tenant of the same proxy, on the same process, is not held back
    assert b.post("/api/v1/run/f", json=BODY, headers=tenant(f"{shop}-other")).status_code == 200


def test_with_redis_down_each_process_still_limits(keyed_app, defs, fresh_llm_sim, slow_run):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = keyed_app(openai_base_url=fresh_llm_sim.base_url, redis_url=dead,
                       tenant_max_runs=1).test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=as_("admin")).status_code == 201
    busy = slow_run(client, tenant("shop-a"))
    try:
        refused(client.post("/api/v1/run/llm", json=BODY, headers=tenant("shop-a")), "runs")
    finally:
        busy.stop()
    assert metric(client, "flowgate_engine_event_log_errors_total", op="tenants") >= 1


def test_tenant_labels_are_bounded(keyed_app, defs):
    client = keyed_app(tenant_limits=json.dumps({"ambassador/shop-a": {},
                                                 "ambassador~bob": {}})).test_client()
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin")).status_code == 201
    for i in range(50):
        assert client.post("/api/v1/run/f", json=BODY, headers=tenant(f"random-{i}")).status_code == 200
        # callers known by identity alone (a JWT without a tenant claim), "/" or "~" in it
        by_identity = as_("proxy", **{"x-flowgate-identity": f"a/b~c-{i}"})
        assert client.post("/api/v1/run/f", json=BODY, headers=by_identity).status_code == 200
    client.post("/api/v1/run/f", json=BODY, headers=tenant("shop-a"))
    client.post("/api/v1/run/f", json=BODY, headers=as_("proxy", **{"x-flowgate-identity": "bob"}))
    client.post("/api/v1/run/f", json=BODY, headers=as_("runner"))

    text = client.get("/metrics").get_data(as_text=True)
    tenants = {s.labels["tenant"] for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "flowgate_engine_tenant_runs_total"}
    # configured tenants by name, a proxy's others under the proxy key, keys by their name
    assert tenants == {"ambassador/shop-a", "ambassador~bob", "ambassador", "orders-app"}
    assert metric(client, "flowgate_engine_tenant_runs_total", tenant="ambassador") == 100


def test_a_proxy_cannot_escape_its_limit_by_inventing_tenants(keyed_app, defs, fresh_llm_sim,
                                                              slow_run):
    client = keyed_app(openai_base_url=fresh_llm_sim.base_url,
                       tenant_limits=json.dumps({"ambassador": {"max_runs": 1}})).test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=as_("admin")).status_code == 201
    busy = slow_run(client, tenant("shop-a"))
    try:
        for name in ("shop-b", "made-up-1", "made-up-2"):
            error = refused(client.post("/api/v1/run/llm", json=BODY, headers=tenant(name)), "runs")
            assert "'ambassador'" in error["message"]
        # another key's callers are not this proxy's
        assert client.post("/api/v1/run/llm", json=BODY, headers=as_("runner")).status_code == 200
    finally:
        busy.stop()


def test_a_cap_for_every_proxy_key_holds_its_invented_tenants_together(keyed_app, defs,
                                                                       fresh_llm_sim, slow_run):
    """FLOW_ENGINE_PROXY_MAX_RUNS: without naming each proxy key in FLOW_ENGINE_TENANT_LIMITS,
    a proxy that invents a tenant name per request still gets no more than its cap, its own
    key's tenant included; a key that is not a proxy is not held back by it."""
    client = keyed_app(openai_base_url=fresh_llm_sim.base_url, tenant_max_runs=1,
                       proxy_max_runs=2).test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=as_("admin")).status_code == 201
    busy = [slow_run(client, tenant("shop-a")),
            slow_run(client, as_("proxy", **{"x-flowgate-identity": "made-up-0"}))]
    try:
        for headers in (tenant("made-up-1"), tenant("made-up-2"), as_("proxy"),
                        as_("proxy", **{"x-flowgate-identity": "made-up-3"})):
            error = refused(client.post("/api/v1/run/llm", json=BODY, headers=headers), "runs")
            assert error["message"].startswith(
                "proxy key 'ambassador' (all its tenants together) already has 2 runs")
        assert client.post("/api/v1/run/llm", json=BODY, headers=as_("runner")).status_code == 200
    finally:
        for run in reversed(busy):  # streams of one test client end in the order they began
            run.stop()
    assert client.post("/api/v1/run/llm", json=BODY, headers=tenant("made-up-1")).status_code == 200


def test_a_token_cap_for_every_proxy_key(keyed_app, defs, monkeypatch):
    client = one_minute(keyed_app(proxy_tokens_per_minute=5), monkeypatch).test_client()
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin")).status_code == 201

    assert client.post("/api/v1/run/f", json=BODY, headers=tenant("t-1")).status_code == 200
    for headers in (tenant("t-2"), as_("proxy"), as_("proxy", **{"x-flowgate-identity": "x"})):
        error = refused(client.post("/api/v1/run/f", json=BODY, headers=headers), "tokens")
        assert error["message"].startswith("proxy key 'ambassador' (all its tenants together) used")
    assert client.post("/api/v1/run/f", json=BODY, headers=as_("runner")).status_code == 200


def test_a_named_override_of_a_proxy_key_wins_over_the_proxy_cap(keyed_app, defs):
    app = keyed_app(proxy_tokens_per_minute=5, tenant_limits=json.dumps(
        {"ambassador": {"tokens_per_minute": 0}}))
    client = app.test_client()
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin")).status_code == 201
    for name in ("t-1", "t-2", "t-3"):
        assert client.post("/api/v1/run/f", json=BODY, headers=tenant(name)).status_code == 200


@pytest.mark.parametrize("env", ["FLOW_ENGINE_PROXY_MAX_RUNS", "FLOW_ENGINE_PROXY_TOKENS_PER_MINUTE"])
def test_a_negative_proxy_cap_stops_the_engine(env):
    with pytest.raises(ConfigError, match=env):
        Settings.load(environ={env: "-1"})


def test_failed_runs_count_their_tokens(keyed_app, defs, fresh_llm_sim, monkeypatch):
    """A run that fails after its LLM call (its parser refuses the answer) still spent the
    tokens: without counting them a tenant could burn tokens for free."""
    client = one_minute(keyed_app(openai_base_url=fresh_llm_sim.base_url,
                                  tenant_tokens_per_minute=20), monkeypatch).test_client()
    flow = defs.openai(id="f")
    flow["nodes"].insert(2, {"id": "parse", "type": "JsonOutputParser"})
    flow["edges"] = [{"source": "in", "target": "llm"}, {"source": "llm", "target": "parse"},
                     {"source": "parse", "target": "out"}]
    assert client.post("/api/v1/flows", json=flow, headers=as_("admin")).status_code == 201

    assert client.post("/api/v1/run/f", json=BODY, headers=as_("runner")).status_code == 502
    refused(client.post("/api/v1/run/f", json=BODY, headers=as_("runner")), "tokens")


def test_a_keyed_run_refused_by_the_limit_leaves_its_key_free(keyed_app, defs, fresh_llm_sim,
                                                               slow_run):
    client = keyed_app(openai_base_url=fresh_llm_sim.base_url, tenant_max_runs=1).test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=as_("admin")).status_code == 201
    keyed = {**tenant("shop-a"), "Idempotency-Key": "order-77"}
    busy = slow_run(client, tenant("shop-a"))
    try:
        refused(client.post("/api/v1/run/llm", json=BODY, headers=keyed), "runs")
    finally:
        busy.stop()

    retry = client.post("/api/v1/run/llm", json=BODY, headers=keyed)

    assert retry.status_code == 200  # runs now, instead of waiting on a record that never ran
    assert "Idempotent-Replayed" not in retry.headers


@pytest.mark.parametrize(("raw", "fragment"), [
    pytest.param("[1]", "must be a JSON object", id="not-an-object"),
    pytest.param("{", "not JSON", id="not-json"),
    pytest.param('{"a": {"max_runs": -1}}', "non-negative integer", id="negative"),
    pytest.param('{"a": {"max_runs": true}}', "non-negative integer", id="boolean"),
    pytest.param('{"a": {"runs": 3}}', "max_runs", id="unknown-field"),
])
def test_malformed_tenant_limits_stop_the_engine(keyed_app, raw, fragment):
    with pytest.raises(ConfigError, match="FLOW_ENGINE_TENANT_LIMITS"):
        keyed_app(tenant_limits=raw)
    with pytest.raises(ValueError, match=fragment):
        TenantPolicy.parse(0, 0, raw)


def test_a_lease_of_a_process_that_died_expires(redis_url):
    """The lease set uses Redis server time: a lease past its expiry frees the slot."""
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    shop = f"shop-{free_port()}"
    limits = TenantLimits(TenantPolicy.parse(1, 0, ""), client)
    limits.admit(shop, "run-of-a-dead-process")
    key = f"flowgate:tenant:{shop}:runs"
    client.zadd(key, {"run-of-a-dead-process": 1})  # as if its lease ran out long ago
    try:
        limits2 = TenantLimits(TenantPolicy.parse(1, 0, ""), client)
        limits2.admit(shop, "new-run")  # not refused
        assert client.zrange(key, 0, -1) == ["new-run"]
    finally:
        client.delete(key)
