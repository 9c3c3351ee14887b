"""Flow CRUD, versions, publish, rollback, routing (canary, sticky), components and validate
over HTTP (DESIGN.md "Engine HTTP API"), on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading
from collections import Counter

import pytest

from flow_engine.components import default_registry

# -- create, list, read -----------------------------------------------------------------------


@pytest.mark.parametrize(("top", "id_pattern", "name"), [
    pytest.param({"id": "support-bot", "name": "Support bot"}, r"support-bot", "Support bot",
                 id="explicit-id"),
    pytest.param({"name": "FAQ Bot!"}, r"faq-bot-[0-9a-f]{8}", "FAQ Bot!", id="id-from-name"),
    pytest.param({}, r"flow-[0-9a-f]{8}", None, id="neither-id-nor-name"),
    pytest.param({"name": "¿¡!!"}, r"flow-[0-9a-f]{8}", "¿¡!!", id="name-without-letters"),
    pytest.param({"name": "Long " * 30}, r"(long-){9}lon-[0-9a-f]{8}", "Long " * 30,
                 id="long-name-slug-cut-at-48"),
])
def test_create_flow_is_version_1_live_at_its_location(client, auth, defs, top, id_pattern, name):
    definition = defs.echo("Hello {question}", **top)

    resp = client.post("/api/v1/flows", json=definition, headers=auth)

    assert resp.status_code == 201
    body = resp.get_json()
    assert re.fullmatch(id_pattern, body["id"]), body["id"]
    assert body["name"] == (name or body["id"])
    assert (body["latest_version"], body["live_version"]) == (1, 1)
    assert body["previous_live_versions"] == [] and body["routing"] is None
    assert body["definition"]["id"] == body["id"]
    assert body["definition"]["nodes"] == definition["nodes"]
    assert resp.headers["Location"] == f"/api/v1/flows/{body['id']}"
    assert client.get(resp.headers["Location"], headers=auth).get_json()["id"] == body["id"]


@pytest.mark.parametrize("clash", [
    pytest.param({"id": "taken", "name": "another name"}, id="same-id"),
    pytest.param({"id": "other", "name": "Taken name"}, id="same-name"),
])
def test_create_flow_with_a_taken_id_or_name_is_409(client, auth, defs, create_flow, clash):
    create_flow(defs.echo(id="taken", name="Taken name"))

    resp = client.post("/api/v1/flows", json=defs.echo(**clash), headers=auth)

    assert resp.status_code == 409
    assert resp.get_json()["error"]["code"] == "conflict"


def test_list_flows_pages_with_limit_and_offset(client, auth, defs, create_flow):
    for name in ("alpha", "beta", "gamma"):
        create_flow(defs.echo(id=f"flow-{name}", name=name))

    def ids(query=""):
        resp = client.get(f"/api/v1/flows{query}", headers=auth)
        assert resp.status_code == 200
        return [f["id"] for f in resp.get_json()["flows"]]

    assert ids() == ["flow-alpha", "flow-beta", "flow-gamma"]
    assert ids("?limit=2") == ["flow-alpha", "flow-beta"]
    assert ids("?limit=2&offset=2") == ["flow-gamma"]
    assert ids("?offset=3") == []
    body = client.get("/api/v1/flows?limit=1&offset=1", headers=auth).get_json()
    assert (body["limit"], body["offset"]) == (1, 1)
    assert "definition" not in body["flows"][0]


@pytest.mark.parametrize("query", [
    pytest.param("limit=0", id="limit-zero"),
    pytest.param("limit=1001", id="limit-too-big"),
    pytest.param("limit=ten", id="limit-not-int"),
    pytest.param("offset=-1", id="offset-negative"),
])
def test_list_flows_rejects_bad_paging(client, auth, query):
    resp = client.get(f"/api/v1/flows?{query}", headers=auth)

    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize("ref", [pytest.param("faq", id="by-id"),
                                 pytest.param("FAQ answerer", id="by-name")])
def test_get_flow_by_id_or_name(client, auth, defs, create_flow, ref):
    create_flow(defs.echo("FAQ: {question}", id="faq", name="FAQ answerer"))

    resp = client.get(f"/api/v1/flows/{ref}", headers=auth)

    assert resp.status_code == 200
    body = resp.get_json()
    assert (body["id"], body["name"], body["live_version"]) == ("faq", "FAQ answerer", 1)
    assert body["definition"]["nodes"][1]["params"]["template"] == "FAQ: {question}"


def test_get_unknown_flow_is_404(client, auth):
    resp = client.get("/api/v1/flows/nope", headers=auth)

    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "flow_not_found"


# -- versions ----------------------------------------------------------------------------------


def test_put_adds_version_2_that_is_not_live(client, auth, defs, create_flow, run_flow):
    create_flow(defs.echo("V1 {question}", id="f"))

    resp = client.put("/api/v1/flows/f", json=defs.echo("V2 {question}"), headers=auth)

    assert resp.status_code == 201
    body = resp.get_json()
    assert (body["flow_id"], body["version"], body["live"]) == ("f", 2, False)
    assert body["definition"]["nodes"][1]["params"]["template"] == "V2 {question}"
    flow = client.get("/api/v1/flows/f", headers=auth).get_json()
    assert (flow["latest_version"], flow["live_version"]) == (2, 1)
    assert flow["definition"]["nodes"][1]["params"]["template"] == "V1 {question}"
    run = run_flow("f", {"input_value": "x"}).get_json()
    assert (run["version"], run["output"]) == (1, "[echo: not an LLM] V1 x")


def test_put_with_a_different_id_in_the_body_is_400(client, auth, defs, create_flow):
    create_flow(defs.echo(id="f"))

    resp = client.put("/api/v1/flows/f", json=defs.echo(id="g"), headers=auth)

    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "bad_request"
    assert client.get("/api/v1/flows/f", headers=auth).get_json()["latest_version"] == 1


def test_put_an_invalid_definition_is_422_and_adds_nothing(client, auth, defs, create_flow):
    create_flow(defs.echo(id="f"))
    broken = defs.echo()
    broken["nodes"][2]["type"] = "ChatModle"

    resp = client.put("/api/v1/flows/f", json=broken, headers=auth)

    assert resp.status_code == 422
    assert [p["path"] for p in resp.get_json()["error"]["problems"]] == ["$.nodes[2].type"]
    assert client.get("/api/v1/flows/f", headers=auth).get_json()["latest_version"] == 1


def test_put_with_another_flows_name_is_409(client, auth, defs, create_flow):
    create_flow(defs.echo(id="f", name="first"))
    create_flow(defs.echo(id="g", name="second"))

    resp = client.put("/api/v1/flows/f", json=defs.echo(name="second"), headers=auth)

    assert resp.status_code == 409
    assert client.get("/api/v1/flows/first", headers=auth).get_json()["latest_version"] == 1


def test_put_by_name_keeps_the_id(client, auth, defs, create_flow):
    create_flow(defs.echo(id="f", name="first"))

    resp = client.put("/api/v1/flows/first", json=defs.echo("V2 {question}"), headers=auth)

    assert resp.status_code == 201
    assert (resp.get_json()["flow_id"], resp.get_json()["version"]) == ("f", 2)
    assert resp.get_json()["definition"]["name"] == "first"


def test_put_on_an_unknown_flow_is_404(client, auth, defs):
    resp = client.put("/api/v1/flows/nope", json=defs.echo(), headers=auth)

    assert resp.status_code == 404


def test_versions_list_and_one_version(client, auth, defs, create_flow):
    create_flow(defs.echo("V1 {question}", id="f"))
    client.put("/api/v1/flows/f", json=defs.echo("V2 {question}"), headers=auth)

    listing = client.get("/api/v1/flows/f/versions", headers=auth)
    one = client.get("/api/v1/flows/f/versions/2", headers=auth)
    missing = client.get("/api/v1/flows/f/versions/3", headers=auth)

    assert listing.status_code == 200
    body = listing.get_json()
    assert (body["flow_id"], body["live_version"]) == ("f", 1)
    assert [(v["version"], v["live"]) for v in body["versions"]] == [(1, True), (2, False)]
    assert all("definition" not in v for v in body["versions"])
    assert one.status_code == 200
    assert (one.get_json()["version"], one.get_json()["live"]) == (2, False)
    assert one.get_json()["definition"]["nodes"][1]["params"]["template"] == "V2 {question}"
    assert missing.status_code == 404


def test_delete_flow_is_204_then_404(client, auth, defs, create_flow, run_flow):
    create_flow(defs.echo(id="f"))

    resp = client.delete("/api/v1/flows/f", headers=auth)

    assert resp.status_code == 204
    assert resp.get_data() == b""
    for after in (client.get("/api/v1/flows/f", headers=auth),
                  client.get("/api/v1/flows/f/versions", headers=auth),
                  client.delete("/api/v1/flows/f", headers=auth),
                  run_flow("f", {"input_value": "x"})):
        assert after.status_code == 404
        assert after.get_json()["error"]["code"] == "flow_not_found"


# -- publish and rollback --------------------------------------------------------------------


def test_publish_moves_live_and_runs_follow(client, auth, defs, create_flow, run_flow):
    create_flow(defs.echo("V1 {question}", id="f"))
    client.put("/api/v1/flows/f", json=defs.echo("V2 {question}"), headers=auth)

    resp = client.post("/api/v1/flows/f/publish", json={"version": 2}, headers=auth)

    assert resp.status_code == 200
    body = resp.get_json()
    assert (body["live_version"], body["previous_live_versions"]) == (2, [1])
    run = run_flow("f", {"input_value": "x"}).get_json()
    assert (run["version"], run["output"]) == (2, "[echo: not an LLM] V2 x")


def test_publish_a_missing_version_is_404(client, auth, defs, create_flow):
    create_flow(defs.echo(id="f"))

    resp = client.post("/api/v1/flows/f/publish", json={"version": 5}, headers=auth)

    assert resp.status_code == 404
    assert client.get("/api/v1/flows/f", headers=auth).get_json()["live_version"] == 1


@pytest.mark.parametrize("body", [
    pytest.param({}, id="no-version"),
    pytest.param({"version": "2"}, id="string"),
    pytest.param({"version": 0}, id="zero"),
    pytest.param({"version": True}, id="boolean"),
    pytest.param({"version": 1.5}, id="float"),
    pytest.param([2], id="not-an-object"),
])
def test_publish_with_a_bad_body_is_400(client, auth, defs, create_flow, body):
    create_flow(defs.echo(id="f"))

    resp = client.post("/api/v1/flows/f/publish", json=body, headers=auth)

    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "bad_request"


def test_rollback_returns_to_the_previous_live_version_until_none_is_left(
        client, auth, defs, create_flow, run_flow):
    create_flow(defs.echo("V1 {question}", id="f"))
    for n in (2, 3):
        client.put("/api/v1/flows/f", json=defs.echo(f"V{n} {{question}}"), headers=auth)
        client.post("/api/v1/flows/f/publish", json={"version": n}, headers=auth)

    first = client.post("/api/v1/flows/f/rollback", headers=auth)
    assert first.status_code == 200
    assert (first.get_json()["live_version"], first.get_json()["previous_live_versions"]) == (2, [1])
    assert run_flow("f", {"input_value": "x"}).get_json()["output"] == "[echo: not an LLM] V2 x"

    second = client.post("/api/v1/flows/f/rollback", headers=auth)
    assert second.get_json()["live_version"] == 1

    none_left = client.post("/api/v1/flows/f/rollback", headers=auth)
    assert none_left.status_code == 409
    assert none_left.get_json()["error"]["code"] == "conflict"
    assert client.get("/api/v1/flows/f", headers=auth).get_json()["live_version"] == 1


def test_concurrent_publishes_serialise(app, auth, defs, create_flow, client):
    create_flow(defs.echo(id="f"))
    for n in (2, 3):
        client.put("/api/v1/flows/f", json=defs.echo(f"V{n} {{question}}"), headers=auth)
    barrier = threading.Barrier(2)
    statuses: dict[int, int] = {}

    def publish(version: int) -> None:
        own = app.test_client()
        barrier.wait()
        statuses[version] = own.post("/api/v1/flows/f/publish", json={"version": version},
                                     headers=auth).status_code

    threads = [threading.Thread(target=publish, args=(n,)) for n in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert statuses == {2: 200, 3: 200}
    flow = client.get("/api/v1/flows/f", headers=auth).get_json()
    assert flow["live_version"] in (2, 3)
    loser = 5 - flow["live_version"]
    # serialised: the second publish saw the first one's result
    assert flow["previous_live_versions"] == [1, loser]


# -- routing -------------------------------------------------------------------------------


@pytest.fixture
def two_versions(client, auth, defs, create_flow):
    """Flow 'f' with version 1 (live, answers 'V1 ...') and version 2 ('V2 ...')."""
    create_flow(defs.echo("V1 {question}", id="f"))
    resp = client.put("/api/v1/flows/f", json=defs.echo("V2 {question}"), headers=auth)
    assert resp.status_code == 201
    return "f"


@pytest.mark.parametrize("body", [
    pytest.param([1], id="not-an-object"),
    pytest.param({"weights": {"1": 50}}, id="unknown-key"),
    pytest.param({"live": 3}, id="live-missing-version"),
    pytest.param({"live": "2"}, id="live-string"),
    pytest.param({"canary": 2}, id="canary-not-an-object"),
    pytest.param({"canary": {"version": 3, "percent": 10}}, id="canary-missing-version"),
    pytest.param({"canary": {"version": 0, "percent": 10}}, id="canary-version-zero"),
    pytest.param({"canary": {"percent": 10}}, id="canary-without-version"),
    pytest.param({"canary": {"version": 2, "percent": 101}}, id="percent-over-100"),
    pytest.param({"canary": {"version": 2, "percent": -1}}, id="percent-negative"),
    pytest.param({"canary": {"version": 2, "percent": "10"}}, id="percent-string"),
    pytest.param({"canary": {"version": 2, "percent": True}}, id="percent-boolean"),
    pytest.param({"canary": {"version": 2, "percent": 10, "seed": 1}}, id="canary-unknown-key"),
    pytest.param({"canary": {"version": 2, "percent": 10}, "sticky_key": "user_id"},
                 id="sticky-key-unknown"),
])
def test_routing_rejects_bad_bodies(client, auth, two_versions, body):
    resp = client.put("/api/v1/flows/f/routing", json=body, headers=auth)

    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "bad_request"
    flow = client.get("/api/v1/flows/f", headers=auth).get_json()
    assert (flow["live_version"], flow["routing"]) == (1, None)


def test_routing_live_moves_the_live_version(client, auth, two_versions, run_flow):
    resp = client.put("/api/v1/flows/f/routing", json={"live": 2}, headers=auth)

    assert resp.status_code == 200
    assert (resp.get_json()["live_version"], resp.get_json()["routing"]) == (2, None)
    assert run_flow("f", {"input_value": "x"}).get_json()["version"] == 2


@pytest.mark.parametrize(("routing", "body", "served"), [
    pytest.param({"canary": {"version": 2, "percent": 100}}, {}, {2}, id="canary-100"),
    pytest.param({"canary": {"version": 2, "percent": 0}}, {}, {1}, id="canary-0"),
    pytest.param({"canary": {"version": 2, "percent": 100}}, {"version": 1}, {1},
                 id="pin-beats-canary"),
    pytest.param({"live": 2, "canary": {"version": 1, "percent": 100}}, {}, {1},
                 id="live-and-canary-together"),
    pytest.param({"canary": {"version": 2, "percent": 100}, "sticky_key": "session_id"},
                 {"session_id": "s"}, {2}, id="sticky-100"),
])
def test_routing_decides_the_version(client, auth, two_versions, run_flow, routing, body, served):
    assert client.put("/api/v1/flows/f/routing", json=routing, headers=auth).status_code == 200

    versions = {run_flow("f", {"input_value": "x", **body}).get_json()["version"] for _ in range(8)}

    assert versions == served


def _versions_served(run_flow, sessions):
    served = {}
    for session in sessions:
        body = run_flow("f", {"input_value": "x", "session_id": session}).get_json()
        # the version in the response is the one that ran
        assert body["output"] == f"[echo: not an LLM] V{body['version']} x"
        served[session] = body["version"]
    return served


def test_sticky_canary_keeps_each_session_on_one_version(client, auth, two_versions, run_flow):
    routing = {"canary": {"version": 2, "percent": 50}, "sticky_key": "session_id"}
    resp = client.put("/api/v1/flows/f/routing", json=routing, headers=auth)
    assert resp.status_code == 200
    assert resp.get_json()["routing"] == routing

    sessions = [f"sticky-{i}" for i in range(12)]
    first = _versions_served(run_flow, sessions)
    for _ in range(2):
        assert _versions_served(run_flow, sessions) == first
    assert set(first.values()) == {1, 2}


def test_canary_50_percent_serves_both_versions_across_sessions(client, auth, two_versions,
                                                                run_flow):
    routing = {"canary": {"version": 2, "percent": 50}, "sticky_key": "session_id"}
    assert client.put("/api/v1/flows/f/routing", json=routing, headers=auth).status_code == 200

    served = Counter(_versions_served(run_flow, [f"user-{i}" for i in range(200)]).values())

    assert set(served) == {1, 2}
    assert 50 <= served[2] <= 150, served  # a hash split: about half, never all or nothing


def test_publish_clears_the_canary(client, auth, two_versions):
    routing = {"canary": {"version": 2, "percent": 100}, "sticky_key": None}
    assert client.put("/api/v1/flows/f/routing", json=routing, headers=auth).status_code == 200

    resp = client.post("/api/v1/flows/f/publish", json={"version": 1}, headers=auth)

    assert resp.get_json()["routing"] is None


# -- components and validate -----------------------------------------------------------------


def test_components_describe_every_node_type(client, auth):
    resp = client.get("/api/v1/components", headers=auth)

    assert resp.status_code == 200
    components = resp.get_json()["components"]
    by_type = {c["type"]: c for c in components}
    assert sorted(by_type) == default_registry().names()
    assert "ChatHistory" in by_type
    for c in components:
        assert c["params_schema"]["type"] == "object", c["type"]
        assert isinstance(c["params_schema"].get("properties", {}), dict), c["type"]
        assert isinstance(c["inputs"], list), c["type"]
        assert isinstance(c["outputs"], list) and c["outputs"], c["type"]
    assert by_type["ChatHistory"]["outputs"] == ["history"]
    assert "max_messages" in by_type["ChatHistory"]["params_schema"]["properties"]
    assert "echo" in by_type["ChatModel"]["params_schema"]["properties"]["provider"]["enum"]
    assert [p["name"] for p in by_type["ChatModel"]["inputs"]] == ["prompt"]


def test_validate_accepts_a_valid_definition_without_storing_it(client, auth, defs):
    resp = client.post("/api/v1/flows/validate", json=defs.echo(name="not stored"), headers=auth)

    assert resp.status_code == 200
    assert resp.get_json() == {"valid": True, "nodes": 4, "edges": 3}
    assert client.get("/api/v1/flows", headers=auth).get_json()["flows"] == []


def test_validate_reports_every_problem_with_its_path(client, auth):
    definition = {
        "bogus": 1,
        "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "llm", "type": "ChatModle"},
            {"id": "p", "type": "PromptTemplate", "params": {"template": 5}},
            {"id": "m", "type": "ChatModel", "params": {"provider": "echo", "api_key": "sk-x"}},
        ],
        "edges": [{"source": "in", "target": "ghost"}],
    }

    resp = client.post("/api/v1/flows/validate", json=definition, headers=auth)

    assert resp.status_code == 422
    error = resp.get_json()["error"]
    assert error["code"] == "flow_invalid"
    problems = {p["path"]: p["message"] for p in error["problems"]}
    assert set(problems) == {"$.bogus", "$.nodes[1].type", "$.nodes[2].params.template",
                             "$.nodes[3].params.api_key", "$.edges[0].target"}
    assert "did you mean 'ChatModel'" in problems["$.nodes[1].type"]
    assert "OPENAI_API_KEY" in problems["$.nodes[3].params.api_key"]
