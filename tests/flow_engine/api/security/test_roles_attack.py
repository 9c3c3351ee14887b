"""A runner key (what every app's ambassador holds) tries to change flows: create, add a
version, publish, roll back, re-route, delete. Each needs a higher role and answers 403
``forbidden`` naming it; nothing changes. Roles include the ones below them."""

from __future__ import annotations

import pytest
from support.keys import as_

from flow_engine.auth import ROLES, ROUTE_ROLES, KeyConfigError, parse_key, parse_keys

V2 = {"name": "f", "nodes": [{"id": "in", "type": "ChatInput"}, {"id": "out", "type": "ChatOutput"}],
      "edges": [{"source": "in", "target": "out"}]}

# (method, path, body, role needed)
CHANGES = [
    pytest.param("POST", "/api/v1/flows", {**V2, "id": "new", "name": "new"}, "editor", id="create"),
    pytest.param("PUT", "/api/v1/flows/f", V2, "editor", id="new-version"),
    pytest.param("POST", "/api/v1/flows/validate", V2, "editor", id="validate"),
    pytest.param("POST", "/api/v1/flows/f/publish", {"version": 1}, "publisher", id="publish"),
    pytest.param("POST", "/api/v1/flows/f/rollback", None, "publisher", id="rollback"),
    pytest.param("PUT", "/api/v1/flows/f/routing", {"canary": {"version": 1, "percent": 50}},
                 "publisher", id="routing"),
    pytest.param("DELETE", "/api/v1/flows/f", None, "admin", id="delete"),
]


def _send(client, method, path, body, headers):
    kwargs = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    return client.open(path, method=method, **kwargs)


@pytest.fixture
def flow(api, defs):
    resp = api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    assert resp.status_code == 201
    return resp.get_json()


@pytest.mark.parametrize(("method", "path", "body", "needed"), CHANGES)
@pytest.mark.parametrize("who", ["runner", "proxy"])
def test_a_runner_key_cannot_change_flows(api, flow, method, path, body, needed, who):
    before = api.get("/api/v1/flows/f", headers=as_("admin")).get_json()

    resp = _send(api, method, path, body, as_(who))

    assert resp.status_code == 403, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert (error["code"], error["role"]) == ("forbidden", needed)
    assert f"needs the {needed} role" in error["message"]
    assert api.get("/api/v1/flows/f", headers=as_("admin")).get_json() == before


@pytest.mark.parametrize(("method", "path", "body", "needed"), CHANGES)
@pytest.mark.parametrize("who", ["editor", "publisher", "admin"])
def test_each_role_may_do_what_its_rank_allows(api, flow, method, path, body, needed, who):
    allowed = ROLES.index({"editor": "editor", "publisher": "publisher", "admin": "admin"}[who]) \
        >= ROLES.index(needed)

    resp = _send(api, method, path, body, as_(who))

    if allowed:  # past the role check (a rollback with no earlier version is still a 409)
        assert resp.status_code not in (401, 403), resp.get_data(as_text=True)
    else:
        assert resp.status_code == 403
        assert resp.get_json()["error"]["role"] == needed


@pytest.mark.parametrize(("method", "path"), [
    pytest.param("GET", "/api/v1/flows", id="list"),
    pytest.param("GET", "/api/v1/flows/f", id="read"),
    pytest.param("GET", "/api/v1/flows/f/versions", id="versions"),
    pytest.param("GET", "/api/v1/flows/f/versions/1", id="version"),
    pytest.param("GET", "/api/v1/components", id="components"),
    pytest.param("GET", "/api/v1/openapi.json", id="openapi"),
])
def test_a_runner_key_reads_flows_and_runs_them(api, flow, method, path):
    assert api.open(path, method=method, headers=as_("runner")).status_code == 200
    run = api.post("/api/v1/run/f", json={"input_value": "hi"}, headers=as_("runner"))
    assert run.status_code == 200


def test_every_api_route_has_a_role_decided(app):
    """A new /api/v1 route must be placed in ROUTE_ROLES (until then it needs admin)."""
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()
                 if rule.rule.startswith("/api/v1/")}
    assert endpoints == set(ROUTE_ROLES)


def test_an_unknown_route_is_401_without_a_key_and_404_with_any(api):
    assert api.get("/api/v1/nothing-here").status_code == 401
    assert api.get("/api/v1/nothing-here", headers=as_("runner")).status_code == 404


@pytest.mark.parametrize(("entry", "name", "role", "proxy"), [
    pytest.param("ci:publisher:s3cret-value", "ci", "publisher", False, id="named"),
    pytest.param("amb:runner+proxy:s3cret:with:colons", "amb", "runner", True, id="proxy"),
    pytest.param("plain-old-secret", None, "admin", False, id="bare-secret-is-admin"),
])
def test_key_entries(entry, name, role, proxy):
    key = parse_key(entry)
    assert (key.role, key.proxy) == (role, proxy)
    if name:
        assert key.name == name
    else:
        assert key.name.startswith("key-") and len(key.name) == 12
    assert entry.rsplit(":", 1)[-1] not in repr(key) or name is None


@pytest.mark.parametrize(("entries", "fragment"), [
    pytest.param(["app:root:secret-1234"], "the second field is not a role", id="unknown-role"),
    pytest.param(["app:runner+sudo:secret-1234"], "not a role", id="unknown-suffix"),
    pytest.param(["app:runner:short"], "at least 8", id="short-secret"),
    pytest.param(["bad name:runner:secret-1234"], "the first field", id="bad-name"),
    pytest.param(["app:secret-5678:runner"], "not a role", id="fields-out-of-order"),
    pytest.param(["a:runner:secret-1234", "b:admin:secret-1234"], "configured twice",
                 id="same-secret"),
    pytest.param(["a:runner:secret-1234", "a:admin:secret-5678"], "configured twice",
                 id="same-name"),
    pytest.param(["half:configured"], "one ':'", id="one-colon"),
])
def test_bad_key_entries_stop_the_engine_with_a_message(entries, fragment):
    with pytest.raises(KeyConfigError) as info:
        parse_keys(entries)
    assert fragment in str(info.value)
    assert "secret-5678" not in str(info.value)


def test_a_bad_key_entry_refuses_to_start(make_app):
    from flow_engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"FLOW_ENGINE_API_KEYS \(entry 1\): API key 'app': the second"):
        make_app(api_keys="app:superuser:secret-1234")


@pytest.mark.parametrize(("headers", "actor"), [
    pytest.param(as_("runner"), "orders-app", id="runner-key"),
    pytest.param(as_("admin"), "platform", id="admin-key"),
    pytest.param(as_("runner", **{"x-flowgate-identity": "mallory"}), "orders-app",
                 id="a-plain-key-cannot-name-another-actor"),
    pytest.param(as_("proxy"), "ambassador", id="proxy-alone"),
    pytest.param(as_("proxy", **{"x-flowgate-identity": "alice", "x-flowgate-tenant": "shop-a"}),
                 "ambassador/alice", id="proxy-with-its-caller"),
])
def test_the_access_log_names_the_key_as_the_actor(api, caplog, headers, actor):
    """Who did what is read from the access log: the key's name (and, behind a proxy, the
    caller it forwarded), never the secret that authenticated the request."""
    with caplog.at_level("INFO", logger="flow_engine.access"):
        assert api.get("/api/v1/flows", headers=headers).status_code == 200

    [line] = [r for r in caplog.records if r.name == "flow_engine.access"
              and getattr(r, "route", None) == "/api/v1/flows"]
    assert line.actor == actor
    secret = headers["Authorization"].removeprefix("Bearer ")
    assert secret not in repr(vars(line))


def test_a_bare_secret_is_logged_by_its_derived_name(make_app, caplog):
    client = make_app(api_keys="legacy-bare-secret-01").test_client()
    with caplog.at_level("INFO", logger="flow_engine.access"):
        headers = {"Authorization": "Bearer legacy-bare-secret-01"}
        assert client.get("/api/v1/flows", headers=headers).status_code == 200

    [line] = [r for r in caplog.records if r.name == "flow_engine.access"]
    assert line.actor == parse_key("legacy-bare-secret-01").name
    assert line.actor.startswith("key-") and "legacy" not in repr(vars(line))
