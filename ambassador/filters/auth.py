"""Inbound auth: who is calling, and may they run this flow?

Modes: ``none`` (the sidecar listens on loopback only), ``api_keys`` (``Authorization:
Bearer <key>`` or ``x-api-key``, compared in constant time) and ``jwt`` (HS256 with a shared
secret, or RS256 with a public key or a JWKS file). JWTs must carry ``exp``; ``nbf``, ``iss``
and ``aud`` are checked when present or configured, with ``leeway_s`` of clock skew. Only
the configured algorithm is accepted, so ``alg: none`` and HS256-signed-with-the-public-key
(algorithm confusion) are rejected. An identity may be limited to a list of flow ids (403
for others, and for watching the runs of others: ``GET /runs/{id}/events`` looks up the
run's flow first). The identity and tenant travel upstream as ``X-Flowgate-Identity`` /
``X-Flowgate-Tenant``; the credentials themselves never do.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from ambassador.chain import Handler, Request, Response, error_response
from ambassador.config import InboundAuth


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Identity:
    name: str
    tenant: str | None = None
    flows: frozenset[str] | None = None  # None: any flow

    def may_run(self, flow_id: str | None) -> bool:
        return self.flows is None or flow_id is None or flow_id in self.flows


class Auth:
    name = "auth"

    def __init__(self, settings: InboundAuth, *, on_failure: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._on_failure = on_failure or (lambda reason: None)
        self._clock = clock
        self._keys = [(k.key.encode(), Identity(k.identity, k.tenant,
                                                frozenset(k.flows) if k.flows is not None else None))
                      for k in settings.api_keys]
        self._jwt_key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        if settings.mode == "jwt":
            self._load_jwt_keys()

    def _load_jwt_keys(self) -> None:
        cfg = self.settings.jwt
        if cfg.algorithm == "HS256":
            self._jwt_key = cfg.secret or Path(cfg.secret_file).read_text(encoding="utf-8").strip()
        elif cfg.jwks_file:
            self._jwks = jwt.PyJWKSet.from_dict(json.loads(Path(cfg.jwks_file).read_text()))
        else:
            self._jwt_key = Path(cfg.public_key_file).read_text(encoding="utf-8")

    def __call__(self, request: Request, next: Handler) -> Response:
        mode = self.settings.mode
        if mode == "none":
            return next(request)
        identity = self._api_key(request) if mode == "api_keys" else self._jwt(request)
        if isinstance(identity, Response):
            return identity
        flow_id = request.flow_id
        if flow_id is None and identity.flows is not None and "flow_of_run" in request.ctx:
            flow_id = request.ctx["flow_of_run"]()  # watching a run: whose flow is it?
            if flow_id is None:
                return error_response(404, "run_not_found", "no such run", request)
        if not identity.may_run(flow_id):
            self._on_failure("flow_not_allowed")
            return error_response(403, "forbidden",
                                  f"'{identity.name}' may not run flow '{flow_id}'", request)
        request.ctx["identity"] = identity
        return next(request)

    def _credential(self, request: Request) -> str | None:
        key = (request.header("x-api-key") or "").strip()
        if key:
            return key
        auth = request.header("authorization") or ""
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip() or None
        return None

    def _refuse(self, request: Request, reason: str, message: str) -> Response:
        self._on_failure(reason)
        return error_response(401, "unauthorized", message, request,
                              headers={"WWW-Authenticate": "Bearer"})

    def _api_key(self, request: Request) -> Identity | Response:
        presented = self._credential(request)
        if not presented:
            return self._refuse(request, "missing", "missing credentials: send "
                                "'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        candidate = presented.encode()
        found: Identity | None = None
        for key, identity in self._keys:  # no early exit: timing does not reveal the match
            if hmac.compare_digest(candidate, key):
                found = identity
        return found if found is not None else self._refuse(request, "invalid_key", "invalid API key")

    def _jwt(self, request: Request) -> Identity | Response:
        auth = request.header("authorization") or ""
        if auth[:7].lower() != "bearer " or not auth[7:].strip():
            return self._refuse(request, "missing", "missing credentials: send 'Authorization: "
                                "Bearer <jwt>'")
        token = auth[7:].strip()
        cfg = self.settings.jwt
        try:
            key = self._jwt_key
            if self._jwks is not None:
                kid = jwt.get_unverified_header(token).get("kid")
                matches = [k for k in self._jwks.keys if kid is None or k.key_id == kid]
                if not matches:
                    return self._refuse(request, "invalid_token", "unknown key id in the token")
                key = matches[0].key
            # exp and nbf are checked below against the injected clock
            claims = jwt.decode(
                token, key, algorithms=[cfg.algorithm], audience=cfg.audience, issuer=cfg.issuer,
                options={"require": ["exp"], "verify_aud": cfg.audience is not None,
                         "verify_exp": False, "verify_nbf": False})
        except jwt.InvalidTokenError as exc:
            return self._refuse(request, "invalid_token", f"invalid token: {exc}")
        now = self._clock()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not _is_time(exp) or (nbf is not None and not _is_time(nbf)):
            return self._refuse(request, "invalid_token", "exp and nbf must be numeric dates")
        if now > exp + cfg.leeway_s:
            return self._refuse(request, "expired", "the token has expired")
        if nbf is not None and now < nbf - cfg.leeway_s:
            return self._refuse(request, "not_yet_valid", "the token is not valid yet (nbf)")
        name = claims.get(cfg.identity_claim)
        if not isinstance(name, str) or not name:
            return self._refuse(request, "invalid_token", f"the token has no '{cfg.identity_claim}' claim")
        flows = claims.get(cfg.flows_claim)
        if flows is not None and not (isinstance(flows, list)
                                      and all(isinstance(f, str) for f in flows)):
            # fail closed: a malformed allowlist must never mean "every flow"
            return self._refuse(request, "invalid_token",
                                f"the '{cfg.flows_claim}' claim must be a list of flow ids")
        tenant = claims.get(cfg.tenant_claim)
        return Identity(name, tenant if isinstance(tenant, str) else None,
                        frozenset(flows) if flows is not None else None)
