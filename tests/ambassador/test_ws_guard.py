"""ambassador.ws_guard: every message on WS /ws/run-flow checked like its HTTP twin, tried
as a hostile tenant would — runs and watches of other flows, malformed ids, floods past
the rate limits, messages built to crash a parser — and the credential checked again so
that an expired token or a revoked key ends the connection (the in-test engine answers
the run lookups)."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from app_harness import APP_KEY, OTHER_KEY

from ambassador.config import load
from ambassador.filters.auth import Identity
from ambassador.ws_guard import Close, Guard
from flowgate.common import tracing

KEYS = [{"key": APP_KEY, "identity": "orders-app", "tenant": "shop", "flows": ["faq"]},
        {"key": OTHER_KEY, "identity": "other-app"}]
KEYS_MODE = {"inbound_auth.mode": "api_keys", "inbound_auth.api_keys": KEYS}
SECRET = "ws-guard-jwt-secret-0123456789abcdef"
JWT_MODE = {"inbound_auth.mode": "jwt",
            "inbound_auth.jwt": {"secret": SECRET, "audience": "flowgate", "leeway_s": 0}}


def guard_for(amb, headers: dict[str, str], clock=time.time) -> Guard:
    """A guard as the handshake admits it: identity from these headers."""
    from ambassador.chain import Request

    identity = amb.auth.identify(Request("GET", "/", headers, "/ws/run-flow"))
    return Guard(amb, headers, identity, tracing.from_headers(None, None), clock=clock)


def reconfigure(amb, **changes: Any) -> None:
    """A config reload: the app's overrides with ``changes`` on top."""
    amb.rebuild(load(None, overrides={**amb.holder.overrides, **changes}))


def error_code(verdict) -> str | None:
    return verdict.get("code") if isinstance(verdict, dict) else None


# -- run ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "code"), [
    pytest.param({"type": "run", "flow_id": "billing", "input": "x"}, "forbidden",
                 id="flow-not-allowed"),
    pytest.param({"type": "run", "flow_id": "faq\n", "input": "x"}, "bad_request",
                 id="flow-id-trailing-newline"),
    pytest.param({"type": "run", "flow_id": ["faq"], "input": "x"}, "bad_request",
                 id="flow-id-a-list"),
    pytest.param({"type": "run", "input": "x"}, "bad_request", id="no-flow-id"),
])
def test_runs_the_caller_may_not_make_are_refused_here(make_app, engine, message, code) -> None:
    _, amb = make_app(KEYS_MODE)
    verdict = guard_for(amb, {"x-api-key": APP_KEY}).check(json.dumps(message))
    assert error_code(verdict) == code
    assert verdict["type"] == "error" and verdict["message"] and verdict["trace_id"]
    assert engine.requests == []


def test_an_allowed_run_goes_upstream_with_input_value(make_app) -> None:
    _, amb = make_app(KEYS_MODE)
    verdict = guard_for(amb, {"x-api-key": APP_KEY}).check(json.dumps(
        {"type": "run", "flow_id": "faq", "input": "hello", "session_id": "s1"}))
    assert json.loads(verdict) == {"type": "run", "flow_id": "faq", "input_value": "hello",
                                   "session_id": "s1"}


@pytest.mark.parametrize(("config", "flows", "limited"), [
    pytest.param({"ratelimit": {"requests_per_s": 0.001, "burst": 2}}, ["faq", "faq", "faq"],
                 [False, False, True], id="per-identity"),
    pytest.param({"ratelimit": {"requests_per_s": 0.001, "burst": 2}}, ["faq", "other", "misc"],
                 [False, False, True], id="per-identity-across-flows"),
    pytest.param({"flows": {"faq": {"ratelimit": {"requests_per_s": 0.001, "burst": 1}}}},
                 ["faq", "faq", "other"], [False, True, False], id="per-flow"),
])
def test_each_run_message_passes_the_rate_limits(make_app, config, flows, limited) -> None:
    _, amb = make_app({**KEYS_MODE, **config})
    guard = guard_for(amb, {"x-api-key": OTHER_KEY})
    verdicts = [guard.check(json.dumps({"type": "run", "flow_id": f, "input": "x"})) for f in flows]
    assert [error_code(v) == "rate_limited" for v in verdicts] == limited
    for verdict in verdicts:
        if error_code(verdict) == "rate_limited":
            assert verdict["retry_after_s"] >= 1


def test_http_and_websocket_share_the_buckets(make_app) -> None:
    from app_harness import run_flow

    client, amb = make_app({**KEYS_MODE, "ratelimit": {"requests_per_s": 0.001, "burst": 1}})
    assert run_flow(client, headers={"x-api-key": OTHER_KEY}).status_code == 200
    verdict = guard_for(amb, {"x-api-key": OTHER_KEY}).check(
        json.dumps({"type": "run", "flow_id": "faq", "input": "x"}))
    assert error_code(verdict) == "rate_limited"


# -- watch and cancel ---------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "engine_says", "code"), [
    pytest.param({"type": "watch", "run_id": "r1"}, (200, {"flow_id": "billing"}), "forbidden",
                 id="watch-a-run-of-another-flow"),
    pytest.param({"type": "watch", "run_id": "r1", "last_event_id": 0}, (404, {"error": {
        "code": "run_not_found", "message": "no"}}), "run_not_found",
        id="watch-an-unknown-or-other-tenants-run"),
    pytest.param({"type": "cancel", "run_id": "r1"}, (200, {"flow_id": "billing"}), "forbidden",
                 id="cancel-a-run-of-another-flow"),
    pytest.param({"type": "cancel", "run_id": "r1"}, (404, {"error": {
        "code": "run_not_found", "message": "no"}}), "run_not_found", id="cancel-an-unknown-run"),
    pytest.param({"type": "watch", "run_id": "r1"}, (200, {"flow_id": "faq"}), None,
                 id="watch-an-allowed-run"),
    pytest.param({"type": "cancel", "run_id": "r1"}, (200, {"flow_id": "faq"}), None,
                 id="cancel-an-allowed-run"),
])
def test_watch_and_cancel_are_checked_through_the_runs_flow(make_app, engine, message,
                                                           engine_says, code) -> None:
    _, amb = make_app(KEYS_MODE)
    engine.answer(*engine_says)
    text = json.dumps(message)
    verdict = guard_for(amb, {"x-api-key": APP_KEY}).check(text)
    if code is None:
        assert verdict == text  # forwarded as it was
    else:
        assert error_code(verdict) == code
    [probe] = engine.requests  # the lookup, made as the caller
    assert probe["path"] == "/api/v1/runs/r1"
    assert probe["headers"]["x-flowgate-identity"] == "orders-app"
    assert probe["headers"]["x-flowgate-tenant"] == "shop"


@pytest.mark.parametrize("message", [
    pytest.param({"type": "watch", "run_id": "r1 HTTP/1.1\r\nX-Flowgate-Tenant: bank"},
                 id="watch-smuggling-a-request-line"),
    pytest.param({"type": "watch", "run_id": "r1\n"}, id="watch-trailing-newline"),
    pytest.param({"type": "watch", "run_id": "../flows/x"}, id="watch-path"),
    pytest.param({"type": "watch"}, id="watch-no-run-id"),
    pytest.param({"type": "cancel", "run_id": 7}, id="cancel-run-id-a-number"),
])
def test_malformed_run_ids_never_reach_a_request_line(make_app, engine, message) -> None:
    _, amb = make_app(KEYS_MODE)
    assert error_code(guard_for(amb, {"x-api-key": APP_KEY}).check(json.dumps(message))) == "bad_request"
    assert engine.requests == []


def test_a_watch_passes_the_rate_limit_and_a_cancel_does_not(make_app, engine) -> None:
    _, amb = make_app({**KEYS_MODE, "ratelimit": {"requests_per_s": 0.001, "burst": 1}})
    guard = guard_for(amb, {"x-api-key": OTHER_KEY})  # no allowlist: no lookup
    watch = json.dumps({"type": "watch", "run_id": "r1"})
    cancel = json.dumps({"type": "cancel", "run_id": "r1"})
    assert [guard.check(watch), error_code(guard.check(watch))] == [watch, "rate_limited"]
    assert guard.check(cancel) == cancel
    assert engine.requests == []


@pytest.mark.parametrize(("message", "forwarded"), [
    pytest.param('{"type": "cancel"}', True, id="cancel-the-followed-run"),
    pytest.param('{"type": "ping"}', True, id="unknown-type-the-engine-explains"),
    pytest.param("[1, 2]", True, id="not-an-object"),
    pytest.param("not json", False, id="not-json"),
    pytest.param('{"type": "run", "tweaks": ' + '{"t":' * 960 + "1" + "}" * 960 + "}", False,
                 id="960-levels"),
    pytest.param("[" * 500_000, False, id="half-a-million-brackets"),
])
def test_other_messages(make_app, engine, message, forwarded) -> None:
    _, amb = make_app(KEYS_MODE)
    verdict = guard_for(amb, {"x-api-key": APP_KEY}).check(message)
    if forwarded:
        assert verdict == message
    else:
        assert error_code(verdict) == "bad_request"
    assert engine.requests == []


# -- the credential, checked again --------------------------------------------------------------

def test_a_key_removed_by_a_reload_closes_the_connection(make_app) -> None:
    _, amb = make_app(KEYS_MODE)
    guard = guard_for(amb, {"x-api-key": APP_KEY})
    assert guard.tick() is None
    reconfigure(amb, **{"inbound_auth.api_keys": KEYS[1:]})
    closing = guard.tick()
    assert isinstance(closing, Close) and closing.code == 1008 and "invalid API key" in closing.reason
    run = json.dumps({"type": "run", "flow_id": "faq", "input": "x"})
    assert isinstance(guard.check(run), Close)


def test_a_key_removed_while_its_handshake_was_admitted_is_checked_at_the_first_tick(
        make_app) -> None:
    """The race (security review): a reload that revokes the key lands after the auth filter
    admitted the handshake but before the upgrade built the guard. The guard remembers the
    settings that admitted the caller, so its first tick checks again and closes."""
    from ambassador.chain import Request
    from ambassador.ws import Upgrade

    _, amb = make_app(KEYS_MODE)
    admitting = amb.pipeline
    headers = {"x-api-key": APP_KEY}
    request = Request("GET", "/api/v1/ws/runs", headers, "/ws/run-flow")
    request.ctx["trace"] = tracing.from_headers(None, None)
    request.ctx["identity"] = amb.auth.identify(Request("GET", "/", headers, "/ws/run-flow"))
    reconfigure(amb, **{"inbound_auth.api_keys": KEYS[1:]})  # lands mid-handshake
    closing = Upgrade(amb, admitting.settings).guard(request).tick()
    assert isinstance(closing, Close) and closing.code == 1008


def test_a_narrower_allowlist_applies_to_the_next_message(make_app) -> None:
    _, amb = make_app(KEYS_MODE)
    guard = guard_for(amb, {"x-api-key": APP_KEY})
    run = json.dumps({"type": "run", "flow_id": "faq", "input": "x"})
    assert isinstance(guard.check(run), str)
    reconfigure(amb, **{"inbound_auth.api_keys": [{**KEYS[0], "flows": ["billing"]}, KEYS[1]]})
    assert guard.tick() is None
    assert guard.identity.flows == frozenset({"billing"})
    assert error_code(guard.check(run)) == "forbidden"


@pytest.mark.parametrize("change", [
    pytest.param({"identity": "renamed-app"}, id="identity-renamed"),
    pytest.param({"tenant": "bank"}, id="tenant-changed"),
])
def test_a_key_that_now_names_someone_else_closes_the_connection(make_app, change) -> None:
    """The upstream connection carries the identity and tenant of the handshake."""
    _, amb = make_app(KEYS_MODE)
    guard = guard_for(amb, {"x-api-key": APP_KEY})
    reconfigure(amb, **{"inbound_auth.api_keys": [{**KEYS[0], **change}, KEYS[1]]})
    closing = guard.tick()
    assert isinstance(closing, Close) and closing.code == 1008


def test_turning_auth_on_closes_anonymous_connections(make_app) -> None:
    _, amb = make_app()
    guard = guard_for(amb, {})
    assert guard.identity is None and guard.tick() is None
    reconfigure(amb, **KEYS_MODE)
    assert isinstance(guard.tick(), Close)


def hs_token(exp: float, **claims: Any) -> str:
    return jwt.encode({"sub": "orders-app", "aud": "flowgate", "flows": ["faq"], "exp": exp,
                       **claims}, SECRET, algorithm="HS256")


def test_an_expired_jwt_closes_the_connection(make_app, clock) -> None:
    """The guard's clock says the token's exp has passed; the auth filter (on the wall
    clock) agrees, since this token expired two minutes ago."""
    _, amb = make_app(JWT_MODE)
    exp = int(time.time()) - 120
    guard = Guard(amb, {"authorization": f"Bearer {hs_token(exp)}"},
                  Identity("orders-app", None, frozenset({"faq"}), expires_at=exp),
                  tracing.from_headers(None, None), clock=clock)
    clock.now = exp - 1
    assert guard.tick() is None  # before exp: not even checked
    clock.now = exp + 1
    closing = guard.tick()
    assert isinstance(closing, Close) and closing.code == 1008 and "expired" in closing.reason


def test_a_valid_jwt_is_not_verified_again_every_second(make_app, clock, monkeypatch) -> None:
    _, amb = make_app(JWT_MODE)
    guard = guard_for(amb, {"authorization": f"Bearer {hs_token(int(time.time()) + 300)}"},
                      clock=clock)
    assert guard.identity is not None and guard.identity.expires_at is not None
    verified: list[int] = []
    real = amb.auth._authenticate
    monkeypatch.setattr(amb.auth, "_authenticate", lambda r: verified.append(1) or real(r))
    clock.now = guard.identity.expires_at - 1
    for _ in range(5):
        assert guard.tick() is None
    assert verified == []
    reconfigure(amb, **{"inbound_auth.jwt": {**JWT_MODE["inbound_auth.jwt"], "leeway_s": 1}})
    fresh = amb.auth._authenticate
    monkeypatch.setattr(amb.auth, "_authenticate", lambda r: verified.append(1) or fresh(r))
    assert guard.tick() is None and verified == [1]  # a reload: checked again, once
