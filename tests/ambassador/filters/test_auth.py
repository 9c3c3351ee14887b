"""Auth filter: none / api_keys / jwt (HS256, RS256 with a PEM or a JWKS file), flow
allowlists, identity in ctx, and the reasons reported for refusals — including what a
hostile caller would try: tokens without a flows claim, claims that cannot travel as
headers, JWKS keys of another type than the algorithm's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ambassador.config import ConfigError, InboundAuth
from ambassador.filters.auth import Auth, Identity
from flowgate.common import tracing

SECRET = "hs256-shared-secret-for-the-ambassador-tests-0123456789-abcdefghij"
KEYS = [
    {"key": "orders-secret-1", "identity": "orders-app", "tenant": "shop"},
    {"key": "faq-only-secret", "identity": "faq-app", "flows": ["faq"]},
    {"key": "nothing-allowed", "identity": "locked-app", "flows": []},
]


def make_auth(settings: dict[str, Any], **kw) -> tuple[Auth, list[str]]:
    """The filter and the list its on_failure hook fills with reasons."""
    failures: list[str] = []
    return Auth(InboundAuth.model_validate(settings), on_failure=failures.append, **kw), failures


def api_key_auth() -> tuple[Auth, list[str]]:
    return make_auth({"mode": "api_keys", "api_keys": KEYS})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], claims: dict[str, Any], sign) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- none ---------------------------------------------------------------------------------------

def test_mode_none_lets_everyone_through(request_for, downstream) -> None:
    auth, failures = make_auth({"mode": "none"})
    down = downstream()
    assert auth(request_for(), down).status == 200
    assert down.count == 1 and "identity" not in down.calls[0].ctx
    assert failures == []


# -- api keys -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "identity", "tenant"), [
    pytest.param({"Authorization": "Bearer orders-secret-1"}, "orders-app", "shop", id="bearer"),
    pytest.param({"Authorization": "bearer orders-secret-1"}, "orders-app", "shop",
                 id="bearer-lower-case-scheme"),
    pytest.param({"Authorization": "Bearer   orders-secret-1  "}, "orders-app", "shop",
                 id="bearer-extra-spaces"),
    pytest.param({"x-api-key": "orders-secret-1"}, "orders-app", "shop", id="x-api-key"),
    pytest.param({"x-api-key": "faq-only-secret"}, "faq-app", None, id="second-key"),
])
def test_api_key_accepted(request_for, downstream, headers, identity, tenant) -> None:
    auth, failures = api_key_auth()
    down = downstream()
    response = auth(request_for("faq", headers=headers), down)
    assert response.status == 200
    seen = down.calls[0].ctx["identity"]
    assert (seen.name, seen.tenant) == (identity, tenant)
    assert failures == []


@pytest.mark.parametrize(("headers", "reason"), [
    pytest.param({}, "missing", id="no-credentials"),
    pytest.param({"Authorization": "Bearer "}, "missing", id="empty-bearer"),
    pytest.param({"Authorization": "Basic b3JkZXJzOnNlY3JldA=="}, "missing", id="basic-scheme"),
    pytest.param({"Authorization": "orders-secret-1"}, "missing", id="no-scheme"),
    pytest.param({"Authorization": "Bearer wrong-secret-9"}, "invalid_key", id="wrong-bearer"),
    pytest.param({"x-api-key": "wrong-secret-9"}, "invalid_key", id="wrong-x-api-key"),
    pytest.param({"x-api-key": "orders-secret"}, "invalid_key", id="prefix-of-a-key"),
    pytest.param({"x-api-key": "orders-secret-12"}, "invalid_key", id="key-plus-a-char"),
    pytest.param({"x-api-key": "ORDERS-SECRET-1"}, "invalid_key", id="wrong-case"),
])
def test_api_key_refused_with_401(request_for, downstream, headers, reason) -> None:
    auth, failures = api_key_auth()
    down = downstream()
    trace = tracing.from_headers(None, None)
    response = auth(request_for(headers=headers, ctx={"trace": trace}), down)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["code"] == "unauthorized" and error["trace_id"] == trace.trace_id
    assert "secret" not in error["message"]  # the presented key is not echoed
    assert down.count == 0
    assert failures == [reason]


@pytest.mark.parametrize(("key", "flow", "status"), [
    pytest.param("faq-only-secret", "faq", 200, id="allowed-flow"),
    pytest.param("faq-only-secret", "billing", 403, id="other-flow"),
    pytest.param("orders-secret-1", "billing", 200, id="no-allowlist-means-any-flow"),
    pytest.param("nothing-allowed", "faq", 403, id="empty-allowlist"),
])
def test_flow_allowlist(request_for, downstream, key, flow, status) -> None:
    auth, failures = api_key_auth()
    down = downstream()
    response = auth(request_for(flow, headers={"x-api-key": key}), down)
    assert response.status == status
    if status == 403:
        assert response.json()["error"]["code"] == "forbidden"
        assert flow in response.json()["error"]["message"]
        assert down.count == 0 and failures == ["flow_not_allowed"]
    else:
        assert down.count == 1 and failures == []


def test_identity_may_run() -> None:
    assert Identity("a").may_run("x")
    assert Identity("a", flows=frozenset({"x"})).may_run("x")
    assert not Identity("a", flows=frozenset({"x"})).may_run("y")


# -- JWT HS256 ----------------------------------------------------------------------------------

HS = {"mode": "jwt", "jwt": {"algorithm": "HS256", "secret": SECRET, "issuer": "https://idp",
                             "audience": "flowgate"}}


def hs_token(claims: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)


def good_claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "orders-app", "tenant": "shop", "iss": "https://idp", "aud": "flowgate",
              "flows": ["faq"], "exp": now + 300, "iat": now}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def test_jwt_hs256_valid_token(request_for, downstream) -> None:
    auth, failures = make_auth(HS)
    down = downstream()
    response = auth(request_for(headers=bearer(hs_token(good_claims()))), down)
    assert response.status == 200
    assert down.calls[0].ctx["identity"] == Identity("orders-app", "shop", frozenset({"faq"}))
    assert failures == []


def alg_none_token() -> str:
    return raw_token({"alg": "none", "typ": "JWT"}, good_claims(), lambda _: b"")


def now() -> int:
    """The wall clock when the token is made (not when tests are collected: a long run
    would otherwise age these tokens into validity)."""
    return int(time.time())


def tokens_refused() -> list:
    return [
        pytest.param(lambda: hs_token(good_claims(exp=now() - 120)), "expired", id="expired"),
        pytest.param(lambda: hs_token(good_claims(nbf=now() + 120)), "not_yet_valid",
                     id="nbf-in-future"),
        pytest.param(lambda: hs_token(good_claims(iss="https://evil")), "invalid_token", id="wrong-iss"),
        pytest.param(lambda: hs_token(good_claims(iss=None)), "invalid_token", id="missing-iss"),
        pytest.param(lambda: hs_token(good_claims(aud="someone-else")), "invalid_token", id="wrong-aud"),
        pytest.param(lambda: hs_token(good_claims(aud=None)), "invalid_token", id="missing-aud"),
        pytest.param(lambda: hs_token(good_claims(exp=None)), "invalid_token", id="missing-exp"),
        pytest.param(lambda: hs_token(good_claims(sub=None)), "invalid_token", id="missing-sub"),
        pytest.param(lambda: hs_token(good_claims(sub=42)), "invalid_token", id="non-string-sub"),
        pytest.param(lambda: hs_token(good_claims(), secret="another-secret-of-32-bytes-or-more"),
                     "invalid_token", id="bad-signature"),
        pytest.param(lambda: hs_token(good_claims())[:-3] + "AAA", "invalid_token", id="tampered-signature"),
        pytest.param(alg_none_token, "invalid_token", id="alg-none"),
        pytest.param(lambda: jwt.encode(good_claims(), SECRET, algorithm="HS512"), "invalid_token",
                     id="other-hmac-alg"),
        pytest.param(lambda: "not.a.jwt", "invalid_token", id="garbage"),
        pytest.param(lambda: "", "missing", id="empty"),
    ]


@pytest.mark.parametrize(("make_token", "reason"), tokens_refused())
def test_jwt_refused_with_401(request_for, downstream, make_token, reason) -> None:
    auth, failures = make_auth(HS)
    down = downstream()
    response = auth(request_for(headers=bearer(make_token())), down)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"
    assert down.count == 0
    assert failures == [reason]


def test_jwt_mode_ignores_x_api_key(request_for, downstream) -> None:
    auth, failures = make_auth(HS)
    response = auth(request_for(headers={"x-api-key": hs_token(good_claims())}), downstream())
    assert response.status == 401 and failures == ["missing"]


@pytest.mark.parametrize(("offsets", "status", "reason"), [
    pytest.param({"exp": -10}, 200, None, id="expired-10s-ago-within-leeway"),
    pytest.param({"exp": -60}, 401, "expired", id="expired-60s-ago-past-leeway"),
    pytest.param({"nbf": 10}, 200, None, id="nbf-10s-ahead-within-leeway"),
    pytest.param({"nbf": 60}, 401, "not_yet_valid", id="nbf-60s-ahead-past-leeway"),
])
def test_jwt_leeway(request_for, downstream, offsets, status, reason) -> None:
    auth, failures = make_auth({"mode": "jwt", "jwt": {"secret": SECRET, "leeway_s": 30,
                                                       "audience": "flowgate"}})
    now = int(time.time())
    claims = {"sub": "a", "aud": "flowgate", "flows": ["faq"], "exp": now + 300,
              **{k: now + v for k, v in offsets.items()}}
    response = auth(request_for(headers=bearer(hs_token(claims))), downstream())
    assert response.status == status
    assert failures == ([reason] if reason else [])


def minimal(**over: Any) -> dict[str, Any]:
    """Claims a config with only a secret and the audience accepts."""
    return {"sub": "a", "aud": "flowgate", "flows": ["faq"], "exp": int(time.time()) + 60, **over}


def test_jwt_without_a_configured_issuer_accepts_any_issuer(request_for, downstream) -> None:
    auth, _ = make_auth({"mode": "jwt", "jwt": {"secret": SECRET, "audience": "flowgate"}})
    token = hs_token(minimal(iss="x"))
    assert auth(request_for(headers=bearer(token)), downstream()).status == 200


def test_jwt_secret_file(tmp_path: Path, request_for, downstream) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    auth, _ = make_auth({"mode": "jwt", "jwt": {"secret_file": str(secret_file),
                                                "audience": "flowgate"}})
    token = hs_token(minimal())
    assert auth(request_for(headers=bearer(token)), downstream()).status == 200


@pytest.mark.parametrize(("flows", "flow", "status"), [
    pytest.param(["faq"], "faq", 200, id="claim-allows-flow"),
    pytest.param(["faq"], "billing", 403, id="claim-forbids-other-flow"),
    pytest.param(None, "faq", 403, id="no-claim-no-flow"),
    pytest.param([], "faq", 403, id="empty-claim"),
])
def test_jwt_flows_claim_limits_flows(request_for, downstream, flows, flow, status) -> None:
    auth, failures = make_auth(HS)
    token = hs_token(good_claims(flows=flows))
    down = downstream()
    response = auth(request_for(flow, headers=bearer(token)), down)
    assert response.status == status
    assert failures == (["flow_not_allowed"] if status == 403 else [])
    if status == 200:
        expected = frozenset(flows) if flows is not None else None
        assert down.calls[0].ctx["identity"].flows == expected


def test_jwt_custom_claim_names(request_for, downstream) -> None:
    auth, _ = make_auth({"mode": "jwt", "jwt": {
        "secret": SECRET, "audience": "flowgate", "identity_claim": "client_id",
        "tenant_claim": "org", "flows_claim": "allowed_flows"}})
    token = hs_token({"client_id": "svc-7", "org": "acme", "allowed_flows": ["faq"],
                      "aud": "flowgate", "exp": int(time.time()) + 60})
    down = downstream()
    assert auth(request_for("faq", headers=bearer(token)), down).status == 200
    assert down.calls[0].ctx["identity"] == Identity("svc-7", "acme", frozenset({"faq"}))


def test_jwt_expiry_uses_the_injected_clock(request_for, downstream, clock) -> None:
    clock.now = 1_000_000.0  # 1970: a token valid then has long expired on the wall clock
    auth, _failures = make_auth({"mode": "jwt", "jwt": {"secret": SECRET, "leeway_s": 0,
                                                        "audience": "flowgate"}}, clock=clock)
    token = hs_token(minimal(iat=999_990, exp=1_000_060))
    assert auth(request_for(headers=bearer(token)), downstream()).status == 200


# -- JWT RS256 ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsa_keys():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, other, public_pem


@pytest.fixture
def rs_pem_auth(tmp_path: Path, rsa_keys):
    _, _, public_pem = rsa_keys
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem)
    return make_auth({"mode": "jwt", "jwt": {"algorithm": "RS256", "public_key_file": str(pem),
                                             "audience": "flowgate"}})


@pytest.fixture
def rs_jwks_auth(tmp_path: Path, rsa_keys):
    private, other, _ = rsa_keys
    keys = []
    for kid, key in (("other-key", other), ("main-key", private)):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": keys}))
    return make_auth({"mode": "jwt", "jwt": {"algorithm": "RS256", "jwks_file": str(jwks),
                                             "audience": "flowgate"}})


def rs_token(key, claims: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm="RS256", headers=headers or None)


def test_rs256_public_key_file_valid(rs_pem_auth, rsa_keys, request_for, downstream) -> None:
    auth, failures = rs_pem_auth
    down = downstream()
    response = auth(request_for(headers=bearer(rs_token(rsa_keys[0], good_claims()))), down)
    assert response.status == 200 and failures == []
    assert down.calls[0].ctx["identity"].name == "orders-app"


def confusion_token(public_pem: bytes) -> str:
    """HS256 signed with the RS256 public key PEM as the HMAC secret (PyJWT refuses to make it)."""
    return raw_token({"alg": "HS256", "typ": "JWT"}, good_claims(),
                     lambda data: hmac.new(public_pem, data, hashlib.sha256).digest())


@pytest.mark.parametrize(("make_token", "reason"), [
    pytest.param(lambda keys: rs_token(keys[1], good_claims()), "invalid_token",
                 id="signed-by-another-key"),
    pytest.param(lambda keys: rs_token(keys[0], good_claims(exp=int(time.time()) - 120)), "expired",
                 id="expired"),
    pytest.param(lambda keys: rs_token(keys[0], good_claims(aud="other")), "invalid_token",
                 id="wrong-aud"),
    pytest.param(lambda keys: confusion_token(keys[2]), "invalid_token",
                 id="algorithm-confusion-hs256-with-public-pem"),
    pytest.param(lambda keys: raw_token({"alg": "none"}, good_claims(), lambda _: b""),
                 "invalid_token", id="alg-none"),
])
def test_rs256_public_key_file_refused(rs_pem_auth, rsa_keys, request_for, downstream,
                                       make_token, reason) -> None:
    auth, failures = rs_pem_auth
    down = downstream()
    response = auth(request_for(headers=bearer(make_token(rsa_keys))), down)
    assert response.status == 401 and down.count == 0
    assert failures == [reason]


def test_rs256_jwks_picks_the_key_by_kid(rs_jwks_auth, rsa_keys, request_for, downstream) -> None:
    auth, failures = rs_jwks_auth
    private, other, _ = rsa_keys
    for key, kid in ((private, "main-key"), (other, "other-key")):
        token = rs_token(key, minimal(sub=kid), kid=kid)
        down = downstream()
        assert auth(request_for(headers=bearer(token)), down).status == 200
        assert down.calls[0].ctx["identity"].name == kid
    assert failures == []


@pytest.mark.parametrize(("make_token", "reason"), [
    pytest.param(lambda keys: rs_token(keys[0], minimal(), kid="unknown"), "invalid_token",
                 id="unknown-kid"),
    pytest.param(lambda keys: rs_token(keys[0], minimal(), kid="other-key"), "invalid_token",
                 id="kid-of-another-key"),
    pytest.param(lambda keys: rs_token(keys[0], minimal(exp=int(time.time()) - 120),
                                       kid="main-key"), "expired", id="expired"),
    pytest.param(lambda keys: confusion_token(keys[2]), "invalid_token", id="algorithm-confusion"),
])
def test_rs256_jwks_refused(rs_jwks_auth, rsa_keys, request_for, downstream, make_token,
                            reason) -> None:
    auth, failures = rs_jwks_auth
    response = auth(request_for(headers=bearer(make_token(rsa_keys))), downstream())
    assert response.status == 401
    assert failures == [reason]


def test_jwt_malformed_flows_claim_does_not_grant_every_flow(request_for, downstream) -> None:
    auth, _ = make_auth(HS)
    token = hs_token(good_claims(flows="faq"))
    response = auth(request_for("billing", headers=bearer(token)), downstream())
    assert response.status in (401, 403)


# -- what a hostile caller tries ----------------------------------------------------------------

@pytest.mark.parametrize(("setting", "claims", "flow", "status"), [
    pytest.param({}, {"flows": None}, "faq", 403, id="no-flows-claim-means-no-flow"),
    pytest.param({"missing_flows_claim": "none"}, {"flows": None}, "faq", 403,
                 id="none-spelled-out"),
    pytest.param({"missing_flows_claim": "all"}, {"flows": None}, "billing", 200,
                 id="all-when-configured"),
    pytest.param({"missing_flows_claim": "all"}, {"flows": []}, "faq", 403,
                 id="an-empty-claim-is-not-missing"),
])
def test_jwt_missing_flows_claim(request_for, downstream, setting, claims, flow, status) -> None:
    auth, _ = make_auth({**HS, "jwt": {**HS["jwt"], **setting}})
    response = auth(request_for(flow, headers=bearer(hs_token(good_claims(**claims)))),
                    downstream())
    assert response.status == status


@pytest.mark.parametrize(("claims", "words"), [
    pytest.param({"sub": "orders\r\nx-flowgate-tenant: bank"}, "'sub'", id="line-break-in-sub"),
    pytest.param({"sub": "jos\u00e9"}, "'sub'", id="non-ascii-sub"),
    pytest.param({"sub": "a" * 201}, "'sub'", id="sub-too-long"),
    pytest.param({"tenant": 7}, "'tenant'", id="numeric-tenant-is-not-no-tenant"),
    pytest.param({"tenant": ["shop", "bank"]}, "'tenant'", id="list-tenant"),
    pytest.param({"tenant": "shop bank"}, "'tenant'", id="tenant-with-a-space"),
    pytest.param({"tenant": ""}, "'tenant'", id="empty-tenant"),
])
def test_jwt_claims_that_cannot_travel_upstream_are_refused(request_for, downstream, claims,
                                                            words) -> None:
    """Identity and tenant become header values; a tenant that cannot must never turn
    into no tenant at all."""
    auth, failures = make_auth(HS)
    down = downstream()
    response = auth(request_for(headers=bearer(hs_token(good_claims(**claims)))), down)
    assert response.status == 401 and down.count == 0
    assert words in response.json()["error"]["message"]
    assert failures == ["invalid_token"]


@pytest.fixture(scope="module")
def mixed_jwks_keys(rsa_keys):
    """An EC key and an oct (HMAC) secret, then the RSA key, each under its own kid."""
    private, _, _ = rsa_keys
    ec_private = ec.generate_private_key(ec.SECP256R1())
    secret = b"an-oct-key-in-the-jwks-0123456789abcdef"
    keys = [
        {**jwt.algorithms.ECAlgorithm.to_jwk(ec_private.public_key(), as_dict=True), "kid": "ec"},
        {"kty": "oct", "k": b64url(secret), "kid": "oct"},
        {**jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "rsa"},
    ]
    return {"rsa": private, "ec": ec_private, "oct": secret, "jwks": {"keys": keys}}


@pytest.fixture
def mixed_jwks_auth(tmp_path: Path, mixed_jwks_keys):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(mixed_jwks_keys["jwks"]))
    return make_auth({"mode": "jwt", "jwt": {"algorithm": "RS256", "jwks_file": str(path),
                                             "audience": "flowgate"}})


@pytest.mark.parametrize(("make_token", "status"), [
    pytest.param(lambda k: rs_token(k["rsa"], good_claims(), kid="ec"), 401,
                 id="rs256-token-naming-the-ec-key"),
    pytest.param(lambda k: rs_token(k["rsa"], good_claims(), kid="oct"), 401,
                 id="rs256-token-naming-the-oct-key"),
    pytest.param(lambda k: rs_token(k["rsa"], good_claims()), 200,
                 id="no-kid-skips-the-keys-of-other-types"),
])
def test_jwks_keys_of_another_type_are_a_401_not_a_500(mixed_jwks_auth, mixed_jwks_keys,
                                                       request_for, downstream, make_token,
                                                       status) -> None:
    auth, failures = mixed_jwks_auth
    response = auth(request_for(headers=bearer(make_token(mixed_jwks_keys))), downstream())
    assert response.status == status
    if status == 401:
        assert response.json()["error"]["code"] == "unauthorized"
        assert failures == ["invalid_token"]


@pytest.mark.parametrize(("content", "words"), [
    pytest.param(lambda k: {"keys": [k["jwks"]["keys"][1]]}, "no RS256 signing key",
                 id="only-an-ec-key"),
    pytest.param(lambda k: {"keys": [{**k["jwks"]["keys"][0], "use": "enc"}]},
                 "no RS256 signing key", id="only-an-encryption-key"),
    pytest.param(lambda k: {"keys": "nope"}, "JWK", id="not-a-key-set"),
    pytest.param(lambda k: "not json", "cannot use it", id="not-json"),
])
def test_an_unusable_jwks_file_is_a_config_error(tmp_path: Path, mixed_jwks_keys, content,
                                                 words) -> None:
    path = tmp_path / "jwks.json"
    value = content(mixed_jwks_keys)
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(ConfigError, match=r"inbound_auth\.jwt\.jwks_file") as info:
        make_auth({"mode": "jwt", "jwt": {"algorithm": "RS256", "jwks_file": str(path),
                                          "audience": "flowgate"}})
    assert words in str(info.value)


def test_a_public_key_of_another_type_is_a_401(tmp_path: Path, mixed_jwks_keys, request_for,
                                               downstream) -> None:
    pem = tmp_path / "ec.pem"
    pem.write_bytes(mixed_jwks_keys["ec"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    auth, failures = make_auth({"mode": "jwt", "jwt": {"algorithm": "RS256",
                                                       "public_key_file": str(pem),
                                                       "audience": "flowgate"}})
    response = auth(request_for(headers=bearer(rs_token(mixed_jwks_keys["rsa"], good_claims()))),
                    downstream())
    assert response.status == 401 and failures == ["invalid_token"]


def test_the_run_lookup_is_made_as_the_caller(request_for, downstream) -> None:
    """Watching a run: its flow is looked up with the caller's identity (and so its
    tenant) on the request, or the engine could not tell whose run it is."""
    auth, _ = api_key_auth()
    seen: list[Any] = []
    request = request_for(None, route="/runs/<id>/events",
                          headers={"x-api-key": "faq-only-secret"})
    request.ctx["flow_of_run"] = lambda: seen.append(request.ctx.get("identity")) or "faq"
    assert auth(request, downstream()).status == 200
    assert [i.name for i in seen] == ["faq-app"]


@pytest.mark.parametrize(("settings", "headers", "name"), [
    pytest.param({"mode": "api_keys", "api_keys": KEYS}, {"x-api-key": "orders-secret-1"},
                 "orders-app", id="api-key"),
    pytest.param({"mode": "api_keys", "api_keys": KEYS}, {"x-api-key": "wrong-secret-9"}, None,
                 id="wrong-api-key"),
    pytest.param({"mode": "api_keys", "api_keys": KEYS}, {}, None, id="no-credentials"),
    pytest.param(HS, {"Authorization": "Bearer not-a-jwt"}, None, id="bad-jwt"),
    pytest.param({"mode": "none"}, {"x-api-key": "orders-secret-1"}, None, id="mode-none"),
])
def test_identify_counts_nothing(request_for, settings, headers, name) -> None:
    auth, failures = make_auth(settings)
    identity = auth.identify(request_for(headers=headers))
    assert (identity.name if identity else None) == name
    assert failures == []


def test_a_jwt_identity_knows_when_it_expires(request_for, downstream) -> None:
    auth, _ = make_auth({**HS, "jwt": {**HS["jwt"], "leeway_s": 5}})
    claims = good_claims()
    down = downstream()
    auth(request_for(headers=bearer(hs_token(claims))), down)
    assert down.calls[0].ctx["identity"].expires_at == claims["exp"] + 5
