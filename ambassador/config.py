"""Ambassador settings: one YAML file (``AMBASSADOR_CONFIG``), then environment overrides.

Validated at start with messages that name the bad key (``retry.max_attempts: ...``).
``ConfigHolder`` re-reads the file when it changes and keeps the last good config when the
new one is invalid (the error is logged and counted), so a bad edit never takes a sidecar
down. Example (every key optional)::

    upstream:
      url: http://flow-engine:8000
      key: ${from AMBASSADOR_UPSTREAM_KEY}
      timeouts: {connect_s: 1, per_try_s: 60, total_s: 120, stream_first_byte_s: 30,
                 stream_idle_s: 60}
    inbound_auth:
      mode: api_keys            # none | api_keys | jwt
      api_keys:
        - {key: "app-secret", identity: orders-app, tenant: shop, flows: [faq-rag]}
      # jwt: {algorithm: RS256, jwks_file: /etc/idp/jwks.json, audience: flowgate,
      #       missing_flows_claim: none}
    websocket:
      allowed_origins: ["https://app.example.com"]   # besides the same origin
    filters: [trace, auth, cache, breaker, retry, timeout]
    retry: {max_attempts: 3, budget_ratio: 0.2}
    breaker: {consecutive_failures: 5, open_s: 10, backoff_base_s: 0.5,
              readiness_path: /readyz, probe_interval_s: 0.5, probe_timeout_s: 1}
    cache: {max_entries: 10000, max_bytes: 67108864, max_body_bytes: 1000000}
    redis_pause_s: 5            # after a Redis failure, local fallbacks this long
    redis_timeout_s: 0.5        # a Redis call that takes longer fails (a hung Redis)
    routing_check_s: 2          # the cache re-reads a flow's routing this often
    flows:
      faq-rag: {cache: {ttl_s: 300, stale_if_error_s: 3600}}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flowgate.common import jsonlog

# outermost first; ``fault`` is innermost (just before the upstream): an injected abort is
# seen by retry, breaker and fallback as an engine answer, an injected delay counts against
# the timeouts (ambassador/filters/fault.py)
FILTERS = ("trace", "auth", "ratelimit", "fallback", "cache", "breaker", "retry", "timeout",
           "fault")
DEFAULT_FILTERS = list(FILTERS)


class ConfigError(ValueError):
    """The configuration is invalid; the message names each bad key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Model):
    connect_s: float = Field(1.0, gt=0, le=60)
    per_try_s: float = Field(60.0, gt=0, le=3600)
    total_s: float = Field(120.0, gt=0, le=3600)
    stream_first_byte_s: float = Field(30.0, gt=0, le=3600)
    stream_idle_s: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _order(self):
        if self.per_try_s > self.total_s:
            raise ValueError("per_try_s must not exceed total_s")
        return self


class Upstream(_Model):
    url: str = "http://127.0.0.1:8000"
    key: str | None = None
    key_file: str | None = None
    pool_size: int = Field(64, ge=1, le=10_000)
    # below the engine's keep-alive (FLOW_ENGINE_KEEPALIVE, 5 s): never reuse a connection
    # the engine may have closed
    max_idle_s: float = Field(3.0, gt=0, le=3600)
    timeouts: Timeouts = Timeouts()

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return url.rstrip("/")


# identities and tenants travel upstream as header values: printable ASCII, no spaces
NAME_PATTERN = r"^[\x21-\x7e]{1,200}$"


class ApiKey(_Model):
    key: str = Field(min_length=8)
    identity: str = Field(pattern=NAME_PATTERN)
    tenant: str | None = Field(None, pattern=NAME_PATTERN)
    flows: list[str] | None = None  # None: every flow
    # may this caller ask for a fault with the X-Flowgate-Fault header (drills)?
    allow_fault_header: bool = False


class Jwt(_Model):
    algorithm: Literal["HS256", "RS256"] = "HS256"
    secret: str | None = None
    secret_file: str | None = None
    public_key_file: str | None = None
    jwks_file: str | None = None
    issuer: str | None = None
    audience: str | None = Field(None, validate_default=True)
    leeway_s: float = Field(30.0, ge=0, le=300)
    identity_claim: str = "sub"
    tenant_claim: str = "tenant"
    flows_claim: str = "flows"
    # a token without the flows claim may run: no flow (none), or every flow (all)
    missing_flows_claim: Literal["none", "all"] = "none"
    # identities (the identity claim's value) that may send the X-Flowgate-Fault header
    fault_header_identities: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = []

    @field_validator("audience")
    @classmethod
    def _audience(cls, audience: str | None) -> str:
        if not audience:
            raise ValueError(
                "required in jwt mode: the 'aud' that tokens for this ambassador carry (without "
                "it, a token the identity provider minted for any other service would do)")
        return audience

    @model_validator(mode="after")
    def _key(self):
        if self.algorithm == "HS256" and not (self.secret or self.secret_file):
            raise ValueError("HS256 needs secret or secret_file")
        if self.algorithm == "RS256" and not (self.public_key_file or self.jwks_file):
            raise ValueError("RS256 needs public_key_file or jwks_file")
        return self


class InboundAuth(_Model):
    mode: Literal["none", "api_keys", "jwt"] = "none"
    api_keys: list[ApiKey] = []
    jwt: Jwt | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.mode == "api_keys" and not self.api_keys:
            raise ValueError("mode api_keys needs at least one entry in api_keys")
        if self.mode == "jwt" and self.jwt is None:
            raise ValueError("mode jwt needs a jwt section")
        # the fault filter knows a caller by its identity only, not by the key it sent
        allowed: dict[str, bool] = {}
        for key in self.api_keys:
            if allowed.setdefault(key.identity, key.allow_fault_header) != key.allow_fault_header:
                raise ValueError(f"api_keys: the keys of identity '{key.identity}' must agree "
                                 "on allow_fault_header")
        return self


class Retry(_Model):
    max_attempts: int = Field(3, ge=1, le=10)
    backoff_base_s: float = Field(0.05, gt=0, le=10)
    backoff_max_s: float = Field(2.0, gt=0, le=60)
    budget_ratio: float = Field(0.2, ge=0, le=1)
    budget_min_per_s: float = Field(1.0, ge=0, le=1000)
    budget_window_s: float = Field(10.0, gt=0, le=3600)
    add_idempotency_key: bool = True


class Breaker(_Model):
    consecutive_failures: int = Field(5, ge=1, le=1000)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    window_s: float = Field(30.0, gt=0, le=3600)
    min_requests: int = Field(20, ge=1, le=100_000)
    # the longest wait between trials; the first is backoff_base_s after opening, doubling
    # after each failed trial (ambassador/filters/breaker.py)
    open_s: float = Field(10.0, gt=0, le=3600)
    backoff_base_s: float = Field(0.5, gt=0, le=3600)
    half_open_max: int = Field(2, ge=1, le=1000)
    # while open, the engine's readiness is asked at most every probe_interval_s, and a
    # trial goes out only once it answers 200; null: trials without asking
    readiness_path: str | None = Field("/readyz", pattern=r"^/[\x21-\x7e]*$")
    probe_interval_s: float = Field(0.5, ge=0, le=3600)
    probe_timeout_s: float = Field(1.0, gt=0, le=60)


class RateLimit(_Model):
    requests_per_s: float = Field(gt=0, le=1_000_000)
    burst: int = Field(ge=1, le=1_000_000)


class FlowCache(_Model):
    ttl_s: float = Field(gt=0, le=30 * 86400)
    session_in_key: bool = False
    stale_if_error_s: float = Field(0, ge=0, le=30 * 86400)


FAULT_MAX_DELAY_MS = 60_000  # an injected delay (config or X-Flowgate-Fault) is at most this
FAULT_STATUSES = range(400, 600)  # an injected abort's status: a 4xx/5xx an engine could answer


class FaultDelay(_Model):
    percent: float = Field(ge=0, le=100, strict=True)  # of this flow's attempts (each draws anew)
    ms: int = Field(ge=0, le=FAULT_MAX_DELAY_MS, strict=True)


class FaultAbort(_Model):
    percent: float = Field(ge=0, le=100, strict=True)
    status: int = Field(ge=FAULT_STATUSES.start, lt=FAULT_STATUSES.stop, strict=True)


class FlowFault(_Model):
    """Fault drills for one flow (ambassador/filters/fault.py): off unless configured."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class FlowPolicy(_Model):
    cache: FlowCache | None = None
    ratelimit: RateLimit | None = None
    fallback: dict[str, Any] | None = None  # answered (200, X-Fallback: true) when upstream fails
    fault: FlowFault | None = None  # injected delays and aborts (drills)


class Cache(_Model):
    # the in-process cache (and Redis's local fallback) is bounded by both
    max_entries: int = Field(10_000, ge=1, le=10_000_000)
    max_bytes: int = Field(64 * 1_048_576, ge=1024)
    max_body_bytes: int = Field(1_000_000, ge=1)


class WebSocket(_Model):
    # Origins (scheme://host[:port]) whose pages may open WS /ws/run-flow, besides the
    # ambassador's own origin; a request without Origin (not a browser) is always allowed.
    allowed_origins: list[str] = []

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        from ambassador.origin import normalize

        out = []
        for origin in origins:
            normal = normalize(origin)
            if normal is None:
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com[:port]")
            out.append(normal)
        return out


class Settings(_Model):
    upstream: Upstream = Upstream()
    inbound_auth: InboundAuth = InboundAuth()
    websocket: WebSocket = WebSocket()
    filters: list[str] = DEFAULT_FILTERS
    retry: Retry = Retry()
    breaker: Breaker = Breaker()
    cache: Cache = Cache()
    ratelimit: RateLimit | None = None  # per identity, for every flow
    flows: dict[str, FlowPolicy] = {}
    redis_url: str | None = None
    # with inbound_auth none: Host names answered besides loopback ones (ambassador/host_guard.py)
    allowed_hosts: list[str] = []
    # after a Redis failure, Redis is left alone this long (local fallbacks meanwhile)
    redis_pause_s: float = Field(5.0, gt=0, le=3600)
    # a Redis call (connect or command) taking longer fails: what a hung Redis costs a request
    redis_timeout_s: float = Field(0.5, gt=0, le=30)
    # the cache's view of a flow's routing is re-read this often (with the engine's Redis, a
    # change also drops it at once): how long, without Redis, a publish may go unseen
    routing_check_s: float = Field(2.0, ge=0.1, le=60)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=100 * 1_048_576)
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        return jsonlog.level_name(value)

    @field_validator("filters")
    @classmethod
    def _filters(cls, filters: list[str]) -> list[str]:
        unknown = [f for f in filters if f not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; known: {list(FILTERS)}")
        if len(set(filters)) != len(filters):
            raise ValueError("a filter is listed twice")
        return filters

    @model_validator(mode="after")
    def _fault_filter(self):
        if "fault" in self.filters and self.filters[-1] != "fault":
            raise ValueError("filters: 'fault' must be the last (innermost) filter, so retry, "
                             "breaker and fallback see an injected abort as an engine answer")
        faulty = sorted(flow for flow, policy in self.flows.items() if policy.fault is not None)
        if faulty and "fault" not in self.filters:
            raise ValueError(f"flows {faulty} configure a fault, but 'fault' is not in filters "
                             "(it goes last: ..., retry, timeout, fault)")
        return self

    def upstream_key(self) -> str | None:
        if self.upstream.key:
            return self.upstream.key
        if self.upstream.key_file:
            return Path(self.upstream.key_file).read_text(encoding="utf-8").strip() or None
        return None


_ENV = {
    "AMBASSADOR_UPSTREAM_URL": ("upstream", "url"),
    "AMBASSADOR_UPSTREAM_KEY": ("upstream", "key"),
    "REDIS_URL": ("redis_url",),
    "AMBASSADOR_LOG_LEVEL": ("log_level",),
}


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read the YAML file (if any), apply env overrides, then ``overrides``; validate."""
    env = os.environ if environ is None else environ
    path = path if path is not None else env.get("AMBASSADOR_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for name, where in _ENV.items():
        value = env.get(name)
        if value:
            _set(data, where, value)
    for dotted, value in (overrides or {}).items():
        _set(data, tuple(dotted.split(".")), value)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _set(data: dict[str, Any], where: tuple[str, ...], value: Any) -> None:
    node = data
    for depth, part in enumerate(where[:-1]):
        child = node.get(part)
        if child is None:  # missing, or an empty YAML section
            child = node[part] = {}
        elif not isinstance(child, dict):
            key = ".".join(where[: depth + 1])
            raise ConfigError(f"invalid ambassador config:\n  {key}: must be a mapping, "
                              f"got {type(child).__name__} (cannot set {'.'.join(where)})")
        node = child
    node[where[-1]] = value


def _describe(exc: ValidationError, path: Any) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    where = f" in {path}" if path else ""
    return f"invalid ambassador config{where}:\n" + "\n".join(lines)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where — never the offending line itself: PyYAML quotes it, and in
    this file it may hold an API key (the message is logged and shown by /readyz)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or type(exc).__name__}{where}"


# the reload (ambassador/reload.py), kept importable from here
from ambassador.reload import REFUSE_NO_AUTH_ENV, ConfigHolder, refuse_no_auth  # noqa: E402

__all__ = ["REFUSE_NO_AUTH_ENV", "ConfigError", "ConfigHolder", "Settings", "load",
           "refuse_no_auth"]
