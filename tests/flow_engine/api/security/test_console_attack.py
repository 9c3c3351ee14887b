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


def test_a_ticket_carries_its_principal_and_nothing_more():
    """Redeemed, a ticket is exactly who asked: the proxy's tenant stays that tenant, a
    runner stays a runner; and it expires."""
    from flow_engine.auth import parse_key, principal_for

    now = [0.0]
    tickets = WsTickets(ttl_s=30, clock=lambda: now[0])
    proxy = principal_for(parse_key("amb:runner+proxy:proxy-secret-1"), "alice", "shop-a")
    t = tickets.issue(proxy)
    assert tickets.redeem(t) == proxy
    assert tickets.redeem(t) is None  # once
    t2 = tickets.issue(proxy)
    now[0] = 31.0
    assert tickets.redeem(t2) is None  # expired


def test_tickets_in_memory_are_bounded(monkeypatch):
    from flow_engine import ws_tickets
    from flow_engine.auth import Principal

    monkeypatch.setattr(ws_tickets, "MAX_TICKETS", 100)
    tickets = WsTickets()
    issued = [tickets.issue(Principal("k", "runner")) for _ in range(250)]
    assert len(tickets._local) == 100
    assert tickets.redeem(issued[0]) is None and tickets.redeem(issued[-1]) is not None


def test_tickets_through_redis_are_shared_hashed_and_taken_once(redis_url):
    import redis

    from flow_engine.auth import Principal

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    one, other = WsTickets(client), WsTickets(client)  # two engine processes
    t = one.issue(Principal("k", "runner"))
    stored = client.keys("flowgate:wsticket:*")
    assert stored and not any(t in key for key in stored)  # only its digest is kept
    assert 0 < client.ttl(stored[0]) <= 30
    assert other.redeem(t) == Principal("k", "runner")
    assert one.redeem(t) is None


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
    assert ok["versions"][0] == {"version": 1, "runs": 0, "failed": 0, "failure_rate": 0.0,
                                 "p95_ms": None}


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
