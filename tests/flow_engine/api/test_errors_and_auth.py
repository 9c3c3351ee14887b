"""API keys on every ``/api/v1`` route, the error contract of DESIGN.md "Errors" (always
``{"error": {"code", "message", "trace_id", ...}}``, no stack traces) and trace propagation
(``traceparent``, ``X-Trace-ID``, ``X-Request-ID``)."""

from __future__ import annotations

import re

import pytest

HEX32 = re.compile(r"[0-9a-f]{32}")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def assert_error(resp, status: int, code: str) -> dict:
    """The DESIGN.md error body, and nothing else; returns the inner ``error`` object."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert list(body) == ["error"]
    error = body["error"]
    assert {"code", "message", "trace_id"} <= set(error)
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert HEX32.fullmatch(error["trace_id"])
    assert error["trace_id"] == resp.headers["X-Trace-ID"]
    assert "Traceback" not in resp.get_data(as_text=True)
    return error


def api_routes(app) -> list[tuple[str, str]]:
    """Every (method, concrete path) the app serves under /api/v1."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/"):
            continue
        path = (rule.rule.replace("<flow_ref>", "some-flow").replace("<int:number>", "1")
                .replace("<run_id>", "some-run").replace("<kb_ref>", "some-kb")
                .replace("<doc_ref>", "some-doc"))
        assert "<" not in path, f"a new route parameter in {rule.rule}: name a value for it here"
        routes += [(method, path) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return routes


# -- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-key"),
    pytest.param({"Authorization": "Bearer wrong-key"}, id="wrong-bearer"),
    pytest.param({"x-api-key": "wrong-key"}, id="wrong-x-api-key"),
    pytest.param({"Authorization": "Bearer "}, id="empty-bearer"),
    pytest.param({"Authorization": "Basic dGVzdC1rZXk6"}, id="basic-scheme"),
    pytest.param({"Authorization": "test-key"}, id="no-scheme"),
    pytest.param({"x-api-key": "test-key-and-more"}, id="key-prefix"),
])
def test_every_api_route_refuses_requests_without_a_valid_key(app, client, headers):
    routes = api_routes(app)
    assert len(routes) >= 15

    for method, path in routes:
        resp = client.open(path, method=method, headers=headers, json={})
        error = assert_error(resp, 401, "unauthorized")
        assert resp.headers["WWW-Authenticate"] == "Bearer", (method, path)
        assert "key" in error["message"]


@pytest.mark.parametrize("headers", [
    pytest.param({"Authorization": "Bearer test-key"}, id="bearer"),
    pytest.param({"Authorization": "bearer test-key"}, id="bearer-lowercase"),
    pytest.param({"Authorization": "Bearer   test-key  "}, id="bearer-padded"),
    pytest.param({"x-api-key": "test-key"}, id="x-api-key"),
    pytest.param({"X-API-Key": "test-key"}, id="x-api-key-any-case"),
    pytest.param({"Authorization": "Bearer second-key"}, id="second-key-bearer"),
    pytest.param({"x-api-key": "second-key"}, id="second-key-x-api-key"),
    pytest.param({"x-api-key": "", "Authorization": "Bearer test-key"},
                 id="empty-x-api-key-does-not-hide-bearer"),
])
def test_accepted_credentials(client, headers):
    resp = client.get("/api/v1/flows", headers=headers)

    assert resp.status_code == 200
    assert resp.get_json()["flows"] == []


@pytest.mark.parametrize(("path", "mimetype"), [
    pytest.param("/healthz", "application/json", id="healthz"),
    pytest.param("/readyz", "application/json", id="readyz"),
    pytest.param("/metrics", "text/plain", id="metrics"),
])
def test_probes_and_metrics_need_no_key(client, path, mimetype):
    resp = client.get(path)

    assert resp.status_code == 200
    assert resp.mimetype == mimetype


# -- the error contract ------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), [
    pytest.param("POST", "/api/v1/flows", {"data": "{nope", "content_type": "application/json"},
                 400, "bad_request", id="malformed-json"),
    pytest.param("POST", "/api/v1/flows", {"data": b"\xff\xfe{}", "content_type": "application/json"},
                 400, "bad_request", id="not-utf8"),
    pytest.param("POST", "/api/v1/flows", {}, 400, "bad_request", id="missing-body"),
    pytest.param("POST", "/api/v1/flows", {"data": "<flow/>", "content_type": "application/xml"},
                 415, "unsupported_media_type", id="xml-body"),
    pytest.param("POST", "/api/v1/run/f", {"data": {"input_value": "x"}},
                 415, "unsupported_media_type", id="form-body"),
    pytest.param("PUT", "/api/v1/flows/f/routing", {"data": "{}", "content_type": "text/plain"},
                 415, "unsupported_media_type", id="text-body"),
    pytest.param("GET", "/api/v1/nope", {}, 404, "not_found", id="unknown-api-route"),
    pytest.param("GET", "/nope", {}, 404, "not_found", id="unknown-route"),
    pytest.param("GET", "/api/v1/flows/f/versions/two", {}, 404, "not_found", id="bad-int-segment"),
    pytest.param("DELETE", "/api/v1/flows", {}, 405, "method_not_allowed", id="delete-collection"),
    pytest.param("PATCH", "/api/v1/flows/f", {"json": {}}, 405, "method_not_allowed", id="patch"),
    pytest.param("GET", "/api/v1/run/f", {}, 405, "method_not_allowed", id="get-run"),
    pytest.param("POST", "/api/v1/flows", {"json": {"nodes": []}}, 422, "flow_invalid",
                 id="invalid-flow"),
    pytest.param("POST", "/api/v1/flows", {"json": [1, 2]}, 422, "flow_invalid",
                 id="flow-not-an-object"),
])
def test_errors_follow_the_contract(client, auth, defs, create_flow, method, path, kwargs, status,
                                    code):
    create_flow(defs.echo(id="f"))

    resp = client.open(path, method=method, headers=auth, **kwargs)

    error = assert_error(resp, status, code)
    if status == 405:
        assert method not in resp.headers["Allow"]
        assert resp.headers["Allow"]
    if status == 422:
        assert error["problems"] and all({"path", "message"} <= set(p) for p in error["problems"])
        assert all(p["path"].startswith("$") for p in error["problems"])


def test_run_flow_sent_to_the_engine_points_at_the_sidecar(client, auth) -> None:
    for path in ("/run-flow", "/run-flow/"):
        message = assert_error(client.post(path, headers=auth, json={"flow_id": "f"}), 404,
                               "not_found")["message"]
        assert "ambassador sidecar" in message and "POST /api/v1/run/{flow}" in message
    assert "sidecar" not in assert_error(client.get("/nope", headers=auth), 404,
                                         "not_found")["message"]


@pytest.mark.parametrize(("path", "body"), [
    pytest.param("/api/v1/flows", {"name": "big", "description": "d" * 2000,
                                   "nodes": [{"id": "in", "type": "ChatInput"}]}, id="create-flow"),
    pytest.param("/api/v1/run/f", {"input_value": "x" * 2000}, id="run"),
])
def test_a_body_over_the_limit_is_413(make_app, auth, defs, path, body):
    client = make_app(max_body_bytes=1024).test_client()
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=auth).status_code == 201

    resp = client.post(path, json=body, headers=auth)

    error = assert_error(resp, 413, "payload_too_large")
    assert "1024" in error["message"]
    assert client.get("/api/v1/flows", headers=auth).get_json()["flows"][0]["id"] == "f"
    assert len(client.get("/api/v1/flows", headers=auth).get_json()["flows"]) == 1


def test_an_unexpected_exception_is_a_scrubbed_500(app):
    def boom():
        raise RuntimeError("secret detail")

    app.add_url_rule("/test-only/boom", "test_boom", boom)

    resp = app.test_client().get("/test-only/boom")

    assert_error(resp, 500, "internal")
    assert "secret detail" not in resp.get_data(as_text=True)
    assert "RuntimeError" not in resp.get_data(as_text=True)


# -- tracing -----------------------------------------------------------------------------------


def test_a_valid_traceparent_is_kept_and_stored_on_the_run(client, auth, defs, create_flow,
                                                          run_flow):
    create_flow(defs.echo(id="f"))

    resp = run_flow("f", {"input_value": "x"},
                    headers={"traceparent": TRACEPARENT, "X-Request-ID": "req-123"})

    assert resp.status_code == 200
    assert resp.headers["X-Trace-ID"] == TRACE_ID
    assert resp.headers["traceparent"] == TRACEPARENT
    assert resp.headers["X-Request-ID"] == "req-123"
    record = client.get(f"/api/v1/runs/{resp.get_json()['run_id']}", headers=auth).get_json()
    assert record["trace_id"] == TRACE_ID


def test_error_bodies_carry_the_incoming_trace_id(client):
    resp = client.get("/api/v1/flows", headers={"traceparent": TRACEPARENT})

    assert assert_error(resp, 401, "unauthorized")["trace_id"] == TRACE_ID


@pytest.mark.parametrize("traceparent", [
    pytest.param("garbage", id="garbage"),
    pytest.param(f"00-{'0' * 32}-b7ad6b7169203331-01", id="zero-trace-id"),
    pytest.param(f"00-{TRACE_ID}-{'0' * 16}-01", id="zero-parent-id"),
    pytest.param(f"ff-{TRACE_ID}-b7ad6b7169203331-01", id="version-ff"),
    pytest.param(f"00-{TRACE_ID[:-1]}-b7ad6b7169203331-01", id="short-trace-id"),
    pytest.param(f"00-{TRACE_ID}-b7ad6b7169203331-01-extra", id="v00-with-suffix"),
])
def test_an_invalid_traceparent_is_replaced_by_a_new_trace(client, auth, defs, create_flow,
                                                          run_flow, traceparent):
    create_flow(defs.echo(id="f"))

    resp = run_flow("f", {"input_value": "x"}, headers={"traceparent": traceparent})

    assert resp.status_code == 200
    trace_id = resp.headers["X-Trace-ID"]
    assert HEX32.fullmatch(trace_id) and trace_id not in (TRACE_ID, "0" * 32)
    assert re.fullmatch(rf"00-{trace_id}-[0-9a-f]{{16}}-01", resp.headers["traceparent"])
    assert resp.headers["X-Request-ID"] == trace_id  # none came in: the trace id stands in
    record = client.get(f"/api/v1/runs/{resp.get_json()['run_id']}", headers=auth).get_json()
    assert record["trace_id"] == trace_id


@pytest.mark.parametrize(("incoming", "kept"), [
    pytest.param("req-123", True, id="plain"),
    pytest.param("a.b:c/d=e+f_g", True, id="punctuation"),
    pytest.param("has spaces", False, id="spaces"),
    pytest.param("r" * 201, False, id="too-long"),
])
def test_x_request_id_is_kept_when_valid(client, incoming, kept):
    resp = client.get("/healthz", headers={"X-Request-ID": incoming})

    expected = incoming if kept else resp.headers["X-Trace-ID"]
    assert resp.headers["X-Request-ID"] == expected
