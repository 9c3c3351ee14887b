"""``GET /openapi.json``: a valid OpenAPI 3.1 document whose paths are exactly the routes the
app serves, and which every answer matches — status, content type, body schema, required
headers — for each status a route can give (the app against the in-test engine, a dead
port, or its own refusals); a method a path does not have is a 405 with ``Allow``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from app_harness import API_KEYS, APP_KEY, assert_error_contract, run_flow
from openapi_conformance import Document
from openapi_spec_validator import validate

IGNORED_METHODS = {"HEAD", "OPTIONS"}
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
KEYS = {"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS}
ONLY_FAQ = {"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": [
    {"key": APP_KEY, "identity": "orders-app", "flows": ["faq"]}]}
SSE_BODY = b'id: 1\nevent: run_started\ndata: {"run_id": "r1"}\n\n'


def spec_of(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return response.get_json()


def served_operations(app) -> set[tuple[str, str]]:
    """(OpenAPI path, lower-case method) of every Flask route (the probes) and of every
    proxied route the adapter (ambassador/wsgi.py) serves."""
    from ambassador.filters.validate import ROUTES

    operations = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        operations |= {(path, m.lower()) for m in rule.methods - IGNORED_METHODS}
    for route, spec in ROUTES.items():
        path = route.replace("<id>", "{run_id}")
        operations |= {(path, m.lower()) for m in set(spec.methods) - IGNORED_METHODS}
    return operations


def test_the_document_is_valid_openapi_3_1(make_app) -> None:
    client, _ = make_app()
    spec = spec_of(client)
    validate(spec)
    assert spec["openapi"].startswith("3.1")


def test_its_paths_are_exactly_the_routes_served(make_app) -> None:
    client, _ = make_app()
    spec = spec_of(client)
    described = {(path, method) for path, item in spec["paths"].items() for method in item
                 if method in {"get", "put", "post", "delete", "patch"}}
    served = served_operations(client.application)
    assert ("/run-flow", "post") in served and ("/ws/run-flow", "get") in served
    assert described == served


def test_only_the_probes_and_the_document_need_no_credentials(make_app) -> None:
    client, _ = make_app(KEYS)
    spec = spec_of(client)  # itself one of them: no key sent
    public = {path for path, item in spec["paths"].items() for op in item.values()
              if op.get("security") == []}
    assert public == {"/healthz", "/readyz", "/metrics", "/openapi.json"}
    for path in public:
        assert client.get(path).status_code == 200


# -- every answer matches the document -------------------------------------------------------------

def engine_says(status: int, code: str) -> Callable:
    def script(engine) -> None:
        engine.answer(status, {"error": {"code": code, "message": "the engine says no",
                                         "trace_id": "0" * 32}})
    return script


def sse(engine) -> None:
    engine.script.append((200, {"Content-Type": "text/event-stream"}, SSE_BODY))


def run_of_flow(flow_id: str) -> Callable:
    def script(engine) -> None:
        engine.answer(200, {"run_id": "r1", "flow_id": flow_id, "status": "succeeded"})
    return script


DEAD = "dead"  # config value: the upstream URL is a port nothing listens on
SILENT = "silent"  # config value: the upstream URL is a port that listens and never answers
FLOW = {"flow_id": "faq", "input": "hello"}


def post_run(body: Any = None, **kw: Any) -> Callable:
    return lambda c: c.post("/run-flow", json=FLOW if body is None else body, **kw)


def twice(call: Callable) -> Callable:
    return lambda c: (call(c), call(c))[1]


# (id, config, engine script, request, method, path template, status)
SCENARIOS = [
    ("run", {}, None, post_run(), "post", "/run-flow", 200),
    ("run-cache-hit", {"flows.faq.cache": {"ttl_s": 60}}, None, twice(post_run()), "post",
     "/run-flow", 200),
    ("run-fallback", {"upstream.url": DEAD, "flows.faq.fallback": {"output": "busy"}}, None,
     post_run(), "post", "/run-flow", 200),
    ("run-stream", {}, sse, post_run({**FLOW, "stream": True}), "post", "/run-flow", 200),
    ("run-bad-json", {}, None, lambda c: c.post("/run-flow", data="{", content_type="application/json"),
     "post", "/run-flow", 400),
    ("run-unknown-field", {}, None, post_run({**FLOW, "x": 1}), "post", "/run-flow", 400),
    ("run-no-key", KEYS, None, post_run(), "post", "/run-flow", 401),
    ("run-flow-not-allowed", ONLY_FAQ, None,
     post_run({"flow_id": "other", "input": "x"}, headers={"x-api-key": APP_KEY}), "post",
     "/run-flow", 403),
    ("run-unknown-flow", {}, engine_says(404, "flow_not_found"), post_run(), "post", "/run-flow", 404),
    ("run-key-reused", {}, engine_says(409, "conflict"), post_run(), "post", "/run-flow", 409),
    ("run-too-large", {"max_body_bytes": 1024}, None, post_run({**FLOW, "input": "x" * 2000}),
     "post", "/run-flow", 413),
    ("run-not-json", {}, None, lambda c: c.post("/run-flow", data="x", content_type="text/plain"),
     "post", "/run-flow", 415),
    ("run-bad-tweaks", {}, engine_says(422, "invalid_tweaks"), post_run(), "post", "/run-flow", 422),
    ("run-rate-limited", {"ratelimit": {"requests_per_s": 0.001, "burst": 1}}, None,
     twice(post_run()), "post", "/run-flow", 429),
    ("run-engine-500", {}, engine_says(500, "internal"), post_run(), "post", "/run-flow", 500),
    ("run-llm-failed", {}, engine_says(502, "llm_error"), post_run(), "post", "/run-flow", 502),
    ("run-engine-down", {"upstream.url": DEAD}, None, post_run(), "post", "/run-flow", 503),
    ("run-circuit-open", {"upstream.url": DEAD, "breaker.consecutive_failures": 1,
                          "retry.max_attempts": 1}, None, twice(post_run()), "post",
     "/run-flow", 503),
    ("run-timeout", {"upstream.url": SILENT, "upstream.timeouts.per_try_s": 0.05,
                     "retry.max_attempts": 2}, None, post_run(), "post", "/run-flow", 504),
    ("events", {}, sse, lambda c: c.get("/runs/r1/events"), "get", "/runs/{run_id}/events", 200),
    ("events-bad-last-id", {}, None, lambda c: c.get("/runs/r1/events?last_event_id=x"), "get",
     "/runs/{run_id}/events", 400),
    ("events-no-key", KEYS, None, lambda c: c.get("/runs/r1/events"), "get",
     "/runs/{run_id}/events", 401),
    ("events-other-flow", ONLY_FAQ, run_of_flow("other"),
     lambda c: c.get("/runs/r1/events", headers={"x-api-key": APP_KEY}), "get",
     "/runs/{run_id}/events", 403),
    ("events-unknown-run", {}, engine_says(404, "run_not_found"),
     lambda c: c.get("/runs/r1/events"), "get", "/runs/{run_id}/events", 404),
    ("events-elsewhere", {}, engine_says(409, "conflict"), lambda c: c.get("/runs/r1/events"),
     "get", "/runs/{run_id}/events", 409),
    ("events-rate-limited", {"ratelimit": {"requests_per_s": 0.001, "burst": 1}}, sse,
     twice(lambda c: c.get("/runs/r1/events")), "get", "/runs/{run_id}/events", 429),
    ("events-engine-500", {}, engine_says(500, "internal"), lambda c: c.get("/runs/r1/events"),
     "get", "/runs/{run_id}/events", 500),
    ("events-engine-502", {}, engine_says(502, "bad_upstream"), lambda c: c.get("/runs/r1/events"),
     "get", "/runs/{run_id}/events", 502),
    ("events-engine-down", {"upstream.url": DEAD}, None, lambda c: c.get("/runs/r1/events"),
     "get", "/runs/{run_id}/events", 503),
    ("events-timeout", {"upstream.url": SILENT, "upstream.timeouts.stream_first_byte_s": 0.05,
                        "retry.max_attempts": 1}, None, lambda c: c.get("/runs/r1/events"),
     "get", "/runs/{run_id}/events", 504),
    ("ws-not-an-upgrade", {}, None, lambda c: c.get("/ws/run-flow"), "get", "/ws/run-flow", 400),
    ("ws-bad-key", {}, None,
     lambda c: c.get("/ws/run-flow", headers={**UPGRADE, "Sec-WebSocket-Key": "short"}), "get",
     "/ws/run-flow", 400),
    ("ws-no-credentials", KEYS, None, lambda c: c.get("/ws/run-flow", headers=UPGRADE), "get",
     "/ws/run-flow", 401),
    ("ws-another-origin", {}, None,
     lambda c: c.get("/ws/run-flow", headers={**UPGRADE, "Origin": "https://evil.example"}),
     "get", "/ws/run-flow", 403),
    ("ws-version-8", {}, None,
     lambda c: c.get("/ws/run-flow", headers={**UPGRADE, "Sec-WebSocket-Version": "8"}), "get",
     "/ws/run-flow", 426),
    ("ws-rate-limited", {"ratelimit": {"requests_per_s": 0.001, "burst": 1}}, None,
     lambda c: (run_flow(c), c.get("/ws/run-flow", headers=UPGRADE))[1], "get", "/ws/run-flow",
     429),
    ("healthz", {}, None, lambda c: c.get("/healthz"), "get", "/healthz", 200),
    ("readyz", {}, None, lambda c: c.get("/readyz"), "get", "/readyz", 200),
    ("readyz-verbose", {}, None, lambda c: c.get("/readyz?verbose=1"), "get", "/readyz", 200),
    ("metrics", {}, None, lambda c: c.get("/metrics"), "get", "/metrics", 200),
    ("openapi", {}, None, lambda c: c.get("/openapi.json"), "get", "/openapi.json", 200),
]


@pytest.mark.parametrize(("config", "script", "call", "method", "path", "status"),
                         [pytest.param(*s[1:], id=s[0]) for s in SCENARIOS])
def test_every_answer_matches_the_document(make_app, engine, dead_port, silent_port, config,
                                           script, call, method, path, status) -> None:
    ports = {DEAD: dead_port, SILENT: silent_port}
    if config.get("upstream.url") in ports:
        config = {**config, "upstream.url": f"http://127.0.0.1:{ports[config['upstream.url']]}"}
    client, _ = make_app(config)
    if script is not None:
        script(engine)
    response = call(client)
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    document = Document(spec_of(client))
    assert document.problems(method, path, response.status_code, response.headers,
                             response.get_data()) == []


def test_the_scenarios_cover_every_documented_status(make_app) -> None:
    """Each status the document lists is one the app was seen to give, above — but the 101
    of a WebSocket upgrade (the test client cannot make one) and the HTTP server's own 414
    and 431 (before the app: tests/integration/test_ambassador_reliability.py)."""
    client, _ = make_app()
    documented = {(method, path, int(status)) for path, item in spec_of(client)["paths"].items()
                  for method, op in item.items() for status in op["responses"]}
    seen = {(s[4], s[5], s[6]) for s in SCENARIOS}
    server = {(method, path, status) for method, path, status in documented
              if status in (414, 431)}
    assert len(server) == 2 * len(spec_of(client)["paths"])  # on every operation
    assert documented - seen - server == {("get", "/ws/run-flow", 101)}
    assert seen <= documented


@pytest.mark.parametrize(("method", "path", "allow"), [
    pytest.param("POST", "/healthz", "GET", id="post-healthz"),
    pytest.param("DELETE", "/runs/r1/events", "GET", id="delete-events"),
    pytest.param("POST", "/ws/run-flow", "GET", id="post-ws"),
    pytest.param("PUT", "/openapi.json", "GET", id="put-openapi"),
])
def test_a_method_a_path_does_not_have_is_405_with_allow(make_app, engine, method, path,
                                                         allow) -> None:
    client, _ = make_app()
    response = client.open(path, method=method, headers=UPGRADE if "ws" in path else {})
    assert_error_contract(response, 405, "method_not_allowed")
    assert allow in {m.strip() for m in response.headers["Allow"].split(",")}
    assert engine.requests == []


def test_the_document_describes_the_run_body_the_route_accepts(make_app, engine) -> None:
    """Every field of the documented body is one /run-flow takes, and a body with one it
    does not know is a 400, as the schema's additionalProperties: false says."""
    client, _ = make_app()
    schema = spec_of(client)["components"]["schemas"]["RunFlowRequest"]
    from ambassador.run_flow import RUN_FLOW_FIELDS

    assert set(schema["properties"]) == RUN_FLOW_FIELDS
    full = {"flow_id": "faq", "input": "x", "session_id": "s", "tweaks": {}, "version": 1,
            "stream": False, "input_type": "chat", "output_type": "chat",
            "on_disconnect": "cancel"}
    assert client.post("/run-flow", json=full).status_code == 200
    assert json.loads(json.dumps(engine.requests[-1]["body"]))["input_value"] == "x"
