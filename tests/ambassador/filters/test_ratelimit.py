"""Rate-limit filter: token buckets (fake clock), burst, 429 + Retry-After, identity and flow
scopes; Redis-shared buckets; Redis down → the local bucket decides and on_error counts it."""

from __future__ import annotations

import pytest
import redis

from ambassador.filters.auth import Identity
from ambassador.filters.ratelimit import LocalBuckets, RateLimit, RedisBuckets


class Hooks:
    def __init__(self) -> None:
        self.limited: list[str] = []
        self.errors = 0

    def on_error(self) -> None:
        self.errors += 1


def make_filter(settings, clock, shared=None) -> tuple[RateLimit, Hooks]:
    hooks = Hooks()
    f = RateLimit(settings, LocalBuckets(clock=clock), shared, on_limited=hooks.limited.append,
                  on_error=hooks.on_error)
    return f, hooks


def call(f, request_for, downstream, flow="faq", who: str | None = "orders-app"):
    ctx = {"identity": Identity(who)} if who else {}
    down = downstream()
    response = f(request_for(flow, ctx=ctx), down)
    return response, down


def statuses(f, request_for, downstream, n, **kw) -> list[int]:
    return [call(f, request_for, downstream, **kw)[0].status for _ in range(n)]


def test_no_limits_configured_passes_everything(settings_with, clock, request_for, downstream) -> None:
    f, hooks = make_filter(settings_with(), clock)
    assert statuses(f, request_for, downstream, 50) == [200] * 50
    assert hooks.limited == []


def test_burst_then_429_with_retry_after(settings_with, clock, request_for, downstream) -> None:
    f, hooks = make_filter(settings_with({"ratelimit": {"requests_per_s": 1, "burst": 3}}), clock)
    assert statuses(f, request_for, downstream, 3) == [200] * 3
    response, down = call(f, request_for, downstream)
    assert response.status == 429 and down.count == 0
    assert response.headers["Retry-After"] == "1"
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert hooks.limited == ["identity"]


@pytest.mark.parametrize(("rate", "burst", "steps"), [
    # steps: (advance seconds, expected status)
    pytest.param(1, 1, [(0, 200), (0, 429), (0.5, 429), (0.5, 200), (0, 429)], id="one-per-second"),
    pytest.param(2, 2, [(0, 200), (0, 200), (0, 429), (0.5, 200), (0, 429), (1.0, 200), (0, 200),
                        (0, 429)], id="two-per-second"),
    pytest.param(10, 1, [(0, 200), (0.05, 429), (0.06, 200)], id="fast-refill"),
    pytest.param(1, 3, [(0, 200), (0, 200), (0, 200), (100, 200), (0, 200), (0, 200), (0, 429)],
                 id="refill-capped-at-burst"),
])
def test_token_bucket_refill(settings_with, clock, request_for, downstream, rate, burst, steps) -> None:
    f, _ = make_filter(settings_with({"ratelimit": {"requests_per_s": rate, "burst": burst}}), clock)
    got = []
    for advance, _status in steps:
        clock.advance(advance)
        got.append(call(f, request_for, downstream)[0].status)
    assert got == [status for _, status in steps]


@pytest.mark.parametrize(("rate", "advance", "retry_after"), [
    pytest.param(0.1, 0, "10", id="slow-rate-full-wait"),
    pytest.param(0.1, 4, "6", id="slow-rate-partly-refilled"),
    pytest.param(0.1, 9.5, "1", id="rounded-up"),
    pytest.param(100, 0, "1", id="sub-second-wait-is-at-least-1"),
])
def test_retry_after_is_the_wait_for_the_next_token(settings_with, clock, request_for, downstream,
                                                    rate, advance, retry_after) -> None:
    f, _ = make_filter(settings_with({"ratelimit": {"requests_per_s": rate, "burst": 1}}), clock)
    assert call(f, request_for, downstream)[0].status == 200
    clock.advance(advance)
    response, _ = call(f, request_for, downstream)
    assert response.status == 429
    assert response.headers["Retry-After"] == retry_after


def test_identities_have_their_own_buckets(settings_with, clock, request_for, downstream) -> None:
    f, _ = make_filter(settings_with({"ratelimit": {"requests_per_s": 1, "burst": 1}}), clock)
    assert statuses(f, request_for, downstream, 2, who="a") == [200, 429]
    assert statuses(f, request_for, downstream, 2, who="b") == [200, 429]
    assert statuses(f, request_for, downstream, 2, who=None) == [200, 429]  # anonymous: one bucket


def test_flow_scope_limits_only_that_flow(settings_with, clock, request_for, downstream) -> None:
    f, hooks = make_filter(settings_with({"flows.faq.ratelimit": {"requests_per_s": 1, "burst": 2}}),
                           clock)
    assert statuses(f, request_for, downstream, 3, flow="faq") == [200, 200, 429]
    assert statuses(f, request_for, downstream, 5, flow="other") == [200] * 5
    assert hooks.limited == ["flow"]
    response, _ = call(f, request_for, downstream, flow="faq")
    assert response.status == 429 and "flow" in response.json()["error"]["message"]


def test_identity_and_flow_scopes_together(settings_with, clock, request_for, downstream) -> None:
    settings = settings_with({"ratelimit": {"requests_per_s": 1, "burst": 3},
                              "flows.faq.ratelimit": {"requests_per_s": 1, "burst": 1}})
    f, hooks = make_filter(settings, clock)
    assert statuses(f, request_for, downstream, 2, flow="faq") == [200, 429]
    assert hooks.limited == ["flow"]
    assert statuses(f, request_for, downstream, 2, flow="other") == [200, 429]
    assert hooks.limited == ["flow", "identity"]


# -- Redis-shared buckets -----------------------------------------------------------------------

def test_redis_buckets_are_shared_between_ambassadors(settings_with, clock, request_for, downstream,
                                                      redis_client, redis_prefix) -> None:
    settings = settings_with({"ratelimit": {"requests_per_s": 0.01, "burst": 2}})
    a, hooks_a = make_filter(settings, clock, RedisBuckets(redis_client, prefix=redis_prefix))
    b, hooks_b = make_filter(settings, clock, RedisBuckets(redis_client, prefix=redis_prefix))
    assert call(a, request_for, downstream)[0].status == 200
    assert call(b, request_for, downstream)[0].status == 200
    response, _ = call(a, request_for, downstream)
    assert response.status == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 100
    assert call(b, request_for, downstream)[0].status == 429
    assert call(b, request_for, downstream, who="someone-else")[0].status == 200
    assert hooks_a.errors == hooks_b.errors == 0
    assert (hooks_a.limited, hooks_b.limited) == (["identity"], ["identity"])
    keys = list(redis_client.scan_iter(match=redis_prefix + "*"))
    assert keys and all(redis_client.pttl(k) > 0 for k in keys)  # buckets expire


def test_redis_bucket_retry_after(settings_with, clock, request_for, downstream, redis_client,
                                  redis_prefix) -> None:
    # one instant for both calls, and a bucket Redis keeps ~100 s: a pause between them
    # must not shorten the wait nor let the key expire
    settings = settings_with({"ratelimit": {"requests_per_s": 0.01, "burst": 1}})
    f, _ = make_filter(settings, clock, RedisBuckets(redis_client, prefix=redis_prefix,
                                                     clock=lambda: 1_700_000_000.0))
    assert call(f, request_for, downstream)[0].status == 200
    response, _ = call(f, request_for, downstream)
    assert response.status == 429 and response.headers["Retry-After"] == "100"


def test_redis_down_falls_back_to_the_local_bucket(settings_with, clock, request_for, downstream,
                                                   dead_port) -> None:
    # built like app._redis (from_url: no client-side retry with backoff sleeps)
    dead = redis.Redis.from_url(f"redis://127.0.0.1:{dead_port}/0", socket_connect_timeout=0.2,
                                socket_timeout=0.2)
    settings = settings_with({"ratelimit": {"requests_per_s": 1, "burst": 2}})
    f, hooks = make_filter(settings, clock, RedisBuckets(dead))
    assert statuses(f, request_for, downstream, 3) == [200, 200, 429]
    assert hooks.errors == 3
    clock.advance(1)
    assert statuses(f, request_for, downstream, 1) == [200]
    dead.close()
