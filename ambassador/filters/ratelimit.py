"""Rate limits per caller identity (and per flow, where the config says so): token buckets
refilled at ``requests_per_s`` up to ``burst``. Over the limit → 429 ``rate_limited`` with
``Retry-After``. With ``REDIS_URL`` the buckets are shared by every ambassador of the same
identity (a Lua script updates one bucket atomically); if Redis fails, the local bucket
decides and a metric counts the fallback."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ambassador.chain import Handler, Request, Response, error_response
from ambassador.config import RateLimit as RateLimitSettings
from ambassador.config import Settings
from flowgate.common.redis_guard import RedisPause

# KEYS[1] bucket; ARGV: rate, burst, now (s), cost. Returns {allowed, wait_ms}.
_LUA = """
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 else wait = math.ceil((1 - tokens) / rate * 1000) end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, wait}
"""


class LocalBuckets:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self.max_keys = max_keys

    def take(self, key: str, limit: RateLimitSettings) -> float:
        """0 when allowed, else the seconds until a token is available."""
        with self._lock:
            now = self._clock()
            tokens, ts = self._buckets.get(key, (float(limit.burst), now))
            tokens = min(limit.burst, tokens + (now - ts) * limit.requests_per_s)
            if len(self._buckets) > self.max_keys:
                self._buckets.clear()
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / limit.requests_per_s


class RedisBuckets:
    """Buckets in Redis, shared by every ambassador. After a failure Redis is left alone
    for a while (:class:`flowgate.common.redis_guard.RedisPause`; local buckets decide
    meanwhile), so a hung Redis is not a timeout on every request."""

    def __init__(self, client: Any, prefix: str = "flowgate:rl:",
                 pause: RedisPause | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.pause = pause if pause is not None else RedisPause()
        self._clock = clock  # wall clock: every ambassador's buckets share the time axis
        self._script = client.register_script(_LUA)

    def take(self, key: str, limit: RateLimitSettings) -> float:
        allowed, wait_ms = self.pause.call(lambda: self._script(
            keys=[self.prefix + key], args=[limit.requests_per_s, limit.burst, self._clock()]))
        return 0.0 if int(allowed) else int(wait_ms) / 1000


class RateLimit:
    name = "ratelimit"

    def __init__(self, settings: Settings, local: LocalBuckets, shared: RedisBuckets | None = None,
                 *, on_limited: Callable[[str], None] | None = None,
                 on_error: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.local, self.shared = local, shared
        self._on_limited = on_limited or (lambda scope: None)
        self._on_error = on_error or (lambda: None)

    def __call__(self, request: Request, next: Handler) -> Response:
        identity = request.ctx.get("identity")
        who = identity.name if identity is not None else "anonymous"
        checks = []
        if self.settings.ratelimit is not None:
            checks.append(("identity", f"id:{who}", self.settings.ratelimit))
        policy = self.settings.flows.get(request.flow_id or "")
        if policy is not None and policy.ratelimit is not None:
            checks.append(("flow", f"flow:{request.flow_id}:{who}", policy.ratelimit))
        for scope, key, limit in checks:
            wait = self._take(key, limit)
            if wait > 0:
                self._on_limited(scope)
                return error_response(
                    429, "rate_limited", f"over the {scope} rate limit of "
                    f"{limit.requests_per_s:g} requests/s (burst {limit.burst})", request,
                    headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return next(request)

    def _take(self, key: str, limit: RateLimitSettings) -> float:
        if self.shared is not None:
            try:
                return self.shared.take(key, limit)
            except Exception:
                self._on_error()
        return self.local.take(key, limit)
