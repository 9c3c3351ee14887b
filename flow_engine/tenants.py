"""Per-tenant limits, so that one tenant cannot starve the others: concurrent runs and LLM
tokens per minute. A run over a limit is refused before it starts with 429 ``tenant_limit``
and ``Retry-After``.

Settings (0 = unlimited)::

    FLOW_ENGINE_TENANT_MAX_RUNS=20                 every tenant: runs in progress at once
    FLOW_ENGINE_TENANT_TOKENS_PER_MINUTE=200000    every tenant: LLM tokens (in + out) a minute
    FLOW_ENGINE_TENANT_LIMITS='{"orders-app": {"max_runs": 50, "tokens_per_minute": 0}}'

A proxy's callers are tenants ``<key name>/<tenant>``, or ``<key name>~<identity>`` when
the proxy forwards no tenant (flow_engine/auth.py): the default quota applies to each. A
proxy could escape that by inventing a tenant name per request, so each proxy key may also
have a cap on all of its tenants together (the key's own tenant included)::

    FLOW_ENGINE_PROXY_MAX_RUNS=200                 every proxy key: runs of all its tenants
    FLOW_ENGINE_PROXY_TOKENS_PER_MINUTE=2000000    every proxy key: tokens of all its tenants

and an override named after the proxy key itself (``{"orders-app": {"max_runs": 50}}``)
replaces that cap for that key. Both are off (0) unless set: how much one app may use is the
operator's call, and a cap on by default would refuse an app that fronts many tenants.

Tenants named in ``FLOW_ENGINE_TENANT_LIMITS`` and the names of the engine's keys are the
*known* tenants: metrics carry their names, a proxy's unnamed tenants count under the proxy
key's name, any other as ``other`` — so forwarded names cannot grow the metrics.

Counting. Concurrent runs are leases: with ``REDIS_URL`` a sorted set per tenant
(``flowgate:tenant:<t>:runs``, member = run id, score = lease expiry in Redis server time)
shared by every worker and replica; a lease lasts ``LEASE_S`` and the engine's heartbeat
renews the leases of its running runs, so a killed process frees its tenant's slots within
``LEASE_S``. Tokens are counted when a run ends, in a fixed one-minute window
(``flowgate:tenant:<t>:tokens:<minute>``); a run is refused while the current window is
at or over the limit (a run started under the limit may take it over: token counts are
known only at the end). Without Redis — or while it fails, for ``PAUSE_S`` after each
failure — each process counts alone (each worker then allows the full limit).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flow_engine.auth import proxy_of
from flow_engine.errors import TenantLimited
from flowgate.common.redis_guard import RedisPause

log = logging.getLogger(__name__)
LEASE_S = 60.0
PAUSE_S = 5.0
OTHER = "other"

# KEYS[1] the tenant's lease set; ARGV: lease_ms, limit, run id. 1 = admitted.
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""
# KEYS[1] a lease set: the leases not yet expired.
_COUNT = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t[1] * 1000 + math.floor(t[2] / 1000))
return redis.call('ZCARD', KEYS[1])
"""
# KEYS: lease sets; ARGV[1] lease_ms, then one run id per key. Renews existing leases only.
_RENEW = """
local t = redis.call('TIME')
local until_ms = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', until_ms, ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return 1
"""


@dataclass(frozen=True)
class Quota:
    max_runs: int = 0  # 0: unlimited
    tokens_per_minute: int = 0


class TenantPolicy:
    """Each tenant's quota and its metric label."""

    def __init__(self, default: Quota, overrides: dict[str, Quota],
                 known: Iterable[str] = (), proxy: Quota = Quota()) -> None:
        self.default = default
        self.overrides = dict(overrides)
        self.known = frozenset(overrides) | frozenset(known)
        self.proxy = proxy  # every proxy key's cap on all its tenants together

    @classmethod
    def parse(cls, max_runs: int, tokens_per_minute: int, overrides_json: str,
              known: Iterable[str] = (), proxy: Quota = Quota()) -> TenantPolicy:
        """From the settings; ValueError naming FLOW_ENGINE_TENANT_LIMITS when malformed."""
        default = Quota(max_runs, tokens_per_minute)
        overrides: dict[str, Quota] = {}
        if overrides_json.strip():
            try:
                raw = json.loads(overrides_json)
            except ValueError as exc:
                raise ValueError(f"FLOW_ENGINE_TENANT_LIMITS is not JSON: {exc}") from None
            if not isinstance(raw, dict):
                raise ValueError('FLOW_ENGINE_TENANT_LIMITS must be a JSON object like '
                                 '{"orders-app": {"max_runs": 20, "tokens_per_minute": 100000}}')
            for tenant, spec in raw.items():
                overrides[tenant] = _quota(tenant, spec, default)
        return cls(default, overrides, known, proxy)

    def quota(self, tenant: str) -> Quota:
        return self.overrides.get(tenant, self.default)

    def label(self, tenant: str) -> str:
        if tenant in self.known:
            return tenant
        group = proxy_of(tenant)
        return group if group in self.known else OTHER

    def group_quota(self, group: str | None) -> Quota | None:
        """The limit on all tenants of a proxy key together: its override by name, else the
        cap of every proxy key; None when neither is configured."""
        if not group:
            return None
        if group in self.overrides:
            return self.overrides[group]
        return self.proxy if self.proxy.max_runs or self.proxy.tokens_per_minute else None

    @property
    def limited(self) -> bool:
        quotas = [self.default, self.proxy, *self.overrides.values()]
        return any(q.max_runs or q.tokens_per_minute for q in quotas)


def _quota(tenant: str, spec: Any, default: Quota) -> Quota:
    where = f"FLOW_ENGINE_TENANT_LIMITS[{tenant!r}]"
    if not isinstance(spec, dict) or set(spec) - {"max_runs", "tokens_per_minute"}:
        raise ValueError(f'{where} must be {{"max_runs": N, "tokens_per_minute": N}}')
    values = {}
    for name in ("max_runs", "tokens_per_minute"):
        value = spec.get(name, getattr(default, name))
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}.{name} must be a non-negative integer (0 = unlimited)")
        values[name] = value
    return Quota(**values)


class TenantLimits:
    """Admission for runs (see the module docstring). ``redis`` is optional."""

    def __init__(self, policy: TenantPolicy, redis: Any | None = None, *,
                 prefix: str = "flowgate:", on_error: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time, pause: RedisPause | None = None
                 ) -> None:
        self.policy = policy
        self.redis = redis
        self.prefix = prefix
        self._on_error = on_error or (lambda op: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._local_runs: dict[str, set[str]] = {}
        self._local_tokens: dict[tuple[str, int], int] = {}
        # run id → the scopes (tenant, proxy key) it holds a slot in, and whether in Redis
        self._holds: dict[str, list[tuple[str, bool]]] = {}
        # after a Redis failure, count in this process for PAUSE_S
        self._pause = pause if pause is not None else RedisPause(PAUSE_S)
        if redis is not None:
            self._acquire = redis.register_script(_ACQUIRE)
            self._renew = redis.register_script(_RENEW)
            self._count = redis.register_script(_COUNT)

    # -- runs ---------------------------------------------------------------------------------

    def _scopes(self, tenant: str, group: str | None) -> list[tuple[str, Quota, str]]:
        """(count, quota, who for messages): the tenant's own, and its proxy key's when one
        is configured for it. A proxy key's own tenant (it forwards no caller) is the proxy
        itself, counted where all its tenants are (one name) and held to the proxy's cap:
        a tighter limit would buy nothing, as the proxy could invent a tenant instead."""
        group_quota = self.policy.group_quota(group)
        who = f"tenant '{tenant}'"
        if group_quota is None:
            return [(tenant, self.policy.quota(tenant), who)]
        together = f"proxy key '{group}' (all its tenants together)"
        if group == tenant:
            return [(tenant, group_quota, together)]
        return [(tenant, self.policy.quota(tenant), who), (group, group_quota, together)]

    def check(self, tenant: str, group: str | None = None) -> None:
        """Raise TenantLimited when a run of ``tenant`` would be refused now (nothing is
        taken): lets a request be turned away before anything costly is done for it."""
        for scope, quota, who in self._scopes(tenant, group):
            self._check_tokens(scope, quota, who)
            if quota.max_runs and self._running(scope) >= quota.max_runs:
                raise _runs_limited(who, quota)

    def admit(self, tenant: str, run_id: str, group: str | None = None) -> None:
        """Take a run slot for ``run_id`` (in the tenant's and, when configured, its proxy
        key's count) or raise TenantLimited; release() gives them back."""
        scopes = self._scopes(tenant, group)
        for scope, quota, who in scopes:
            self._check_tokens(scope, quota, who)
        taken: list[tuple[str, bool]] = []
        try:
            for scope, quota, who in scopes:
                if quota.max_runs:
                    taken.append((scope, self._take(scope, run_id, quota, who)))
        except TenantLimited:
            self._give_back(run_id, taken)
            raise
        if taken:
            with self._lock:
                self._holds[run_id] = taken

    def release(self, run_id: str) -> None:
        with self._lock:
            taken = self._holds.pop(run_id, [])
        self._give_back(run_id, taken)

    def renew(self) -> None:
        """Extend the Redis leases of this process's running runs (the heartbeat calls it)."""
        with self._lock:
            leases = [(run_id, scope) for run_id, taken in self._holds.items()
                      for scope, shared in taken if shared]
        if not leases or not self._redis_usable():
            return
        try:
            self._renew(keys=[self._runs_key(scope) for _r, scope in leases],
                        args=[int(LEASE_S * 1000), *(r for r, _s in leases)])
        except Exception as exc:
            self._failed("renew", exc)

    def _take(self, scope: str, run_id: str, quota: Quota, who: str) -> bool:
        """A slot in ``scope``; True when it is a Redis lease, False a local one."""
        if self._redis_usable():
            try:
                admitted = bool(self._acquire(keys=[self._runs_key(scope)],
                                              args=[int(LEASE_S * 1000), quota.max_runs, run_id]))
            except Exception as exc:
                self._failed("admit", exc)
            else:
                if not admitted:
                    raise _runs_limited(who, quota)
                return True
        with self._lock:  # no Redis, or Redis failing: this process counts alone
            running = self._local_runs.setdefault(scope, set())
            if len(running) >= quota.max_runs:
                raise _runs_limited(who, quota)
            running.add(run_id)
        return False

    def _give_back(self, run_id: str, taken: list[tuple[str, bool]]) -> None:
        for scope, shared in taken:
            if not shared:
                with self._lock:
                    running = self._local_runs.get(scope)
                    if running is not None:
                        running.discard(run_id)
                        if not running:
                            del self._local_runs[scope]
            elif self._redis_usable():
                try:
                    self.redis.zrem(self._runs_key(scope), run_id)
                except Exception as exc:  # the lease expires by itself within LEASE_S
                    self._failed("release", exc)

    def _running(self, scope: str) -> int:
        if self._redis_usable():
            try:
                return int(self._count(keys=[self._runs_key(scope)]))
            except Exception as exc:
                self._failed("count", exc)
        with self._lock:
            return len(self._local_runs.get(scope, ()))

    # -- tokens -------------------------------------------------------------------------------

    def add_tokens(self, tenant: str, tokens: int, group: str | None = None) -> None:
        for scope, quota, _who in self._scopes(tenant, group):
            if tokens > 0 and quota.tokens_per_minute:
                self._add_tokens(scope, tokens)

    def _check_tokens(self, scope: str, quota: Quota, who: str) -> None:
        if not quota.tokens_per_minute:
            return
        used = self._tokens_used(scope)
        if used >= quota.tokens_per_minute:
            wait = 60 - int(self._clock()) % 60
            raise TenantLimited(
                f"{who} used {used} of its {quota.tokens_per_minute} LLM tokens "
                f"this minute; retry in {wait} s", retry_after_s=wait, limit="tokens")

    def _add_tokens(self, tenant: str, tokens: int) -> None:
        minute = int(self._clock() // 60)
        if self._redis_usable():
            try:
                pipe = self.redis.pipeline(transaction=False)
                key = self._tokens_key(tenant, minute)
                pipe.incrby(key, tokens)
                pipe.expire(key, 120)
                pipe.execute()
                return
            except Exception as exc:
                self._failed("tokens", exc)
        with self._lock:
            for stale in [k for k in self._local_tokens if k[1] < minute - 1]:
                del self._local_tokens[stale]
            self._local_tokens[(tenant, minute)] = self._local_tokens.get((tenant, minute), 0) + tokens

    def _tokens_used(self, tenant: str) -> int:
        minute = int(self._clock() // 60)
        if self._redis_usable():
            try:
                return int(self.redis.get(self._tokens_key(tenant, minute)) or 0)
            except Exception as exc:
                self._failed("tokens", exc)
        with self._lock:
            return self._local_tokens.get((tenant, minute), 0)

    # -- plumbing -----------------------------------------------------------------------------

    def _runs_key(self, tenant: str) -> str:
        return f"{self.prefix}tenant:{tenant}:runs"

    def _tokens_key(self, tenant: str, minute: int) -> str:
        return f"{self.prefix}tenant:{tenant}:tokens:{minute}"

    def _redis_usable(self) -> bool:
        return self.redis is not None and not self._pause.paused

    def _failed(self, op: str, exc: Exception) -> None:
        self._pause.failed()
        self._on_error("tenants")
        log.warning("tenant limits: Redis %s failed (%s); counting in this process for %.0f s",
                    op, type(exc).__name__, PAUSE_S)


def _runs_limited(who: str, quota: Quota) -> TenantLimited:
    return TenantLimited(
        f"{who} already has {quota.max_runs} runs in progress (its limit); retry "
        "when one has finished", retry_after_s=1, limit="runs")
