"""Governed hot updates: every change to a flow is audited (in the change's transaction),
versions can be diffed, and nothing goes live that does not build (``dry_run`` checks
without changing anything). Run answers say which version answered (``X-Flow-Version``)."""

from __future__ import annotations

import pytest
from support.keys import KEYS, as_

ACTIONS = ("create", "new_version", "publish", "routing", "rollback", "delete")


@pytest.fixture
def api(make_app):
    return make_app(api_keys=KEYS).test_client()


def audit(api, flow_id: str, **query) -> list[dict]:
    resp = api.get(f"/api/v1/flows/{flow_id}/audit", query_string=query, headers=as_("runner"))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["entries"]


def test_every_change_is_one_entry_with_its_actor_message_and_trace(api, defs):
    trace = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    editor = as_("editor", **{"X-Flowgate-Message": "first draft", "traceparent": trace})
    assert api.post("/api/v1/flows", json=defs.echo(id="f"), headers=editor).status_code == 201
    assert api.put("/api/v1/flows/f", json=defs.echo("V2 {question}", id="f"),
                   headers=as_("editor")).status_code == 201
    assert api.post("/api/v1/flows/f/publish", json={"version": 2, "message": "ship it"},
                    headers=as_("publisher")).status_code == 200
    assert api.put("/api/v1/flows/f/routing", json={"canary": {"version": 1, "percent": 10},
                                                    "message": "try the old one"},
                   headers=as_("publisher")).status_code == 200
    assert api.post("/api/v1/flows/f/rollback", json={"message": "back"},
                    headers=as_("publisher")).status_code == 200
    assert api.delete("/api/v1/flows/f", headers=as_("admin")).status_code == 204

    entries = audit(api, "f")  # a deleted flow keeps its history

    assert [e["action"] for e in entries] == list(reversed(ACTIONS))
    by = {e["action"]: e for e in entries}
    assert (by["create"]["actor"], by["create"]["message"], by["create"]["to_version"]) == (
        "designer", "first draft", 1)
    assert by["create"]["trace_id"] == "ab" * 16
    assert (by["new_version"]["from_version"], by["new_version"]["to_version"]) == (1, 2)
    assert (by["publish"]["actor"], by["publish"]["message"]) == ("release-bot", "ship it")
    assert (by["publish"]["from_version"], by["publish"]["to_version"]) == (1, 2)
    assert by["routing"]["routing"]["canary"] == {"version": 1, "percent": 10}
    assert (by["rollback"]["from_version"], by["rollback"]["to_version"]) == (2, 1)
    assert (by["delete"]["actor"], by["delete"]["from_version"]) == ("platform", 1)
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs)


def test_a_change_that_fails_leaves_no_entry(api, defs):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))

    assert api.post("/api/v1/flows/f/publish", json={"version": 9},
                    headers=as_("admin")).status_code == 404
    assert api.post("/api/v1/flows/f/rollback", headers=as_("admin")).status_code == 409
    assert api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin")).status_code == 409

    assert [e["action"] for e in audit(api, "f")] == ["create"]


def test_a_proxy_callers_changes_name_the_caller_too(make_app, defs):
    keys = "ops:publisher+proxy:publisher-proxy-secret"
    client = make_app(api_keys=keys).test_client()
    headers = {"Authorization": "Bearer publisher-proxy-secret", "x-flowgate-identity": "alice"}
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=headers).status_code == 201
    entry = client.get("/api/v1/flows/f/audit", headers=headers).get_json()["entries"][0]
    assert entry["actor"] == "ops/alice"


def test_history_pages_and_the_whole_log_tails(api, defs):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    for i in range(4):
        api.put("/api/v1/flows/f", json=defs.echo(f"V{i} {{question}}", id="f"),
                headers=as_("admin"))
    newest = audit(api, "f", limit=2)
    older = audit(api, "f", limit=10, before=newest[-1]["seq"])
    assert [e["to_version"] for e in newest + older] == [5, 4, 3, 2, 1]

    first = api.get("/api/v1/audit?since=0&limit=3", headers=as_("runner")).get_json()
    rest = api.get(f"/api/v1/audit?since={first['next_since']}",
                   headers=as_("runner")).get_json()
    assert [e["to_version"] for e in first["entries"] + rest["entries"]] == [1, 2, 3, 4, 5]
    assert api.get("/api/v1/audit?since=-1", headers=as_("runner")).status_code == 400
    assert api.get("/api/v1/flows/nope/audit", headers=as_("runner")).status_code == 404


@pytest.mark.parametrize(("message", "status"), [
    pytest.param("x" * 2000, 200, id="at-the-limit"),
    pytest.param("x" * 2001, 400, id="too-long"),
    pytest.param(42, 400, id="not-text"),
    pytest.param("line one\nline two", 200, id="lines"),
    pytest.param("bell\x07", 400, id="control-character"),
])
def test_messages_are_bounded_text(api, defs, message, status):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    api.put("/api/v1/flows/f", json=defs.echo("V2 {question}", id="f"), headers=as_("admin"))

    resp = api.post("/api/v1/flows/f/publish", json={"version": 2, "message": message},
                    headers=as_("admin"))

    assert resp.status_code == status, resp.get_data(as_text=True)


@pytest.mark.parametrize(("header", "status", "stored"), [
    pytest.param("d%C3%A9ploiement%20du%20vendredi", 200, "déploiement du vendredi", id="utf-8"),
    pytest.param("plain words", 200, "plain words", id="ascii"),
    pytest.param("%FF%FE", 400, None, id="not-utf-8"),
    pytest.param("bell%07", 400, None, id="control-character"),
])
def test_the_message_header_is_percent_encoded_utf8(api, defs, header, status, stored):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    resp = api.post("/api/v1/flows/f/publish",
                    json={"version": 1}, headers=as_("admin", **{"X-Flowgate-Message": header}))
    assert resp.status_code == status, resp.get_data(as_text=True)
    if stored is not None:
        assert audit(api, "f")[0]["message"] == stored
    else:
        assert "X-Flowgate-Message" in resp.get_json()["error"]["message"] or \
            "message must be text" in resp.get_json()["error"]["message"]
        assert [e["action"] for e in audit(api, "f")] == ["create"]


def test_diff_names_what_changed(api, defs):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    api.put("/api/v1/flows/f", json=defs.echo("Changed {question}", id="f"), headers=as_("admin"))

    resp = api.get("/api/v1/flows/f/diff?from=1&to=2", headers=as_("editor"))

    assert resp.status_code == 200
    body = resp.get_json()
    assert (body["from"], body["to"]) == (1, 2)
    assert body["nodes"]["changed"] == [{"id": "p", "params": {
        "template": {"from": "Q: {question}", "to": "Changed {question}"}}}]
    assert api.get("/api/v1/flows/f/diff?from=1&to=2", headers=as_("runner")).status_code == 403
    assert api.get("/api/v1/flows/f/diff?from=1", headers=as_("editor")).status_code == 400
    assert api.get("/api/v1/flows/f/diff?from=1&to=7", headers=as_("editor")).status_code == 404


def _a_version_that_cannot_build(app, defs) -> None:
    """A version stored by an older engine whose node type this one does not know."""
    broken = defs.echo(id="f")
    broken["nodes"][2]["type"] = "RetiredModel"
    app.extensions["flowgate"].store.add_version("f", broken, "f", "")


@pytest.mark.parametrize("how", ["publish", "canary", "live-by-routing"])
def test_nothing_that_cannot_build_goes_live(make_app, defs, how):
    app = make_app(api_keys=KEYS)
    api = app.test_client()
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    _a_version_that_cannot_build(app, defs)
    before = api.get("/api/v1/flows/f", headers=as_("runner")).get_json()

    if how == "publish":
        resp = api.post("/api/v1/flows/f/publish", json={"version": 2}, headers=as_("admin"))
    elif how == "canary":
        resp = api.put("/api/v1/flows/f/routing", json={"canary": {"version": 2, "percent": 5}},
                       headers=as_("admin"))
    else:
        resp = api.put("/api/v1/flows/f/routing", json={"live": 2}, headers=as_("admin"))

    assert resp.status_code == 422, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert "version 2 cannot go live" in error["message"]
    assert error["problems"][0]["path"] == "$.nodes[2].type"
    after = api.get("/api/v1/flows/f", headers=as_("runner")).get_json()
    assert (after["live_version"], after["routing"]) == (before["live_version"], before["routing"])
    # newest first: the store call above wrote "new_version"; the refused change wrote nothing
    assert [e["action"] for e in audit(api, "f")] == ["new_version", "create"]


def test_dry_run_checks_and_changes_nothing(make_app, defs):
    app = make_app(api_keys=KEYS)
    api = app.test_client()
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    api.put("/api/v1/flows/f", json=defs.echo("V2 {question}", id="f"), headers=as_("admin"))
    entries = len(audit(api, "f"))

    ok = api.post("/api/v1/flows/f/publish", json={"version": 2, "dry_run": True},
                  headers=as_("admin"))
    routed = api.put("/api/v1/flows/f/routing",
                     json={"canary": {"version": 2, "percent": 50}, "dry_run": True},
                     headers=as_("admin"))
    _a_version_that_cannot_build(app, defs)
    refused = api.post("/api/v1/flows/f/publish", json={"version": 3, "dry_run": True},
                       headers=as_("admin"))

    assert ok.status_code == 200 and ok.get_json() == {"dry_run": True, "ok": True, "version": 2}
    assert routed.status_code == 200 and routed.get_json()["dry_run"] is True
    assert refused.status_code == 422
    flow = api.get("/api/v1/flows/f", headers=as_("runner")).get_json()
    assert (flow["live_version"], flow["routing"]) == (1, None)
    assert len(audit(api, "f")) == entries + 1  # only the stored broken version's


@pytest.mark.parametrize("query", ["", "?stream=true"])
def test_run_answers_say_which_version_answered(api, defs, query):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    api.put("/api/v1/flows/f", json=defs.echo("V2 {question}", id="f"), headers=as_("admin"))
    api.post("/api/v1/flows/f/publish", json={"version": 2}, headers=as_("admin"))

    resp = api.post(f"/api/v1/run/f{query}", json={"input_value": "x"}, headers=as_("runner"))
    pinned = api.post(f"/api/v1/run/f{query}", json={"input_value": "x", "version": 1},
                      headers=as_("editor"))

    assert resp.headers["X-Flow-Version"] == "2"
    assert pinned.headers["X-Flow-Version"] == "1"


@pytest.mark.parametrize(("canary", "fragment"), [
    pytest.param({"version": 2, "steps": [5, 25]}, "ending at 100", id="steps-not-to-100"),
    pytest.param({"version": 2, "steps": [50, 25, 100]}, "increasing", id="steps-not-increasing"),
    pytest.param({"version": 2, "steps": [5, 100], "step_after_s": 0}, "step_after_s",
                 id="step-too-short"),
    pytest.param({"version": 2, "percent": 5, "step_after_s": 60}, "needs canary.steps",
                 id="step-without-steps"),
    pytest.param({"version": 2, "percent": 5, "guard": {"max_error_rate": 3}}, "max_error_rate",
                 id="bad-guard"),
    pytest.param({"version": 2, "percent": 5, "guard": {"min_runs": True}}, "min_runs",
                 id="boolean-runs"),
    pytest.param({"version": 2, "percent": 5, "guard": {"window_s": 3601}}, "window_s",
                 id="window-past-the-outcomes-kept"),
    pytest.param({"version": 2, "percent": 5, "guard": {"window_s": 1}}, "window_s",
                 id="window-too-short"),
    pytest.param({"version": 2, "percent": 5, "guard": {"min_runs": 2**70}}, "min_runs",
                 id="huge-min-runs"),
    pytest.param({"version": 2, "percent": 5, "guard": {"admin": True}}, "guard",
                 id="unknown-guard-field"),
    pytest.param({"version": 2, "percent": 5, "guard": [0.1]}, "guard", id="guard-not-object"),
    pytest.param({"version": 2, "steps": [*range(1, 22), 100]}, "steps",
                 id="too-many-steps"),
    pytest.param({"version": 2, "steps": [True, 100]}, "steps", id="boolean-step"),
    # what only the engine writes cannot be sent: a forged start would skip the wait
    pytest.param({"version": 2, "percent": 5, "started_at": 0}, "canary must be",
                 id="forged-started-at"),
    pytest.param({"version": 2, "steps": [5, 100], "step_started_at": 0}, "canary must be",
                 id="forged-step-started-at"),
])
def test_bad_guarded_canaries_are_400(api, defs, canary, fragment):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    api.put("/api/v1/flows/f", json=defs.echo("V2 {question}", id="f"), headers=as_("admin"))

    resp = api.put("/api/v1/flows/f/routing", json={"canary": canary}, headers=as_("admin"))

    assert resp.status_code == 400 and fragment in resp.get_json()["error"]["message"]


@pytest.mark.parametrize(("body", "fragment"), [
    pytest.param({"watch": {"previous": 1}}, "unknown routing key", id="forged-watch"),
    pytest.param({"live": 1, "guard": {}}, "unknown routing key", id="guard-outside-canary"),
])
def test_what_only_the_engine_writes_cannot_be_routed(api, defs, body, fragment):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    resp = api.put("/api/v1/flows/f/routing", json=body, headers=as_("admin"))
    assert resp.status_code == 400 and fragment in resp.get_json()["error"]["message"]


@pytest.mark.parametrize("guard", [{"window_s": 0}, {"max_error_rate": -1}, "strict", None])
def test_a_publish_with_a_bad_guard_is_400_and_changes_nothing(api, defs, guard):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    api.put("/api/v1/flows/f", json=defs.echo("V2 {question}", id="f"), headers=as_("admin"))
    resp = api.post("/api/v1/flows/f/publish", json={"version": 2, "guard": guard},
                    headers=as_("admin"))
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert api.get("/api/v1/flows/f", headers=as_("runner")).get_json()["live_version"] == 1


def test_a_guarded_canary_and_publish_are_stored_for_the_controller(api, defs):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    api.put("/api/v1/flows/f", json=defs.echo("V2 {question}", id="f"), headers=as_("admin"))

    routed = api.put("/api/v1/flows/f/routing", headers=as_("admin"), json={
        "canary": {"version": 2, "steps": [10, 50, 100], "step_after_s": 30,
                   "guard": {"max_error_rate": 0.2}}}).get_json()
    canary = routed["routing"]["canary"]
    assert (canary["percent"], canary["steps"], canary["step_after_s"]) == (10, [10, 50, 100], 30)
    assert canary["guard"]["max_error_rate"] == 0.2 and canary["guard"]["min_runs"] == 20

    published = api.post("/api/v1/flows/f/publish", headers=as_("admin"), json={
        "version": 2, "guard": {"window_s": 120}}).get_json()
    watch = published["routing"]["watch"]
    assert (watch["previous"], watch["guard"]["window_s"]) == (1, 120)
