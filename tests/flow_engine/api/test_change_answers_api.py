"""The answers of publish, rollback and routing carry the audit entry their change wrote
(``"audit"``), beside the flow they always answered — on SQLite and PostgreSQL. A console
shows that entry: never another person's change that landed just after."""

from __future__ import annotations

from typing import Any

import pytest

from flow_engine.store.base import Change, StoreError

FLOW_FIELDS = {"id", "name", "description", "latest_version", "live_version",
               "previous_live_versions", "routing", "created_at", "updated_at"}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def two_versions(client, auth, defs, create_flow):
    """Flow 'f': version 1 live, version 2 not."""
    create_flow(defs.echo("V1 {question}", id="f"))
    resp = client.put("/api/v1/flows/f", json=defs.echo("V2 {question}"), headers=auth)
    assert resp.status_code == 201
    return "f"


def newest_entry(client, auth) -> dict[str, Any]:
    return client.get("/api/v1/flows/f/audit?limit=1", headers=auth).get_json()["entries"][0]


@pytest.mark.parametrize(("method", "path", "body", "action", "versions"), [
    pytest.param("post", "publish", {"version": 2, "message": "ship v2"}, "publish", (1, 2),
                 id="publish"),
    pytest.param("put", "routing", {"canary": {"version": 2, "percent": 10},
                                    "sticky_key": "session_id", "message": "ship v2"},
                 "routing", (1, 2), id="routing"),
])
def test_a_change_answers_the_flow_and_the_audit_entry_it_wrote(
        client, auth, two_versions, method, path, body, action, versions):
    resp = getattr(client, method)(f"/api/v1/flows/f/{path}", json=body, headers=auth)

    assert resp.status_code == 200, resp.get_data(as_text=True)
    answer = resp.get_json()
    assert set(answer) >= FLOW_FIELDS, "the flow is answered as before"
    assert answer["audit"] == newest_entry(client, auth)
    assert answer["audit"]["action"] == action and answer["audit"]["message"] == "ship v2"
    assert (answer["audit"]["from_version"], answer["audit"]["to_version"]) == versions


def test_rollback_answers_its_audit_entry(client, auth, two_versions):
    assert client.post("/api/v1/flows/f/publish", json={"version": 2},
                       headers=auth).status_code == 200

    resp = client.post("/api/v1/flows/f/rollback", json={"message": "v2 is worse"},
                       headers=auth)

    assert resp.status_code == 200
    entry = resp.get_json()["audit"]
    assert entry == newest_entry(client, auth)
    assert (entry["action"], entry["from_version"], entry["to_version"]) == ("rollback", 2, 1)
    assert entry["message"] == "v2 is worse" and resp.get_json()["live_version"] == 1


def test_the_entry_is_this_changes_even_when_another_lands_before_the_answer(
        app, client, auth, two_versions):
    """Someone else's change commits between this change and its answer (the store's own
    after-commit hook makes it, so the order is certain): the answer still names this
    change's entry, not the newest one."""
    store = app.extensions["flowgate"].store
    hook = store._on_audit
    interleaved: list[int] = []

    def another_change_lands(entry):
        hook(entry)
        if not interleaved:
            interleaved.append(entry.seq)
            store.set_routing("f", None, Change(actor="someone-else", message="theirs"))

    store._on_audit = another_change_lands
    resp = client.post("/api/v1/flows/f/publish", json={"version": 2, "message": "mine"},
                       headers={**auth, "traceparent": TRACEPARENT})

    assert resp.status_code == 200
    newest = newest_entry(client, auth)
    assert newest["actor"] == "someone-else", "the other change did land after this one"
    entry = resp.get_json()["audit"]
    assert entry["seq"] == interleaved[0] and entry["seq"] < newest["seq"]
    assert (entry["action"], entry["message"]) == ("publish", "mine")
    assert entry["trace_id"] == TRACEPARENT.split("-")[1]


@pytest.mark.parametrize(("method", "path", "body"), [
    pytest.param("post", "publish", {"version": 2, "dry_run": True}, id="publish"),
    pytest.param("put", "routing", {"canary": {"version": 2, "percent": 5}, "dry_run": True},
                 id="routing"),
])
def test_a_dry_run_writes_no_entry_and_answers_none(client, auth, two_versions, method, path,
                                                    body):
    before = newest_entry(client, auth)

    resp = getattr(client, method)(f"/api/v1/flows/f/{path}", json=body, headers=auth)

    assert resp.status_code == 200
    assert resp.get_json()["dry_run"] is True and "audit" not in resp.get_json()
    assert newest_entry(client, auth) == before


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    pytest.param("post", "publish", {"version": 9, "message": "x"}, 404, id="publish-missing"),
    pytest.param("post", "rollback", {"message": "x"}, 409, id="rollback-nothing-earlier"),
    pytest.param("put", "routing", {"canary": {"version": 2, "percent": 10},
                                    "message": "<\x00>"}, 400, id="routing-bad-message"),
])
def test_a_refused_change_answers_its_error_and_writes_no_entry(
        client, auth, two_versions, method, path, body, status):
    before = newest_entry(client, auth)

    resp = getattr(client, method)(f"/api/v1/flows/f/{path}", json=body, headers=auth)

    assert resp.status_code == status
    assert "error" in resp.get_json() and "audit" not in resp.get_json()
    assert newest_entry(client, auth) == before


def test_a_committed_change_whose_entry_cannot_be_read_back_answers_200(
        client, auth, two_versions, app, monkeypatch):
    """The change is done: a store that fails the read-back makes the entry null, never the
    answer a 5xx (a caller retrying a rollback it was told had failed would roll back twice)."""
    store = app.extensions["flowgate"].store

    def unavailable(*_args: Any, **_kw: Any) -> Any:
        raise StoreError("the store cannot be read now")

    monkeypatch.setattr(store, "list_audit", unavailable)
    resp = client.post("/api/v1/flows/f/publish", json={"version": 2}, headers=auth)

    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["audit"] is None and resp.get_json()["live_version"] == 2
    monkeypatch.undo()
    assert newest_entry(client, auth)["action"] == "publish"
