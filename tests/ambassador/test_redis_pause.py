"""RedisPause: after a failure, Redis is left alone for pause_s (calls refused at once, the
callee never called), then tried again; one pause shared by the rate limiter and the cache
spares the second the first one's timeout (fake clock; a real, dead Redis port)."""

from __future__ import annotations

import pytest
import redis

from ambassador.config import RateLimit as RateLimitSettings
from ambassador.filters.cache_stores import MemoryCacheStore, RedisCacheStore
from ambassador.filters.ratelimit import RedisBuckets
from ambassador.redis_pause import RedisPause, RedisPaused


def boom() -> None:
    raise ConnectionError("redis is down")


def test_a_failure_pauses_calls_for_pause_s(clock) -> None:
    failures: list[int] = []
    pause = RedisPause(5.0, clock, on_failure=lambda: failures.append(1))
    called: list[int] = []

    def counted() -> str:
        called.append(1)
        return "ok"

    assert pause.call(counted) == "ok"
    with pytest.raises(ConnectionError):
        pause.call(boom)
    for _ in range(3):  # refused here, never reaching Redis
        with pytest.raises(RedisPaused):
            pause.call(counted)
        clock.advance(1.5)
    assert called == [1] and pause.paused  # 4.5 s of 5
    clock.advance(0.5)
    assert pause.call(counted) == "ok"
    assert (called, pause.failures, failures) == ([1, 1], 1, [1])


def test_the_first_call_after_a_pause_finds_out_again(clock) -> None:
    pause = RedisPause(5.0, clock)
    with pytest.raises(ConnectionError):
        pause.call(boom)
    clock.advance(5.0)
    with pytest.raises(ConnectionError):
        pause.call(boom)  # still down: a new pause
    assert pause.failures == 2 and pause.paused


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
