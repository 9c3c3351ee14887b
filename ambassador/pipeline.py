"""One immutable pipeline per config: the filter chains of the proxied routes and the parts
they use, built from the settings in force.

A config reload builds a new :class:`Pipeline` and puts it in force with one assignment
(``Ambassador.pipeline``): a request reads it once and runs on it to its end, so it never
sees half of one config and half of another. Policy — the filters and their settings — is
rebuilt; the stateful parts (breaker, retry budget, buckets, cache store, connection pool,
coalescing flights) come from the long-lived :class:`ambassador.parts.Parts` and survive.

Every route's chain is ``observe → validate → <the configured filters> → <its end>``: the
engine (``Upstream``) for ``/run-flow`` and ``/runs/<id>/events``, the WebSocket upgrade
for ``/ws/run-flow`` (whose handshake passes the caller-facing filters only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ambassador import ws
from ambassador.chain import Handler, build_chain
from ambassador.config import Settings
from ambassador.filters.auth import Auth
from ambassador.filters.breaker import Breaker, CircuitBreaker
from ambassador.filters.cache import Cache, CacheStore, MemoryCacheStore, RedisCacheStore
from ambassador.filters.fallback import Fallback
from ambassador.filters.fault import Fault
from ambassador.filters.observe import Observe
from ambassador.filters.ratelimit import LocalBuckets, RateLimit, RedisBuckets
from ambassador.filters.retry import Retry, RetryBudget
from ambassador.filters.timeout import Timeout
from ambassador.filters.trace import Trace
from ambassador.filters.validate import EVENTS_ROUTE, Validate
from ambassador.metrics import BREAKER_STATES
from ambassador.parts import Parts, key_of
from ambassador.upstream import Upstream
from ambassador.ws_guard import ROUTE as WS_ROUTE
from flowgate.common.redis_guard import RedisPause

if TYPE_CHECKING:
    from ambassador.app import Ambassador

# the filters a WebSocket handshake (and each of its messages) passes
CALLER_FACING = ("trace", "auth", "ratelimit")


@dataclass(frozen=True)
class Pipeline:
    settings: Settings
    upstream: Upstream
    breaker: CircuitBreaker
    auth: Auth
    routes: dict[str, Handler]  # route → its whole chain
    handshake_filters: tuple[Any, ...]  # the caller-facing filters (ambassador/ws_guard.py)


def build(amb: Ambassador, settings: Settings) -> Pipeline:
    """Everything ``settings`` need. What can fail (an unreadable key file, a malformed
    Redis URL) is built first, before any held part is adjusted; nothing is in force until
    the caller assigns the result (ambassador/app.py ``rebuild``)."""
    m, parts = amb.metrics, amb.parts
    auth = Auth(settings.inbound_auth,
                on_failure=lambda reason: m.auth_failures.labels(reason).inc())
    redis_client, redis_pause = _redis(parts, settings, m)
    upstream = parts.get("upstream", key_of(settings.upstream, settings.upstream_key()),
                         lambda: _upstream(amb, settings), close=Upstream.close)
    breaker = parts.get("breaker", key_of(settings.breaker), lambda: _breaker(amb, settings),
                        adjust=lambda held: held.reconfigure(settings.breaker,
                                                             _probe(amb, settings)))
    r = settings.retry
    budget = parts.get("retry_budget", (r.budget_ratio, r.budget_min_per_s, r.budget_window_s),
                       lambda: RetryBudget(r.budget_ratio, r.budget_min_per_s,
                                           r.budget_window_s))
    buckets = parts.get("buckets", None, LocalBuckets)
    shared_buckets = parts.get(
        "shared_buckets", (settings.redis_url, settings.redis_pause_s),
        lambda: RedisBuckets(redis_client, pause=redis_pause) if redis_client else None)
    store = parts.get("cache_store", key_of(settings.redis_url, settings.redis_pause_s,
                                            settings.cache.max_entries, settings.cache.max_bytes),
                      lambda: _cache_store(amb, settings, redis_client, redis_pause))
    available = {
        "trace": Trace(),
        "auth": auth,
        "ratelimit": RateLimit(settings, buckets, shared_buckets,
                               on_limited=lambda scope: m.ratelimited.labels(scope).inc(),
                               on_error=m.ratelimit_errors.inc),
        "fallback": Fallback(settings, on_fallback=lambda flow: m.fallbacks.labels(
            amb.labels.of(flow)).inc()),
        "cache": Cache(settings, store, amb.routing, flights=amb.flights,
                       on_result=lambda result: m.cache.labels(result).inc(),
                       on_error=lambda op: m.cache_errors.labels(op).inc()),
        "breaker": Breaker(breaker),
        "retry": Retry(settings.retry, budget,
                       on_retry=lambda reason: m.retries.labels(reason).inc(),
                       on_budget_exhausted=m.retry_budget_exhausted.inc),
        "timeout": Timeout(settings.upstream.timeouts),
        "fault": Fault(settings, on_fault=lambda flow, kind: m.faults_injected.labels(
            amb.labels.of(flow), kind).inc()),
    }
    configured = [available[name] for name in settings.filters]
    caller_facing = tuple(available[name] for name in settings.filters if name in CALLER_FACING)
    outer = [Observe(amb), Validate(settings, upstream)]
    proxied = build_chain([*outer, *configured], upstream)
    return Pipeline(
        settings=settings, upstream=upstream, breaker=breaker, auth=auth,
        routes={"/run-flow": proxied, EVENTS_ROUTE: proxied,
                WS_ROUTE: build_chain([*outer, *caller_facing], ws.Upgrade(amb, settings))},
        handshake_filters=caller_facing)


def _redis(parts: Parts, settings: Settings, m: Any) -> tuple[Any, RedisPause]:
    client = parts.get("redis", (settings.redis_url, settings.redis_timeout_s),
                       lambda: _redis_client(settings.redis_url, settings.redis_timeout_s))
    # one pause for every store on this Redis: a failure one sees spares the others
    pause = parts.get("redis_pause", (settings.redis_url, settings.redis_pause_s),
                      lambda: RedisPause(settings.redis_pause_s, on_failure=m.redis_failures.inc))
    return client, pause


def _upstream(amb: Ambassador, settings: Settings) -> Upstream:
    m = amb.metrics

    def observe(outcome: str, seconds: float) -> None:
        m.upstream_attempts.labels(outcome).inc()
        m.upstream_up.set(0 if outcome in ("connect_error", "timeout", "reset") else 1)

    return Upstream(settings.upstream, settings.upstream_key(), observe=observe)


def _breaker(amb: Ambassador, settings: Settings) -> CircuitBreaker:
    m = amb.metrics

    def transition(old: str, new: str) -> None:
        for state in BREAKER_STATES:
            m.breaker_state.labels(state).set(1 if state == new else 0)
        m.breaker_transitions.labels(new).inc()
        amb.log.warning("circuit breaker %s → %s", old, new)

    return CircuitBreaker(settings.breaker, probe=_probe(amb, settings),
                          on_transition=transition, on_probe=lambda ready: m.breaker_probes.labels(
                              "ready" if ready else "not_ready").inc())


def _probe(amb: Ambassador, settings: Settings):
    """The engine's readiness, asked of the upstream in force when the breaker asks; None
    (trials go out without asking) with no readiness path."""
    b = settings.breaker
    if not b.readiness_path:
        return None
    return lambda: amb.pipeline.upstream.ready(b.readiness_path, b.probe_timeout_s)


def _cache_store(amb: Ambassador, settings: Settings, redis_client: Any,
                 pause: RedisPause) -> CacheStore:
    """Redis with a bounded in-memory fallback, or (no Redis) the in-memory store."""
    m = amb.metrics

    def size(held: int, entries: int) -> None:
        m.cache_memory_bytes.set(held)
        m.cache_memory_entries.set(entries)

    def fallback(op: str) -> None:
        m.cache_errors.labels(op).inc()  # the configured store failed...
        m.cache_fallback.labels(op).inc()  # ...and memory did it instead

    memory = MemoryCacheStore(settings.cache.max_entries, settings.cache.max_bytes,
                              on_size=size)
    if redis_client is None:
        return memory
    return RedisCacheStore(redis_client, memory, pause=pause, on_fallback=fallback)


def _redis_client(url: str | None, timeout_s: float = 0.5):
    if not url:
        return None
    import redis

    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=timeout_s,
                                socket_timeout=timeout_s, health_check_interval=30)
