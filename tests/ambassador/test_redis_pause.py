"""One RedisPause shared by the rate limiter and the cache spares the second the first one's
timeout (fake clock; a real, dead Redis port). The pause itself is tested in
tests/flowgate/test_redis_guard.py."""

from __future__ import annotations

import pytest
import redis

from ambassador.config import RateLimit as RateLimitSettings
from ambassador.filters.cache_stores import MemoryCacheStore, RedisCacheStore
from ambassador.filters.ratelimit import RedisBuckets
from flowgate.common.redis_guard import RedisPause


@pytest.fixture
def dead_redis(dead_port):
    # built like app._redis (from_url: no client-side retry with backoff sleeps)
    client = redis.Redis.from_url(f"redis://127.0.0.1:{dead_port}/0", socket_connect_timeout=0.2,
                                  socket_timeout=0.2, decode_responses=True)
    yield client
    client.close()


def test_one_pause_shared_by_the_rate_limiter_and_the_cache(dead_redis, clock) -> None:
    pause = RedisPause(5.0, clock)
    buckets = RedisBuckets(dead_redis, pause=pause)
    store = RedisCacheStore(dead_redis, MemoryCacheStore(10, clock=clock), pause=pause)

    with pytest.raises(redis.ConnectionError):
        buckets.take("id:x", RateLimitSettings(requests_per_s=1, burst=1))
    assert store.get("k") is None  # the fallback answered; Redis was not called again
    store.set("k", {"body": "{}"}, 60)
    assert store.get("k") == {"body": "{}"}
    assert pause.failures == 1
