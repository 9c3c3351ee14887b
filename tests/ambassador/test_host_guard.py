"""HostGuard: a sidecar without inbound auth answers requests addressed to this host only,
so a web page whose DNS name was rebound to 127.0.0.1 cannot use it (ambassador/host_guard.py)."""

from __future__ import annotations

import pytest

from ambassador.host_guard import host_name, local_host


@pytest.mark.parametrize(("host", "name"), [
    ("localhost:8080", "localhost"), ("127.0.0.1", "127.0.0.1"), ("[::1]:8080", "[::1]"),
    ("LocalHost:1", "localhost"), ("rebind.attacker.example:8080", "rebind.attacker.example"),
])
def test_host_name(host, name):
    assert host_name(host) == name


@pytest.mark.parametrize(("host", "allowed", "ok"), [
    pytest.param("localhost:8080", [], True, id="localhost"),
    pytest.param("127.0.0.1:8080", [], True, id="ipv4"),
    pytest.param("[::1]:8080", [], True, id="ipv6"),
    pytest.param("rebind.attacker.example:8080", [], False, id="rebound-name"),
    pytest.param("127.0.0.1.nip.io:8080", [], False, id="a-name-that-resolves-to-loopback"),
    pytest.param(None, [], False, id="no-host"),
    pytest.param("orders-app:8080", ["orders-app"], True, id="listed"),
])
def test_local_host(host, allowed, ok):
    assert local_host(host, allowed) is ok


@pytest.mark.parametrize(("path", "host", "status"), [
    pytest.param("/run-flow", "rebind.attacker.example:8080", 403, id="run-flow-rebound"),
    pytest.param("/runs/abc/events", "rebind.attacker.example:8080", 403, id="events-rebound"),
    pytest.param("/ws/run-flow", "rebind.attacker.example:8080", 403, id="websocket-rebound"),
    pytest.param("/healthz", "10.0.0.7:8080", 200, id="probe-by-pod-ip"),
    pytest.param("/metrics", "10.0.0.7:8080", 200, id="metrics-by-pod-ip"),
])
def test_a_sidecar_without_auth_refuses_other_host_names(make_app, path, host, status):
    client, _ = make_app({})
    method = "post" if path == "/run-flow" else "get"
    resp = getattr(client, method)(path, headers={"Host": host},
                                   **({"json": {"flow_id": "faq"}} if method == "post" else {}))
    assert resp.status_code == status, resp.get_data(as_text=True)
    if status == 403:
        assert resp.get_json()["error"]["code"] == "forbidden"


def test_readyz_verbose_hides_locations_from_a_rebound_page(make_app):
    client, _ = make_app({})
    local = client.get("/readyz?verbose=1", headers={"Host": "localhost:8080"}).get_json()
    rebound = client.get("/readyz?verbose=1",
                         headers={"Host": "rebind.attacker.example:8080"}).get_json()
    assert "url" in local["upstream"]
    assert "url" not in rebound["upstream"]


def test_with_inbound_auth_credentials_decide(make_app):
    keys = {"inbound_auth.mode": "api_keys",
            "inbound_auth.api_keys": [{"key": "orders-secret-0001", "identity": "orders"}]}
    client, _ = make_app(keys)
    resp = client.get("/runs/abc/events", headers={"Host": "orders.internal:8080"})
    assert resp.status_code == 401  # not a Host refusal: the request reached auth
