"""What the console added, tried as a hostile tenant would: WebSocket tickets (replayed,
guessed, expired, stretched to another role or tenant, asked for without a key), the runs
list (another tenant's runs, bad filters), per-version stats of unknown flows, and the
console's file routes (path traversal, other files of the package)."""

from __future__ import annotations

import pytest
from support.fake_ws import FakeSocket, install_fake_server
from support.keys import as_, tenant
from support.waiting import wait_until

from flow_engine.ws_tickets import WsTickets

WS = "/api/v1/ws/runs"
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade"}


@pytest.fixture
def fake_server(monkeypatch):
    return install_fake_server(monkeypatch)


def ticket(api, headers) -> str:
    resp = api.post("/api/v1/ws/ticket", headers=headers)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Cache-Control"] == "no-store"
    return resp.get_json()["ticket"]


def handshake(api, query: str, fake_server):
    ws = FakeSocket()
    ws.disconnect()
    fake_server.pending.append(ws)
    return api.get(WS + query, headers=UPGRADE)


def test_a_ticket_opens_one_socket_once(api, fake_server):
    t = ticket(api, as_("runner"))
    handshake(api, f"?ticket={t}", fake_server)
    assert len(fake_server.built) == 1
    again = handshake(api, f"?ticket={t}", fake_server)  # a leaked URL, replayed
    assert again.status_code == 401 and "used" in again.get_json()["error"]["message"]
    assert len(fake_server.built) == 1


@pytest.mark.parametrize("query", ["?ticket=", "?ticket=made-up", "?ticket=" + "A" * 43,
                                   "?ticket=" + "x" * 5000])
def test_a_guessed_or_empty_ticket_is_401(api, fake_server, query):
    resp = handshake(api, query, fake_server)
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "unauthorized"
    assert fake_server.built == []


def test_a_ticket_is_no_key_anywhere_else(api):
    t = ticket(api, as_("admin"))
    for path in ("/api/v1/flows", f"/api/v1/flows?ticket={t}"):
        assert api.get(path, headers={"Authorization": f"Bearer {t}"}).status_code == 401
    assert api.get(f"/api/v1/flows?ticket={t}").status_code == 401


def test_asking_for_a_ticket_needs_a_key(api):
    assert api.post("/api/v1/ws/ticket").status_code == 401
    assert api.post("/api/v1/ws/ticket", headers={"x-api-key": "wrong"}).status_code == 401


KEYRING_ENTRIES = ["amb:runner+proxy:proxy-secret-1", "ops:runner:runner-secret-1"]


def keyring(entries=KEYRING_ENTRIES):
    from flow_engine.auth import KeyRing, parse_keys

    return KeyRing(parse_keys(entries))


def test_a_ticket_carries_its_principal_and_nothing_more():
    """Redeemed, a ticket is exactly who asked: the proxy's tenant stays that tenant, a
    runner stays a runner; and it expires."""
    from flow_engine.auth import parse_key, principal_for

    now = [0.0]
    tickets = WsTickets(keys=keyring(), ttl_s=30, clock=lambda: now[0])
    proxy = principal_for(parse_key("amb:runner+proxy:proxy-secret-1"), "alice", "shop-a")
    t = tickets.issue(proxy)
    assert tickets.redeem(t) == proxy
    assert tickets.redeem(t) is None  # once
    t2 = tickets.issue(proxy)
    now[0] = 31.0
    assert tickets.redeem(t2) is None  # expired


def test_a_ticket_of_a_key_removed_or_demoted_meanwhile_is_not_honoured():
    from flow_engine.auth import parse_key, principal_for

    was_admin = principal_for(parse_key("ops:admin:runner-secret-1"), None, None)
    tickets = WsTickets(keys=keyring())  # the engine's keys now: ops is a runner
    assert tickets.redeem(tickets.issue(was_admin)).role == "runner"
    gone = principal_for(parse_key("old:admin:old-secret-01"), None, None)
    assert tickets.redeem(tickets.issue(gone)) is None


def test_a_forged_ticket_in_the_shared_store_cannot_claim_a_role(redis_url):
    import hashlib
    import json

    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    forged = "forged-ticket-value"
    client.set("flowgate:wsticket:" + hashlib.sha256(forged.encode()).hexdigest(),
               json.dumps({"key": "ops", "role": "admin", "proxy": False, "tenant": "*"}), ex=30)
    caller = WsTickets(client, keys=keyring()).redeem(forged)
    assert (caller.role, caller.tenant, caller.sees_every_tenant) == ("runner", "ops", False)


def test_one_tenant_cannot_crowd_out_the_others_tickets(monkeypatch, redis_url):
    import redis

    from flow_engine import ws_tickets
    from flow_engine.auth import Principal
    from flow_engine.errors import TenantLimited

    monkeypatch.setattr(ws_tickets, "MAX_PER_TENANT", 5)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for tickets in (WsTickets(keys=keyring()), WsTickets(client, keys=keyring())):
        greedy, other = Principal("ops", "runner", tenant="greedy"), Principal("ops", "runner", tenant="calm")
        for _ in range(5):
            tickets.issue(greedy)
        with pytest.raises(TenantLimited):
            tickets.issue(greedy)
        assert tickets.redeem(tickets.issue(other)) is not None


def test_asking_past_the_cap_is_a_429(api, monkeypatch):
    from flow_engine import ws_tickets

    monkeypatch.setattr(ws_tickets, "MAX_PER_TENANT", 3)
    codes = [api.post("/api/v1/ws/ticket", headers=as_("other")).status_code for _ in range(4)]
    assert codes == [201, 201, 201, 429]
    assert api.post("/api/v1/ws/ticket", headers=as_("runner")).status_code == 201  # others still can


def test_tickets_in_memory_are_bounded(monkeypatch):
    from flow_engine import ws_tickets
    from flow_engine.auth import Principal

    monkeypatch.setattr(ws_tickets, "MAX_TICKETS", 100)
    tickets = WsTickets(keys=keyring())
    issued = [tickets.issue(Principal("ops", "runner", tenant=f"t{i}")) for i in range(250)]
    assert len(tickets._local) == 100
    assert tickets.redeem(issued[0]) is None and tickets.redeem(issued[-1]) is not None


def test_tickets_through_redis_are_shared_hashed_and_taken_once(redis_url):
    import redis

    from flow_engine.auth import Principal

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    one, other = WsTickets(client, keys=keyring()), WsTickets(client, keys=keyring())
    t = one.issue(Principal("ops", "runner"))
    stored = client.keys("flowgate:wsticket:*")
    assert stored and not any(t in key for key in stored)  # only its digest is kept
    assert 0 < client.ttl(stored[0]) <= 30
    assert other.redeem(t) == Principal("ops", "runner")
    assert one.redeem(t) is None


def test_a_page_of_another_site_does_not_use_up_a_ticket(api, fake_server):
    t = ticket(api, as_("runner"))
    refused = api.get(f"{WS}?ticket={t}", headers={**UPGRADE, "Origin": "http://evil.example"})
    assert refused.status_code == 403 and fake_server.built == []
    handshake(api, f"?ticket={t}", fake_server)  # still good for the console's own page
    assert len(fake_server.built) == 1


# -- the runs list ---------------------------------------------------------------------------

def test_the_runs_list_shows_a_tenant_its_own_runs_only(api, defs):
    assert api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin")).status_code == 201
    mine = api.post("/api/v1/run/f", json={"input_value": "a"}, headers=tenant("shop-a")).get_json()
    theirs = api.post("/api/v1/run/f", json={"input_value": "b"}, headers=tenant("shop-b")).get_json()

    def listed(headers, query=""):
        resp = api.get(f"/api/v1/runs{query}", headers=headers)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return [r["run_id"] for r in resp.get_json()["runs"]]

    # runs are recorded by a background writer a few ms after they end
    wait_until(lambda: {mine["run_id"], theirs["run_id"]} <= set(listed(as_("admin"))),
               "both runs recorded")
    assert mine["run_id"] in listed(tenant("shop-a")) and theirs["run_id"] not in listed(tenant("shop-a"))
    assert theirs["run_id"] not in listed(tenant("shop-a"), "?flow=f")
    assert listed(as_("other")) == []  # another runner key: a tenant of its own
    assert {mine["run_id"], theirs["run_id"]} <= set(listed(as_("admin")))  # operators see all


@pytest.mark.parametrize("query", ["?limit=0", "?limit=201", "?limit=x", "?before=yesterday",
                                   "?flow=" + "a" * 65, "?flow=../x", "?flow=%00"])
def test_bad_runs_list_filters_are_400(api, query):
    resp = api.get(f"/api/v1/runs{query}", headers=as_("admin"))
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "bad_request"


def test_stats_of_an_unknown_flow_are_404_and_bad_windows_400(api, defs):
    assert api.get("/api/v1/flows/nope/stats", headers=as_("runner")).status_code == 404
    assert api.post("/api/v1/flows", json=defs.echo(id="s"), headers=as_("admin")).status_code == 201
    for window in ("0", "3601", "-5", "x"):
        resp = api.get(f"/api/v1/flows/s/stats?window_s={window}", headers=as_("runner"))
        assert resp.status_code == 400
    ok = api.get("/api/v1/flows/s/stats", headers=as_("runner")).get_json()
    assert ok["versions"] == [{"version": 1, "live": True, "canary": False, "runs": 0,
                               "failed": 0, "failure_rate": 0.0, "p95_ms": None}]


# -- the console's files ---------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/ui/assets/0/..%2f..%2f__init__.py", "/ui/assets/0/../../app.py", "/ui/assets/0/index.html",
    "/ui/assets/0/%2e%2e%2fauth.py", "/ui/assets/0/nope.js", "/ui/assets/0/.."])
def test_the_console_serves_its_own_files_only(api, path):
    resp = api.get(path)
    assert resp.status_code == 404 or (resp.status_code == 200 and b"<!doctype html>" in resp.data)
    assert b"import " not in resp.data  # no Python source


def test_an_old_asset_digest_is_served_but_not_cached_for_long(api):
    resp = api.get("/ui/assets/0000000000000000/app.js")
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")


@pytest.mark.parametrize("before", ["2999-01-01T00:00:00", "2999-01-01T00:00:00+05:00",
                                    "2000-01-01", "2999-01-01T00:00:00Z"])
def test_paging_by_time_takes_any_iso_time(api, defs, before):
    assert api.post("/api/v1/flows", json=defs.echo(id="p"), headers=as_("admin")).status_code == 201
    run = api.post("/api/v1/run/p", json={"input_value": "a"}, headers=as_("admin")).get_json()
    wait_until(lambda: api.get("/api/v1/runs", headers=as_("admin")).get_json()["runs"], "recorded")
    resp = api.get("/api/v1/runs", query_string={"before": before}, headers=as_("admin"))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    ids = [r["run_id"] for r in resp.get_json()["runs"]]
    assert (run["run_id"] in ids) == before.startswith("2999")


def test_stats_count_the_runs_of_each_version(api, defs):
    assert api.post("/api/v1/flows", json=defs.echo(id="counted"), headers=as_("admin")).status_code == 201
    for _ in range(3):
        ran = api.post("/api/v1/run/counted", json={"input_value": "a"}, headers=as_("runner"))
        assert ran.status_code == 200
    (live,) = api.get("/api/v1/flows/counted/stats", headers=as_("runner")).get_json()["versions"]
    assert (live["version"], live["runs"], live["failed"]) == (1, 3, 0) and live["p95_ms"] > 0


def test_without_redis_tickets_are_a_503_not_a_500():
    import redis
    from support.procs import free_port

    from flow_engine.auth import Principal
    from flow_engine.ws_tickets import TicketsUnavailable

    down = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5,
                       decode_responses=True)  # nothing listens there
    tickets = WsTickets(down, keys=keyring())
    for attempt in (lambda: tickets.issue(Principal("ops", "runner")),
                    lambda: tickets.redeem("some-ticket-value")):
        with pytest.raises(TicketsUnavailable) as refused:
            attempt()
        assert refused.value.status == 503
