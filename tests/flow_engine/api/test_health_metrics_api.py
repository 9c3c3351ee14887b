"""``/healthz``, ``/readyz`` and the Prometheus metrics a run leaves behind."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from support.prom import label_values, metric_value

from flow_engine.store import StoreError

RUNS = "flowgate_engine_runs_total"
CACHE = "flowgate_engine_compile_cache_total"
NODE_COUNT = "flowgate_engine_node_duration_seconds_count"


def test_healthz_is_ok(client):
    resp = client.get("/healthz")

    assert (resp.status_code, resp.get_json()) == (200, {"status": "ok"})


def test_readyz_reports_its_checks(client):
    resp = client.get("/readyz")

    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ready", "checks": {"components": True, "store": True}}


def test_readyz_is_503_when_the_store_fails(app, client, monkeypatch):
    def down() -> None:
        raise StoreError("the flow store is unavailable; retry shortly")

    monkeypatch.setattr(app.extensions["flowgate"].store, "ping", down)

    resp = client.get("/readyz")

    assert resp.status_code == 503
    assert resp.get_json() == {"status": "not_ready", "checks": {"components": True, "store": False}}


def test_runs_are_counted_by_flow_version_and_status(client, auth, defs, create_flow, run_flow,
                                                     metric):
    create_flow(defs.echo(id="f"))
    create_flow(defs.json_parser(id="j"))
    client.put("/api/v1/flows/f", json=defs.echo("V2 {question}"), headers=auth)

    for body in ({"input_value": "a"}, {"input_value": "b"}, {"input_value": "c", "version": 2}):
        assert run_flow("f", body).status_code == 200
    assert run_flow("j", {"input_value": "not json"}).status_code == 502

    assert metric(RUNS, flow="f", version="1", status="succeeded") == 2
    assert metric(RUNS, flow="f", version="2", status="succeeded") == 1
    assert metric(RUNS, flow="j", version="1", status="failed") == 1
    assert metric(RUNS, flow="f", status="failed") == 0
    assert metric("flowgate_engine_http_requests_total", route="/api/v1/run/<flow_ref>",
                  method="POST", status="200") == 3
    assert metric("flowgate_engine_llm_tokens_total", flow="f", direction="output") > 0


def test_the_second_run_of_a_version_hits_the_compile_cache(defs, create_flow, run_flow, metric):
    create_flow(defs.echo(id="f", tweakable={"p": ["template"]}))
    hits, misses = metric(CACHE, result="hit"), metric(CACHE, result="miss")

    run_flow("f", {"input_value": "a"})
    assert (metric(CACHE, result="hit"), metric(CACHE, result="miss")) == (hits, misses + 1)

    run_flow("f", {"input_value": "b"})
    assert (metric(CACHE, result="hit"), metric(CACHE, result="miss")) == (hits + 1, misses + 1)

    run_flow("f", {"input_value": "c", "tweaks": {"p": {"template": "T {question}"}}})
    assert metric(CACHE, result="miss") == misses + 2  # a tweaked graph is compiled on its own


def test_the_compile_caches_say_how_many_bytes_they_hold(defs, create_flow, run_flow, metric,
                                                          app):
    create_flow({**defs.echo(id="f"), "tweakable": {"p": ["template"]}})
    held = "flowgate_engine_compile_cache_bytes"

    run_flow("f", {"input_value": "a"})
    versions = metric(held, cache="versions")
    tweaked = run_flow("f", {"input_value": "b", "tweaks": {"p": {"template": "T {question}"}}})

    assert tweaked.status_code == 200, tweaked.get_json()
    caches = app.extensions["flowgate"].flows
    assert versions == caches.cache.bytes > 0
    assert metric(held, cache="tweaked") == caches.tweaked_cache.bytes > 0
    assert metric(held, cache="versions") == versions  # a tweaked graph is held apart


def test_node_durations_are_observed_per_node_type(defs, create_flow, run_flow, metric):
    create_flow(defs.echo(id="f"))

    for text in ("a", "b"):
        run_flow("f", {"input_value": text})

    for node_type in ("ChatInput", "PromptTemplate", "ChatModel", "ChatOutput"):
        assert metric(NODE_COUNT, flow="f", node_type=node_type) == 2, node_type
    assert metric("flowgate_engine_node_duration_seconds_sum", flow="f") > 0


LLM_CALLS = "flowgate_engine_llm_calls_total"


def test_llm_calls_are_counted_by_provider_model_and_outcome(fresh_llm_sim, make_app, auth,
                                                              defs):
    """What an SRE asks when a provider misbehaves: which model, how slow, how many 429s —
    and why runs fail."""
    client = make_app(openai_base_url=fresh_llm_sim.base_url).test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=auth).status_code == 201
    def metric(name: str, **labels: str) -> float:
        return metric_value(client.get("/metrics").get_data(as_text=True), name, **labels)

    def run() -> int:
        return client.post("/api/v1/run/llm", json={"input_value": "hi"}, headers=auth).status_code

    assert run() == 200
    fresh_llm_sim.configure(error_rate=1.0, error_kinds=["429"])
    assert run() == 502
    fresh_llm_sim.configure(error_rate=1.0, error_kinds=["500"])
    assert run() == 502

    labels = {"provider": fresh_llm_sim.url.removeprefix("http://"), "model": "flowgate-sim"}
    assert metric(LLM_CALLS, **labels, outcome="ok") == 1
    assert metric(LLM_CALLS, **labels, outcome="rate_limited") == 1
    assert metric(LLM_CALLS, **labels, outcome="error") == 1
    assert metric("flowgate_engine_llm_call_duration_seconds_count", **labels) == 3
    assert metric("flowgate_engine_llm_model_tokens_total", **labels, direction="input") > 0
    assert metric("flowgate_engine_llm_model_tokens_total", **labels, direction="output") > 0
    assert metric("flowgate_engine_run_failures_total", flow="llm", reason="llm_error") == 2
    assert metric("flowgate_engine_run_failures_total", flow="llm", version="1",
                  reason="llm_error") == 2


FAILURES = "flowgate_engine_run_failures_total"
CHANGES = "flowgate_engine_flow_changes_total"


def series(client, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name`` whose labels include ``labels``, by their whole label set."""
    text = client.get("/metrics").get_data(as_text=True)
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())}


def test_failures_carry_a_bounded_version_label(client, auth, defs, create_flow, run_flow):
    """Twelve versions of a flow that always fails, each run once: the first ten that
    served are labelled by number, the rest are ``other``."""
    from flow_engine.metrics import MAX_VERSIONS

    create_flow(defs.json_parser(id="j"))
    for _ in range(MAX_VERSIONS + 1):
        assert client.put("/api/v1/flows/j", json=defs.json_parser(),
                          headers=auth).status_code == 201
    for version in range(1, MAX_VERSIONS + 3):
        assert run_flow("j", {"input_value": "not json", "version": version}).status_code == 502

    text = client.get("/metrics").get_data(as_text=True)
    expected = {str(v) for v in range(1, MAX_VERSIONS + 1)} | {"other"}
    assert label_values(text, FAILURES, "version") == expected
    assert metric_value(text, FAILURES, flow="j", version="other", reason="run_failed") == 2
    assert metric_value(text, FAILURES, flow="j", version="3", reason="run_failed") == 1


def test_failure_and_llm_call_series_exist_at_zero_before_the_first_failure(
        fresh_llm_sim, make_app, auth, defs):
    """rate() and increase() in alerts only see a failure whose series existed before it:
    a version's first run (here a success) makes its failure series, a model's first call
    its series of every outcome."""
    from flow_engine.metrics import LLM_CALL_OUTCOMES, RUN_FAILURE_REASONS

    client = make_app(openai_base_url=fresh_llm_sim.base_url).test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=auth).status_code == 201
    assert client.post("/api/v1/run/llm", json={"input_value": "hi"},
                       headers=auth).status_code == 200

    failures = series(client, FAILURES, flow="llm", version="1")
    assert {dict(k)["reason"]: v for k, v in failures.items()} == dict.fromkeys(
        RUN_FAILURE_REASONS, 0.0)
    calls = series(client, LLM_CALLS, model="flowgate-sim")
    assert {dict(k)["outcome"]: v for k, v in calls.items()} == {
        **dict.fromkeys(LLM_CALL_OUTCOMES, 0.0), "ok": 1.0}


def test_each_known_flow_s_change_series_exist_at_zero_after_a_restart(make_app, auth, defs):
    """An engine process that starts (a pod restart) makes every stored flow's change
    series at 0, so Grafana's annotations (increase() of them) show its first change."""
    from flow_engine.metrics import FLOW_CHANGE_ACTIONS

    first = make_app().test_client()
    for flow_id in ("a", "b"):
        assert first.post("/api/v1/flows", json=defs.echo(id=flow_id),
                          headers=auth).status_code == 201

    restarted = make_app().test_client()
    for flow_id in ("a", "b"):
        changes = series(restarted, CHANGES, flow=flow_id)
        assert {dict(k)["action"]: v for k, v in changes.items()} == dict.fromkeys(
            FLOW_CHANGE_ACTIONS, 0.0), flow_id
    assert restarted.put("/api/v1/flows/a", json=defs.echo("V2 {question}"),
                         headers=auth).status_code == 201
    assert metric_value(restarted.get("/metrics").get_data(as_text=True), CHANGES, flow="a",
                        action="new_version") == 1


def test_model_names_from_tweaks_cannot_flood_the_metrics(fresh_llm_sim, make_app, auth, defs):
    """A flow that lets callers choose the model: every name a caller makes up is a model
    label only up to MAX_MODELS; then they are counted as "other"."""
    from flow_engine.metrics import MAX_MODELS

    client = make_app(openai_base_url=fresh_llm_sim.base_url).test_client()
    flow = defs.openai(id="any-model", tweakable={"llm": ["model"]})
    assert client.post("/api/v1/flows", json=flow, headers=auth).status_code == 201
    for i in range(MAX_MODELS + 5):
        resp = client.post("/api/v1/run/any-model", headers=auth, json={
            "input_value": "hi", "tweaks": {"llm": {"model": f"made-up-{i}-" + "x" * 150}}})
        assert resp.status_code == 200, resp.get_data(as_text=True)
    text = client.get("/metrics").get_data(as_text=True)
    models = label_values(text, LLM_CALLS, "model")
    assert len(models) == MAX_MODELS + 1 and "other" in models
    assert max(len(m) for m in models) <= 80
    assert metric_value(text, LLM_CALLS, model="other") == 5


def test_a_model_name_becomes_a_label_only_once_a_call_to_it_succeeded(fresh_llm_sim, make_app,
                                                                       auth, defs):
    """Calls a provider refuses (it does not serve the model) take no label slot."""
    client = make_app(openai_base_url=fresh_llm_sim.base_url).test_client()
    flow = defs.openai(id="any-model", tweakable={"llm": ["model"]})
    assert client.post("/api/v1/flows", json=flow, headers=auth).status_code == 201
    fresh_llm_sim.configure(error_rate=1.0, error_kinds=["500"])

    def run(model: str) -> int:
        return client.post("/api/v1/run/any-model", headers=auth, json={
            "input_value": "hi", "tweaks": {"llm": {"model": model}}}).status_code

    assert [run(f"no-such-model-{i}") for i in range(3)] == [502] * 3
    fresh_llm_sim.configure(error_rate=0.0)
    assert run("real-model") == 200 and run("no-such-model-0") == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert label_values(text, LLM_CALLS, "model") == {"other", "real-model", "no-such-model-0"}
    assert metric_value(text, LLM_CALLS, model="other", outcome="error") == 3



def test_a_version_idle_for_an_hour_loses_its_failure_series(monkeypatch):
    """Its series of every reason go, the known ones and any other (a clock the test moves)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from flow_engine.metrics import VERSION_TTL_S, EngineMetrics, VersionLabels, forget_version

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics, now = EngineMetrics(CollectorRegistry()), [0.0]
    label = VersionLabels(lambda flow, version: forget_version(metrics, flow, version),
                          clock=lambda: now[0])
    metrics.run_failures.labels("f", label("f", 1), "llm_error").inc()
    metrics.run_failures.labels("f", label("f", 1), "some_new_code").inc()
    metrics.run_failures.labels("f", label("f", 2), "llm_error").inc()
    now[0] = VERSION_TTL_S / 2
    label("f", 2)
    now[0] = VERSION_TTL_S + 1
    label("f", 3)  # version 1 has not served for an hour; 2 has

    text = generate_latest(metrics.registry).decode()
    assert label_values(text, FAILURES, "version") == {"2"}
    assert metric_value(text, FAILURES, version="2", reason="llm_error") == 1
