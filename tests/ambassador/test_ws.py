"""WS /ws/run-flow before the upgrade (the Flask test client; the bridge itself runs against
real processes in tests/integration/test_ambassador_isolation.py): a page of another origin
is refused with 403 — even when it holds valid credentials — and bad headers or a request
that is not a WebSocket with 400, all in the error contract and before anything goes
upstream; the message size limit in force is what the WebSocket server gets."""

from __future__ import annotations

import pytest
from app_harness import API_KEYS, APP_KEY, assert_error_contract, run_flow

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
KEYS_MODE = {"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": API_KEYS}


@pytest.mark.parametrize(("config", "headers", "status", "code"), [
    pytest.param(KEYS_MODE, {"Origin": "https://evil.example"}, 403, "forbidden",
                 id="another-site"),
    pytest.param(KEYS_MODE, {"Origin": "https://evil.example", "x-api-key": APP_KEY}, 403,
                 "forbidden", id="another-site-with-the-apps-key"),
    pytest.param(KEYS_MODE, {"Origin": "null"}, 403, "forbidden", id="sandboxed-page"),
    pytest.param(KEYS_MODE, {"Origin": "http://localhost:9999"}, 403, "forbidden",
                 id="same-host-other-port"),
    pytest.param({}, {"Origin": "http://127.0.0.1:3000"}, 403, "forbidden",
                 id="auth-none-loopback-dev-page"),
    pytest.param(KEYS_MODE, {"Origin": "http://localhost"}, 401, "unauthorized",
                 id="same-origin-passes-to-auth"),
    pytest.param(KEYS_MODE, {}, 401, "unauthorized", id="no-origin-passes-to-auth"),
    pytest.param({**KEYS_MODE, "websocket.allowed_origins": ["https://app.example.com"]},
                 {"Origin": "https://app.example.com"}, 401, "unauthorized",
                 id="configured-origin-passes-to-auth"),
    pytest.param(KEYS_MODE, {"x-api-key": APP_KEY, "Idempotency-Key": "cl\u00e9"}, 400,
                 "bad_request", id="header-not-ascii"),
])
def test_handshake_refusals(make_app, engine, config, headers, status, code) -> None:
    client, amb = make_app(config)
    response = client.get("/ws/run-flow", headers={**UPGRADE, **headers})
    error = assert_error_contract(response, status, code)
    if status == 403:
        assert "allowed_origins" in error["message"]
    assert engine.requests == []
    assert amb.metrics.requests.labels("/ws/run-flow", "", str(status), "none")._value.get() == 1


def test_a_refused_origin_spends_no_rate_limit_token(make_app) -> None:
    client, _ = make_app({**KEYS_MODE, "ratelimit": {"requests_per_s": 0.001, "burst": 1}})
    for _ in range(3):
        response = client.get("/ws/run-flow", headers={**UPGRADE, "Origin": "https://evil.example",
                                                       "x-api-key": APP_KEY})
        assert response.status_code == 403
    # the identity's one token is still there (HTTP and WebSocket share the bucket)
    assert run_flow(client, headers={"x-api-key": APP_KEY}).status_code == 200


def test_a_plain_get_is_told_to_upgrade(make_app, engine) -> None:
    client, _ = make_app()
    error = assert_error_contract(client.get("/ws/run-flow"), 400, "bad_request")
    assert "Upgrade" in error["message"]


@pytest.mark.parametrize("limit", [1024, 65536])
def test_the_message_size_limit_is_max_body_bytes(make_app, limit) -> None:
    client, _ = make_app(max_body_bytes=limit)
    client.get("/ws/run-flow", headers={**UPGRADE, "Origin": "https://evil.example"})
    options = client.application.config["SOCK_SERVER_OPTIONS"]
    assert options["max_message_size"] == limit
