"""``GET /api/v1/openapi.json`` is a valid OpenAPI document that describes exactly the
routes the app serves (no more, no fewer)."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def served_operations(app) -> set[tuple[str, str]]:
    """(OpenAPI path, lower-case method) for every route of the app but ``static``."""
    operations = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("console."):
            continue  # the console's pages and files are not the API
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        operations |= {(path, m.lower()) for m in rule.methods - IGNORED_METHODS}
    return operations


def test_openapi_document_is_valid(client, auth):
    resp = client.get("/api/v1/openapi.json", headers=auth)

    assert resp.status_code == 200
    spec = resp.get_json()
    validate(spec)
    assert spec["openapi"].startswith("3.1")


def test_openapi_paths_are_exactly_the_served_routes(app, client, auth):
    spec = client.get("/api/v1/openapi.json", headers=auth).get_json()
    described = {(path, method) for path, item in spec["paths"].items() for method in item
                 if method in {"get", "put", "post", "delete", "patch"}}

    served = served_operations(app)

    assert ("/api/v1/flows/{flow_ref}/versions/{number}", "get") in served
    assert described == served


def test_openapi_needs_a_key(client):
    assert client.get("/api/v1/openapi.json").status_code == 401


def test_openapi_marks_exactly_the_keyless_routes_as_public(client, auth):
    spec = client.get("/api/v1/openapi.json", headers=auth).get_json()
    assert spec["security"], "API operations need a key unless they say otherwise"

    public = {path for path, item in spec["paths"].items() for op in item.values()
              if isinstance(op, dict) and op.get("security") == []}

    assert public == {"/healthz", "/readyz", "/metrics"}
    for path in public:
        assert client.get(path).status_code == 200
