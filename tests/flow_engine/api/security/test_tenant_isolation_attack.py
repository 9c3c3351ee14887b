"""Tenant B tries to read, follow, cancel, replay or continue what tenant A started: A's run
record, its events (SSE and WebSocket), a cancel, A's idempotency key, A's conversation
under the same ``session_id``. Everything of another tenant answers exactly like something
that never existed (404 ``run_not_found``), and nothing of A reaches B.

Tenants: the ambassador (a ``runner+proxy`` key) forwards ``x-flowgate-tenant``; a plain
runner key is its own tenant, and the tenant headers it sends are ignored."""

from __future__ import annotations

import threading
import time

import pytest
from support.fake_ws import FakeSocket
from support.keys import as_, tenant

from flow_engine.api.ws import RunSocket
from flow_engine.auth import parse_key, principal_for

BODY = {"input_value": "my card ends in 4242", "session_id": "order-1001"}
INTRUDERS = [
    pytest.param(tenant("shop-b"), id="another-tenant-via-the-proxy"),
    pytest.param(tenant("shop-b", identity="shop-a"), id="proxy-identity-is-not-the-tenant"),
    pytest.param(as_("other"), id="another-runner-key"),
    pytest.param(as_("other", **{"x-flowgate-tenant": "shop-a"}), id="runner-key-claiming-a-tenant"),
]


@pytest.fixture
def a_run(api, defs):
    assert api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin")).status_code == 201
    resp = api.post("/api/v1/run/f", json=BODY, headers=tenant("shop-a"))
    assert resp.status_code == 200
    return resp.get_json()["run_id"]


def _not_found(resp, run_id: str) -> None:
    assert resp.status_code == 404, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["code"] == "run_not_found"
    assert error["message"] == f"no run '{run_id}'"  # the same words as for a made-up id


@pytest.mark.parametrize("headers", INTRUDERS)
def test_another_tenant_cannot_read_follow_or_cancel_a_finished_run(api, a_run, headers):
    _not_found(api.get(f"/api/v1/runs/{a_run}", headers=headers), a_run)
    _not_found(api.get(f"/api/v1/runs/{a_run}/events", headers=headers), a_run)
    _not_found(api.post(f"/api/v1/runs/{a_run}/cancel", headers=headers), a_run)
    made_up = "0" * 32
    _not_found(api.get(f"/api/v1/runs/{made_up}", headers=headers), made_up)


def test_the_owner_and_an_operator_still_see_it(api, a_run):
    assert api.get(f"/api/v1/runs/{a_run}", headers=tenant("shop-a")).status_code == 200
    assert api.get(f"/api/v1/runs/{a_run}", headers=tenant("shop-a", "other-app")).status_code == 200
    assert api.get(f"/api/v1/runs/{a_run}/events", headers=tenant("shop-a")).status_code == 200
    assert api.get(f"/api/v1/runs/{a_run}", headers=as_("admin")).status_code == 200
    # the proxy's own key without a tenant header is its own tenant, not everyone's
    _not_found(api.get(f"/api/v1/runs/{a_run}", headers=as_("proxy")), a_run)


def test_a_run_in_progress_cannot_be_seen_or_cancelled_by_another_tenant(
        keyed_app, defs, fresh_llm_sim, sse_events):
    fresh_llm_sim.configure(tokens_per_s=40, reply_tokens=60)  # runs ~1.5 s
    client = keyed_app(openai_base_url=fresh_llm_sim.base_url).test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=as_("admin")).status_code == 201
    stream = client.post("/api/v1/run/llm?stream=true", json=BODY, headers=tenant("shop-a"),
                         buffered=False)
    run_id = stream.headers["X-Run-ID"]
    try:
        _not_found(client.get(f"/api/v1/runs/{run_id}", headers=tenant("shop-b")), run_id)
        _not_found(client.post(f"/api/v1/runs/{run_id}/cancel", headers=tenant("shop-b")), run_id)
        _not_found(client.get(f"/api/v1/runs/{run_id}/events", headers=tenant("shop-b")), run_id)
        mine = client.get(f"/api/v1/runs/{run_id}", headers=tenant("shop-a")).get_json()
        assert mine["status"] == "running"
    finally:
        events = sse_events(stream)
    assert events[-1].event == "run_finished"  # B's cancel did nothing


def test_another_tenant_cannot_watch_over_the_websocket(keyed_app, api, a_run, defs):
    api.application.extensions["flowgate"].runs.executor.flush()  # its record is written
    app = keyed_app()
    eng = app.extensions["flowgate"]
    # the same database as `a_run`'s app: a second process of one engine
    key = parse_key(f"ambassador:runner+proxy:{'proxy-secret-0006'}")
    for who, expected in (("shop-b", "run_not_found"), ("shop-a", "run_finished")):
        ws = FakeSocket()
        caller = principal_for(key, None, who)
        handler = RunSocket(ws, eng.runs, eng.settings, eng.metrics, caller=caller)
        thread = threading.Thread(target=handler.serve, daemon=True)
        thread.start()
        ws.feed({"type": "watch", "run_id": a_run})
        message = ws.next_message()
        if expected == "run_not_found":
            assert (message["type"], message["code"]) == ("error", "run_not_found"), message
            assert "seq" not in message  # a refusal, not an event of the run
        else:
            assert message["type"] == "run_finished" and message["run_id"] == a_run
        ws.disconnect()
        thread.join(5)


def test_the_same_idempotency_key_in_two_tenants_is_two_runs(api, defs, metric):
    assert api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin")).status_code == 201
    key = {"Idempotency-Key": "order-1001"}
    first = api.post("/api/v1/run/f", json=BODY, headers={**tenant("shop-a"), **key})
    replay_by_b = api.post("/api/v1/run/f", json=BODY, headers={**tenant("shop-b"), **key})
    other_body_by_b = api.post("/api/v1/run/f", json={"input_value": "x"},
                               headers={**as_("other"), **key})

    assert first.status_code == replay_by_b.status_code == other_body_by_b.status_code == 200
    assert "Idempotent-Replayed" not in replay_by_b.headers  # B ran its own, saw nothing of A's
    assert replay_by_b.get_json()["run_id"] != first.get_json()["run_id"]
    again_by_a = api.post("/api/v1/run/f", json=BODY, headers={**tenant("shop-a"), **key})
    assert again_by_a.headers["Idempotent-Replayed"] == "true"
    assert again_by_a.get_json()["run_id"] == first.get_json()["run_id"]


# The echo model repeats its prompt, so the answer shows the history the prompt was given.
HISTORY_ECHO = {
    "id": "chat",
    "nodes": [{"id": "in", "type": "ChatInput"}, {"id": "hist", "type": "ChatHistory"},
              {"id": "p", "type": "PromptTemplate",
               "params": {"template": "History: {history} | Q: {question}"}},
              {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
              {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "p", "target_input": "question"},
              {"source": "hist", "target": "p", "target_input": "history"},
              {"source": "p", "target": "llm"}, {"source": "llm", "target": "out"}],
}


def test_the_same_session_id_in_two_tenants_is_two_conversations(api):
    assert api.post("/api/v1/flows", json=HISTORY_ECHO, headers=as_("admin")).status_code == 201
    assert api.post("/api/v1/run/chat", json=BODY, headers=tenant("shop-a")).status_code == 200

    by_b = api.post("/api/v1/run/chat", json={"input_value": "what did I say?",
                                               "session_id": "order-1001"}, headers=tenant("shop-b"))
    by_runner = api.post("/api/v1/run/chat", json={"input_value": "and now?",
                                                    "session_id": "order-1001"},
                         headers=as_("other", **{"x-flowgate-tenant": "shop-a"}))
    by_a = api.post("/api/v1/run/chat", json={"input_value": "again",
                                               "session_id": "order-1001"}, headers=tenant("shop-a"))

    assert "4242" not in by_b.get_json()["output"]
    assert "(no earlier messages)" in by_b.get_json()["output"]
    assert "4242" not in by_runner.get_json()["output"]
    assert "4242" in by_a.get_json()["output"]  # A's own history is still A's


@pytest.mark.parametrize("value", [
    pytest.param("has space", id="space"),
    pytest.param("x" * 201, id="too-long"),
    pytest.param("tab\tin", id="control-char"),
])
@pytest.mark.parametrize("header", ["x-flowgate-tenant", "x-flowgate-identity"])
def test_a_proxy_forwarding_a_malformed_caller_header_is_400(api, defs, header, value):
    resp = api.get("/api/v1/flows", headers={**as_("proxy"), header: value})

    assert resp.status_code == 400
    assert header in resp.get_json()["error"]["message"]


def test_runs_of_a_tenant_across_processes_stay_its_own(keyed_app, defs, redis_url, fresh_llm_sim):
    """With Redis, a run on engine process A is followed from process B: only by its tenant."""
    fresh_llm_sim.configure(tokens_per_s=40, reply_tokens=40)
    a = keyed_app(redis_url=redis_url, openai_base_url=fresh_llm_sim.base_url).test_client()
    b = keyed_app(redis_url=redis_url, openai_base_url=fresh_llm_sim.base_url).test_client()
    assert a.post("/api/v1/flows", json=defs.openai(id="llm"), headers=as_("admin")).status_code == 201
    stream = a.post("/api/v1/run/llm?stream=true&on_disconnect=continue", json=BODY,
                    headers=tenant("shop-a"), buffered=False)
    run_id = stream.headers["X-Run-ID"]
    try:
        deadline = time.monotonic() + 10
        while b.get(f"/api/v1/runs/{run_id}", headers=tenant("shop-a")).status_code != 200:
            assert time.monotonic() < deadline, "B never learned of the run"
            time.sleep(0.02)
        _not_found(b.get(f"/api/v1/runs/{run_id}", headers=tenant("shop-b")), run_id)
        _not_found(b.get(f"/api/v1/runs/{run_id}/events", headers=tenant("shop-b")), run_id)
        _not_found(b.post(f"/api/v1/runs/{run_id}/cancel", headers=tenant("shop-b")), run_id)
        watched = b.get(f"/api/v1/runs/{run_id}/events", headers=tenant("shop-a"))
        assert watched.status_code == 200
        assert b"run_finished" in watched.get_data()
    finally:
        stream.close()


def test_two_proxies_forwarding_the_same_tenant_are_two_tenants(make_app, defs):
    """Each app's ambassador holds its own proxy key: its callers are its own, whatever name
    it forwards — one app cannot read (or bill) another's "alice", nor a plain key's tenant."""
    keys = ("orders-amb:runner+proxy:orders-proxy-secret,billing-amb:runner+proxy:"
            "billing-proxy-secret,orders-app:runner:runner-secret-0001")
    client = make_app(api_keys=keys + ",ops:admin:admin-secret-0005").test_client()
    assert client.post("/api/v1/flows", json=HISTORY_ECHO, headers=as_("admin")).status_code == 201

    def via(secret: str, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}", "x-flowgate-tenant": who}

    orders, billing = via("orders-proxy-secret", "alice"), via("billing-proxy-secret", "alice")
    key = {"Idempotency-Key": "k-1"}
    first = client.post("/api/v1/run/chat", json=BODY, headers={**orders, **key})
    run_id = first.get_json()["run_id"]

    _not_found(client.get(f"/api/v1/runs/{run_id}", headers=billing), run_id)
    other = client.post("/api/v1/run/chat", json={**BODY, "input_value": "history?"},
                        headers={**billing, **key})
    assert "Idempotent-Replayed" not in other.headers
    assert "4242" not in other.get_json()["output"]
    # and a proxy cannot name a plain key's tenant to reach its runs
    mine = client.post("/api/v1/run/chat", json=BODY,
                       headers={"Authorization": "Bearer runner-secret-0001"}).get_json()["run_id"]
    _not_found(client.get(f"/api/v1/runs/{mine}", headers=via("orders-proxy-secret", "orders-app")),
               mine)


def test_an_identity_named_like_a_tenant_does_not_get_that_tenant(api, defs):
    """Behind one ambassador, a caller known only by its identity (a JWT without a tenant
    claim) chooses or happens to have the name of another caller's tenant: "acme". It gets
    a tenant of its own, never acme's runs, events, idempotent results or conversations —
    and acme never gets its."""
    assert api.post("/api/v1/flows", json=HISTORY_ECHO, headers=as_("admin")).status_code == 201
    key = {"Idempotency-Key": "order-1001"}
    acme = tenant("acme")
    posing = as_("proxy", **{"x-flowgate-identity": "acme"})
    run_id = api.post("/api/v1/run/chat", json=BODY, headers={**acme, **key}).get_json()["run_id"]

    _not_found(api.get(f"/api/v1/runs/{run_id}", headers=posing), run_id)
    _not_found(api.get(f"/api/v1/runs/{run_id}/events", headers=posing), run_id)
    _not_found(api.post(f"/api/v1/runs/{run_id}/cancel", headers=posing), run_id)
    replay = api.post("/api/v1/run/chat", json={**BODY, "input_value": "what did I say?"},
                      headers={**posing, **key})
    assert replay.status_code == 200  # not a conflict with acme's key: a key of its own
    assert "Idempotent-Replayed" not in replay.headers
    assert replay.get_json()["run_id"] != run_id
    assert "4242" not in replay.get_json()["output"]  # acme's conversation is not in its prompt
    assert "(no earlier messages)" in replay.get_json()["output"]
    assert all(r["tenant"] != "ambassador/acme" for r in
               api.get("/api/v1/runs", headers=posing).get_json()["runs"])

    theirs = replay.get_json()["run_id"]  # and the other way round
    _not_found(api.get(f"/api/v1/runs/{theirs}", headers=acme), theirs)
    assert api.get(f"/api/v1/runs/{theirs}", headers=posing).status_code == 200
    assert api.get(f"/api/v1/runs/{run_id}", headers=acme).status_code == 200


NAMES = ["acme", "~acme", "/acme", "acme/x", "acme~x", "~", "/", "ambassador", "ambassador/acme",
         "ambassador~acme", "a/b~c", "@acme", "id:acme"]


def test_no_forwarded_identity_or_tenant_names_a_tenant_of_another_kind():
    """Whatever a proxy forwards, a tenant from an identity, a tenant from a forwarded
    tenant, and a key's own tenant are three disjoint sets — also across proxies."""
    keys = [parse_key("ambassador:runner+proxy:proxy-secret-0006"),
            parse_key("amb:runner+proxy:proxy-secret-0007"),
            parse_key("orders-app:runner:runner-secret-1")]
    by_identity = {principal_for(k, name, None).tenant for k in keys[:2] for name in NAMES}
    by_tenant = {principal_for(k, identity, name).tenant for k in keys[:2] for name in NAMES
                 for identity in (None, "acme")}
    own = {principal_for(k, None, None).tenant for k in keys} | {
        principal_for(keys[2], name, name).tenant for name in NAMES}

    assert len(by_identity) == 2 * len(NAMES) and len(by_tenant) == 2 * len(NAMES)
    assert not by_identity & by_tenant
    assert not (by_identity | by_tenant) & own
