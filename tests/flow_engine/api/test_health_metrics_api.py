"""``/healthz``, ``/readyz`` and the Prometheus metrics a run leaves behind."""

from __future__ import annotations

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


def test_node_durations_are_observed_per_node_type(defs, create_flow, run_flow, metric):
    create_flow(defs.echo(id="f"))

    for text in ("a", "b"):
        run_flow("f", {"input_value": text})

    for node_type in ("ChatInput", "PromptTemplate", "ChatModel", "ChatOutput"):
        assert metric(NODE_COUNT, flow="f", node_type=node_type) == 2, node_type
    assert metric("flowgate_engine_node_duration_seconds_sum", flow="f") > 0
