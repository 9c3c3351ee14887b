"""Issue #10 end to end: two apps sharing one real ambassador (gunicorn + gevent) whose engine
key is a ``runner+proxy`` key, in front of a real engine that knows its keys' roles. What one
app starts, the other can neither read, watch, replay nor be billed for; what an app says
about its own tenant in headers is not believed. (The unit-level attacks are in
tests/flow_engine/api/security/; this is the same promise across the real processes.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from support.procs import ServerProcess
from support.waiting import wait_until
from test_ambassador import (
    ENGINE_AUTH,
    ENGINE_KEY,
    FLOW_ID,
    Ambassador,
    ensure_flow,
    quick_stop,
    sse_events,
    start_engine,
    warm_up,
)

pytestmark = pytest.mark.integration
PROXY_KEY = "sidecar-proxy-secret-0001"
SHOP_KEY, BANK_KEY = "shop-app-secret-0001", "bank-app-secret-0001"
APPS = {"inbound_auth": {"mode": "api_keys", "api_keys": [
    {"key": SHOP_KEY, "identity": "shop-orders", "tenant": "shop", "flows": [FLOW_ID]},
    {"key": BANK_KEY, "identity": "bank-app", "tenant": "bank", "flows": [FLOW_ID]},
]}}
SHOP, BANK = {"x-api-key": SHOP_KEY}, {"x-api-key": BANK_KEY}


@pytest.fixture(scope="module")
def engine(tmp_path_factory, llm_sim) -> Iterator[ServerProcess]:
    """An engine with an admin key (the test's) and the sidecar's runner+proxy key."""
    proc = start_engine(tmp_path_factory.mktemp("engine"), llm_sim, env={
        "FLOW_ENGINE_API_KEYS": f"admin:admin:{ENGINE_KEY},sidecar:runner+proxy:{PROXY_KEY}"})
    try:
        ensure_flow(proc.url)
        warm_up(proc.url, llm_sim)
        yield proc
    finally:
        quick_stop(proc)


@pytest.fixture
def amb(engine, start_ambassador) -> Ambassador:
    return start_ambassador(APPS, engine.url, upstream_key=PROXY_KEY)


def record(engine: ServerProcess, run_id: str) -> dict[str, Any]:
    """The run as the engine's operator lists it (with its tenant), once it is recorded (a
    plain run is written just after its answer)."""
    def listed() -> dict[str, Any] | None:
        resp = requests.get(f"{engine.url}/api/v1/runs", params={"flow": FLOW_ID, "limit": 200},
                            headers=ENGINE_AUTH, timeout=10)
        assert resp.status_code == 200, resp.text
        return next((r for r in resp.json()["runs"] if r["run_id"] == run_id), None)

    return wait_until(listed, f"run {run_id} in the engine's list")


def events(amb: Ambassador, run_id: str, headers: dict[str, str]) -> requests.Response:
    return requests.get(f"{amb.url}/runs/{run_id}/events", headers=headers, stream=True,
                        timeout=30)


def test_a_run_belongs_to_its_apps_tenant_and_no_other_app_can_watch_it(engine, amb,
                                                                        fresh_llm_sim):
    shop = amb.run("what is my order status", headers=SHOP)
    assert shop.status_code == 200, shop.text
    run_id = shop.json()["run_id"]

    assert record(engine, run_id)["tenant"] == "sidecar/shop"
    theirs = events(amb, run_id, BANK)
    nobodys = events(amb, uuid.uuid4().hex, BANK)
    assert theirs.status_code == nobodys.status_code == 404, theirs.text
    assert theirs.json()["error"]["code"] == nobodys.json()["error"]["code"]  # as if not there
    mine = events(amb, run_id, SHOP)
    assert mine.status_code == 200
    assert [e.event for _, e in sse_events(mine)][-1] == "run_finished"


def test_the_same_idempotency_key_from_another_app_is_another_run(engine, amb, fresh_llm_sim):
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex[:8]}"}

    shop = amb.run("pay order 1001", headers={**SHOP, **key})
    bank = amb.run("pay order 1001", headers={**BANK, **key})
    shop_again = amb.run("pay order 1001", headers={**SHOP, **key})

    assert shop.status_code == bank.status_code == shop_again.status_code == 200
    assert "Idempotent-Replayed" not in bank.headers  # neither replayed nor blocked
    assert bank.json()["run_id"] != shop.json()["run_id"]
    assert shop_again.headers.get("Idempotent-Replayed") == "true"
    assert shop_again.json()["run_id"] == shop.json()["run_id"]
    assert fresh_llm_sim.stats()["chat_completions_started"] == 2  # each app billed once
    assert record(engine, bank.json()["run_id"])["tenant"] == "sidecar/bank"


def test_an_app_naming_another_tenant_in_its_headers_is_not_believed(engine, amb,
                                                                     fresh_llm_sim):
    claimed = amb.run("let me in", headers={**SHOP, "x-flowgate-tenant": "bank",
                                            "x-flowgate-identity": "bank-app"})
    assert claimed.status_code == 200, claimed.text
    run_id = claimed.json()["run_id"]

    assert record(engine, run_id)["tenant"] == "sidecar/shop"
    assert events(amb, run_id, BANK).status_code == 404
