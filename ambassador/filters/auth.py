"""Inbound auth: who is calling, and may they run this flow?

Modes: ``none`` (the sidecar listens on loopback only), ``api_keys`` (``Authorization:
Bearer <key>`` or ``x-api-key``, compared in constant time) and ``jwt`` (HS256 with a shared
secret, or RS256 with a public key or a JWKS file). JWTs must carry ``exp`` and the
configured ``aud`` (required: without it a token the identity provider minted for any
other service would do); ``nbf`` and ``iss`` are checked when present or configured, with
``leeway_s`` of clock skew. Only the configured algorithm is accepted, so ``alg: none`` and
HS256-signed-with-the-public-key (algorithm confusion) are rejected, and a JWKS key is used
only for the algorithm it is for; any problem with a token or a key is a 401, never a 500.
An identity may be limited to a list of flow ids (403 for others, and for watching the
runs of others: ``GET /runs/{id}/events`` looks up the run's flow first, as the caller);
a token without the flows claim may run no flow unless ``missing_flows_claim: all``. The
identity and tenant travel upstream as ``X-Flowgate-Identity`` / ``X-Flowgate-Tenant``
(so they must be printable ASCII; a token whose tenant claim is not is refused rather
than sent tenant-less); the credentials themselves never do.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from ambassador.chain import Handler, Request, Response, error_response
from ambassador.config import ConfigError, InboundAuth
from flowgate.common.credentials import bearer_token, presented_key

log = logging.getLogger(__name__)
_NAME = re.compile(r"[\x21-\x7e]{1,200}")


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Identity:
    name: str
    tenant: str | None = None
    flows: frozenset[str] | None = None  # None: any flow
    # when the credential stops being valid (a JWT's exp + leeway); None: never by itself
    expires_at: float | None = field(default=None, compare=False)

    def may_run(self, flow_id: str | None) -> bool:
        return self.flows is None or flow_id is None or flow_id in self.flows


@dataclass(frozen=True)
class _Refused:
    reason: str  # the auth_failures label
    message: str


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
        self._jwks: list[jwt.PyJWK] | None = None
        if settings.mode == "jwt":
            self._load_jwt_keys()

    def _load_jwt_keys(self) -> None:
        """Read the key files now: a bad one is a config error (at start, or a refused
        reload), never a failure on some later request."""
        cfg = self.settings.jwt
        try:
            if cfg.algorithm == "HS256":
                self._jwt_key = cfg.secret or Path(cfg.secret_file).read_text(encoding="utf-8").strip()
            elif cfg.jwks_file:
                keys = jwt.PyJWKSet.from_dict(json.loads(Path(cfg.jwks_file).read_text())).keys
                # a key is only ever used for its own algorithm (an EC or oct key in the set
                # must not meet an RS256 token)
                self._jwks = [k for k in keys if k.algorithm_name == cfg.algorithm
                              and k.public_key_use in (None, "sig")]
                if not self._jwks:
                    raise ValueError(f"it holds no {cfg.algorithm} signing key")
            else:
                self._jwt_key = Path(cfg.public_key_file).read_text(encoding="utf-8")
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            name = ("secret_file" if cfg.algorithm == "HS256" else
                    "jwks_file" if cfg.jwks_file else "public_key_file")
            raise ConfigError(f"inbound_auth.jwt.{name}: cannot use it ({exc})") from None

    def __call__(self, request: Request, next: Handler) -> Response:
        if self.settings.mode == "none":
            return next(request)
        identity = self._authenticate(request)
        if isinstance(identity, _Refused):
            self._on_failure(identity.reason)
            return error_response(401, "unauthorized", identity.message, request,
                                  headers={"WWW-Authenticate": "Bearer"})
        # set first: looking up a watched run's flow is done as this caller (its tenant)
        request.ctx["identity"] = identity
        flow_id = request.flow_id
        if flow_id is None and identity.flows is not None and "flow_of_run" in request.ctx:
            flow_id = request.ctx["flow_of_run"]()  # watching a run: whose flow is it?
            if flow_id is None:
                return error_response(404, "run_not_found", "no such run", request)
        if not identity.may_run(flow_id):
            self._on_failure("flow_not_allowed")
            return error_response(403, "forbidden",
                                  f"'{identity.name}' may not run flow '{flow_id}'", request)
        return next(request)

    def identify(self, request: Request) -> Identity | None:
        """The caller's identity when its credentials are valid (nothing is counted or
        refused); None in mode none or without valid credentials."""
        if self.settings.mode == "none":
            return None
        identity = self._authenticate(request)
        return identity if isinstance(identity, Identity) else None

    def _authenticate(self, request: Request) -> Identity | _Refused:
        if self.settings.mode == "api_keys":
            return self._api_key(request)
        return self._jwt(request)

    def _api_key(self, request: Request) -> Identity | _Refused:
        presented = presented_key(request.header("x-api-key"), request.header("authorization"))
        if not presented:
            return _Refused("missing", "missing credentials: send 'Authorization: Bearer <key>' "
                            "or 'x-api-key: <key>'")
        candidate = presented.encode()
        found: Identity | None = None
        for key, identity in self._keys:  # no early exit: timing does not reveal the match
            if hmac.compare_digest(candidate, key):
                found = identity
        return found if found is not None else _Refused("invalid_key", "invalid API key")

    def _jwt(self, request: Request) -> Identity | _Refused:
        token = bearer_token(request.header("authorization"))
        if not token:
            return _Refused("missing", "missing credentials: send 'Authorization: Bearer <jwt>'")
        cfg = self.settings.jwt
        claims = self._verified_claims(token)
        if isinstance(claims, _Refused):
            return claims
        now = self._clock()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not _is_time(exp) or (nbf is not None and not _is_time(nbf)):
            return _Refused("invalid_token", "exp and nbf must be numeric dates")
        if now > exp + cfg.leeway_s:
            return _Refused("expired", "the token has expired")
        if nbf is not None and now < nbf - cfg.leeway_s:
            return _Refused("not_yet_valid", "the token is not valid yet (nbf)")
        name = claims.get(cfg.identity_claim)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            return _Refused("invalid_token", f"the token's '{cfg.identity_claim}' claim must be "
                            "1-200 printable ASCII characters")
        tenant = claims.get(cfg.tenant_claim)
        if tenant is not None and (not isinstance(tenant, str) or not _NAME.fullmatch(tenant)):
            # fail closed: an unusable tenant must never mean "no tenant"
            return _Refused("invalid_token", f"the token's '{cfg.tenant_claim}' claim must be "
                            "1-200 printable ASCII characters")
        flows = claims.get(cfg.flows_claim)
        if flows is None:
            flows = None if cfg.missing_flows_claim == "all" else []
        elif not (isinstance(flows, list) and all(isinstance(f, str) for f in flows)):
            # fail closed: a malformed allowlist must never mean "every flow"
            return _Refused("invalid_token", f"the '{cfg.flows_claim}' claim must be a list of flow ids")
        return Identity(name, tenant, frozenset(flows) if flows is not None else None,
                        expires_at=exp + cfg.leeway_s)

    def _verified_claims(self, token: str) -> dict[str, Any] | _Refused:
        """The claims of a token whose signature, algorithm, aud and iss check out."""
        cfg = self.settings.jwt
        try:
            keys = [self._jwt_key] if self._jwks is None else self._jwks_candidates(token)
            if not keys:
                return _Refused("invalid_token", "unknown key id in the token")
            failure: jwt.InvalidTokenError | None = None
            for key in keys:  # several only without a kid: the first that verifies
                try:
                    # exp and nbf are checked by the caller, against the injected clock
                    return jwt.decode(
                        token, key, algorithms=[cfg.algorithm], audience=cfg.audience,
                        issuer=cfg.issuer, options={"require": ["exp"], "verify_exp": False,
                                                    "verify_nbf": False})
                except jwt.InvalidSignatureError as exc:
                    failure = exc
            assert failure is not None
            raise failure
        except jwt.InvalidTokenError as exc:
            return _Refused("invalid_token", f"invalid token: {exc}")
        except Exception as exc:  # a key problem (wrong type, bad parameters): still the token's 401
            log.warning("JWT verification failed on a key problem",
                        extra={"error": f"{type(exc).__name__}: {exc}"})
            return _Refused("invalid_token", "invalid token: it cannot be verified with the "
                            "configured keys")

    def _jwks_candidates(self, token: str) -> list[Any]:
        """The JWKS keys a token may be signed with: the one its ``kid`` names, or every
        key of the configured algorithm when it names none."""
        kid = jwt.get_unverified_header(token).get("kid")
        assert self._jwks is not None
        return [k.key for k in self._jwks if kid is None or k.key_id == kid]
