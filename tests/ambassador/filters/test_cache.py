"""Cache filter: opted-in /run-flow answers only; MISS → HIT; what the key holds; no-cache /
no-store; errors and streams never stored; stale-if-error; Redis and memory stores; a failing
store never fails a request; the memory store bounded by bytes as well as entries; Redis's
in-memory fallback while it fails."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from ambassador.chain import Response, error_response
from ambassador.filters.auth import Identity
from ambassador.filters.cache import Cache, MemoryCacheStore, RedisCacheStore, cache_key
from ambassador.filters.cache_stores import entry_bytes
from ambassador.routing_view import RoutingView
from flowgate.common.redis_guard import RedisPause

FLOWS = {
    "flows.faq.cache": {"ttl_s": 60, "stale_if_error_s": 300},
    "flows.sess.cache": {"ttl_s": 60, "session_in_key": True},
    "flows.nostale.cache": {"ttl_s": 60},
}


def answer(output: str = "first", version: int | None = 1) -> Response:
    headers = {"Content-Type": "application/json", "X-Run-ID": "r1"}
    if version is not None:
        headers["X-Flow-Version"] = str(version)
    return Response(200, headers, json.dumps({"output": output}).encode())


class Engine:
    """The engine's flow records as the routing view reads them (ambassador/routing_view.py
    is tested against a real engine in tests/ambassador/test_cache_routing.py)."""

    def __init__(self) -> None:
        self.flows: dict[str, dict[str, Any]] = {}
        self.down = False

    def route(self, flow: str, live: int, canary: int | None = None, percent: float = 0,
              sticky: bool = False) -> None:
        self.flows[flow] = {"id": flow, "name": flow, "live_version": live, "routing": {
            "canary": {"version": canary, "percent": percent} if canary else None,
            "sticky_key": "session_id" if sticky else None}}

    def fetch(self, ref: str) -> dict[str, Any] | None:
        if self.down:
            raise ConnectionError("engine down")
        return self.flows.get(ref, {"id": ref, "name": ref, "live_version": 1, "routing": None})


class Hooks:
    def __init__(self) -> None:
        self.results: list[str] = []
        self.errors: list[str] = []


@pytest.fixture
def engine() -> Engine:
    return Engine()


@pytest.fixture
def make_cache(settings_with, clock, engine):
    def build(store=None, **dotted: Any) -> tuple[Cache, Hooks, Any]:
        settings = settings_with({**FLOWS, **dotted})
        store = store if store is not None else MemoryCacheStore(
            settings.cache.max_entries, settings.cache.max_bytes, clock=clock)
        hooks = Hooks()
        routing = RoutingView(engine.fetch, clock=clock)
        return Cache(settings, store, routing, on_result=hooks.results.append,
                     on_error=hooks.errors.append, clock=clock), hooks, store

    return build


def body(**over: Any) -> dict[str, Any]:
    return {"input_value": "what is flowgate?", "tweaks": {"llm": {"temperature": 0}},
            "session_id": "s1", **over}


def ask(cache, request_for, down, flow="faq", headers=None, tenant="shop", **kw):
    ctx = {"identity": Identity("orders-app", tenant)} if tenant is not False else {}
    return cache(request_for(flow, body=kw.pop("req_body", body()), headers=headers, ctx=ctx, **kw),
                 down)


def test_miss_then_hit(make_cache, request_for, downstream) -> None:
    cache, hooks, _ = make_cache()
    down = downstream(answer("first"), answer("second"))
    first = ask(cache, request_for, down)
    second = ask(cache, request_for, down)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert down.count == 1
    assert second.status == 200 and second.json() == {"output": "first"}
    assert second.headers["Content-Type"] == "application/json"
    assert (first.meta["cache"], second.meta["cache"]) == ("miss", "hit")
    assert hooks.results == ["miss", "hit"]


def test_expires_after_ttl(make_cache, request_for, downstream, clock) -> None:
    cache, _, _ = make_cache()
    down = downstream(answer("first"), answer("second"))
    ask(cache, request_for, down)
    clock.advance(60)
    assert ask(cache, request_for, down).headers["X-Cache"] == "HIT"
    clock.advance(0.5)
    response = ask(cache, request_for, down)
    assert response.headers["X-Cache"] == "MISS" and response.json() == {"output": "second"}


@pytest.mark.parametrize(("flow", "route", "stream", "x_cache"), [
    pytest.param("other", "/run-flow", False, "BYPASS", id="flow-not-opted-in"),
    pytest.param("faq", "/run-flow", True, "BYPASS", id="stream-request"),
    pytest.param("faq", "/runs/<id>/events", False, None, id="not-run-flow-route"),
])
def test_only_opted_in_run_flow_answers_are_cached(make_cache, request_for, downstream, flow, route,
                                                   stream, x_cache) -> None:
    cache, _, store = make_cache()
    down = downstream(answer())
    for _ in range(2):
        response = cache(request_for(flow, route=route, stream=stream, body=body()), down)
        assert response.headers.get("X-Cache") == x_cache
    assert down.count == 2
    assert len(store._data) == 0


@pytest.mark.parametrize(("variant", "flow", "tenant", "x_cache"), [
    pytest.param(body(), "faq", "shop", "HIT", id="same-request"),
    pytest.param(body(input_value="something else"), "faq", "shop", "MISS", id="input-differs"),
    pytest.param(body(version=2), "faq", "shop", "MISS", id="version-differs"),
    pytest.param(body(tweaks={"llm": {"temperature": 1}}), "faq", "shop", "MISS", id="tweaks-differ"),
    pytest.param(body(tweaks=None), "faq", "shop", "MISS", id="tweaks-missing"),
    pytest.param(body(), "faq", "other-shop", "MISS", id="tenant-differs"),
    pytest.param(body(), "faq", None, "MISS", id="no-tenant"),
    pytest.param(body(), "nostale", "shop", "MISS", id="flow-differs"),
    pytest.param(body(session_id="s2"), "faq", "shop", "HIT", id="session-not-in-key-by-default"),
])
def test_what_the_key_holds(make_cache, request_for, downstream, variant, flow, tenant, x_cache) -> None:
    cache, _, _ = make_cache()
    down = downstream(answer())
    assert ask(cache, request_for, down).headers["X-Cache"] == "MISS"
    response = ask(cache, request_for, down, flow=flow, tenant=tenant, req_body=variant)
    assert response.headers["X-Cache"] == x_cache


@pytest.mark.parametrize(("second", "x_cache"), [
    pytest.param(body(session_id="s1"), "HIT", id="same-session"),
    pytest.param(body(session_id="s2"), "MISS", id="other-session"),
])
def test_session_in_key(make_cache, request_for, downstream, second, x_cache) -> None:
    cache, _, _ = make_cache()
    down = downstream(answer())
    assert ask(cache, request_for, down, flow="sess").headers["X-Cache"] == "MISS"
    assert ask(cache, request_for, down, flow="sess", req_body=second).headers["X-Cache"] == x_cache


def test_identities_without_a_tenant_never_share_an_entry(request_for) -> None:
    """The engine keeps a caller without a tenant apart by its identity: so does the cache
    (else one identity got another's cached answer, built from the other's chat history)."""
    alice = request_for(body=body(), ctx={"identity": Identity("alice")})
    mallory = request_for(body=body(), ctx={"identity": Identity("mallory")})
    assert cache_key(alice, False, 1) != cache_key(mallory, False, 1)


def test_key_ignores_tweak_order_and_identity_name(request_for) -> None:
    a = request_for(body=body(tweaks={"a": 1, "b": 2}), ctx={"identity": Identity("x", "t")})
    b = request_for(body=body(tweaks={"b": 2, "a": 1}), ctx={"identity": Identity("y", "t")})
    assert cache_key(a, False, 1) == cache_key(b, False, 1)
    assert len(cache_key(a, False, 1)) == 64  # SHA-256 hex


def test_no_cache_bypasses_the_lookup_but_stores_the_fresh_answer(make_cache, request_for,
                                                                  downstream) -> None:
    cache, hooks, _ = make_cache()
    down = downstream(answer("first"), answer("fresh"), answer("third"))
    ask(cache, request_for, down)
    bypass = ask(cache, request_for, down, headers={"Cache-Control": "no-cache"})
    assert bypass.headers["X-Cache"] == "BYPASS" and bypass.json() == {"output": "fresh"}
    hit = ask(cache, request_for, down)
    assert hit.headers["X-Cache"] == "HIT" and hit.json() == {"output": "fresh"}
    assert down.count == 2
    assert hooks.results == ["miss", "bypass", "hit"]


@pytest.mark.parametrize("cache_control", ["no-store", "private, no-store", "NO-STORE"])
def test_no_store_is_not_stored(make_cache, request_for, downstream, cache_control) -> None:
    cache, _, _ = make_cache()
    down = downstream(answer())
    assert ask(cache, request_for, down, headers={"Cache-Control": cache_control}) \
        .headers["X-Cache"] == "MISS"
    assert ask(cache, request_for, down).headers["X-Cache"] == "MISS"
    assert down.count == 2


@pytest.mark.parametrize("failure", [
    pytest.param(error_response(400, "bad_request", "x"), id="400"),
    pytest.param(error_response(404, "not_found", "x"), id="404"),
    pytest.param(error_response(422, "invalid", "x"), id="422"),
    pytest.param(error_response(429, "rate_limited", "x"), id="429"),
    pytest.param(error_response(500, "internal", "x"), id="500"),
    pytest.param(error_response(502, "bad_upstream", "x"), id="502"),
    pytest.param(error_response(503, "unavailable", "x"), id="503"),
    pytest.param(Response(201, {}, b"{}"), id="201"),
    pytest.param(Response(200, {}, chunks=iter([b"data: 1\n\n"])), id="streamed-200"),
])
def test_errors_and_streams_are_never_stored(make_cache, request_for, downstream, failure) -> None:
    cache, _, _store = make_cache()
    down = downstream(failure, answer())
    first = ask(cache, request_for, down)
    assert first.status == failure.status and first.headers["X-Cache"] == "MISS"
    second = ask(cache, request_for, down)
    assert second.headers["X-Cache"] == "MISS" and second.status == 200
    assert down.count == 2


def test_bodies_over_max_body_bytes_are_not_stored(make_cache, request_for, downstream) -> None:
    cache, _, _ = make_cache(**{"cache.max_body_bytes": 10})
    down = downstream(answer("a long output"))
    ask(cache, request_for, down)
    assert ask(cache, request_for, down).headers["X-Cache"] == "MISS"


def upstream_failure(status: int, **meta: Any) -> Response:
    response = error_response(status, "x", "engine failed", headers={"Retry-After": "1"})
    response.meta.update(meta)
    return response


@pytest.mark.parametrize("failure", [
    pytest.param(upstream_failure(503, upstream_error="connect_error"), id="unreachable"),
    pytest.param(upstream_failure(504, upstream_error="timeout"), id="timeout"),
    pytest.param(upstream_failure(502, upstream_error="reset"), id="connection-reset"),
    pytest.param(upstream_failure(503, breaker_open=True), id="breaker-open"),
    pytest.param(upstream_failure(503), id="engine-503"),
    pytest.param(upstream_failure(500), id="engine-500"),
])
def test_stale_served_on_upstream_failure_within_the_window(make_cache, request_for, downstream,
                                                            clock, failure) -> None:
    cache, hooks, _ = make_cache()
    down = downstream(answer("cached"), failure)
    ask(cache, request_for, down)
    clock.advance(60 + 299.5)  # past the TTL, inside the stale window
    response = ask(cache, request_for, down)
    assert response.status == 200 and response.json() == {"output": "cached"}
    assert response.headers["X-Cache"] == "STALE"
    assert response.headers["Warning"].startswith("110")
    assert hooks.results == ["miss", "stale"]
    assert down.count == 2  # the engine was tried first


def test_stale_served_on_an_engine_502(make_cache, request_for, downstream, clock) -> None:
    cache, _, _ = make_cache()
    down = downstream(answer("cached"), upstream_failure(502))
    ask(cache, request_for, down)
    clock.advance(61)
    response = ask(cache, request_for, down)
    assert response.headers["X-Cache"] == "STALE" and response.status == 200


def test_stale_served_on_failure_even_with_no_cache(make_cache, request_for, downstream, clock) -> None:
    cache, _, _ = make_cache()
    down = downstream(answer("cached"), upstream_failure(503, upstream_error="connect_error"))
    ask(cache, request_for, down)
    response = ask(cache, request_for, down, headers={"Cache-Control": "no-cache"})
    assert response.headers["X-Cache"] == "STALE" and response.status == 200


@pytest.mark.parametrize(("flow", "advance", "failure"), [
    pytest.param("faq", 60 + 300 + 1, upstream_failure(503, upstream_error="connect_error"),
                 id="past-the-stale-window"),
    pytest.param("nostale", 61, upstream_failure(503, upstream_error="connect_error"),
                 id="no-stale-window-configured"),
    pytest.param("faq", 61, upstream_failure(404), id="4xx-is-not-an-upstream-failure"),
    pytest.param("faq", 61, upstream_failure(422), id="422-is-not-an-upstream-failure"),
])
def test_stale_not_served(make_cache, request_for, downstream, clock, flow, advance, failure) -> None:
    cache, _, _ = make_cache()
    down = downstream(answer("cached"), failure)
    ask(cache, request_for, down, flow=flow)
    clock.advance(advance)
    response = ask(cache, request_for, down, flow=flow)
    assert response.status == failure.status
    assert response.headers["X-Cache"] == "MISS"
    assert "Warning" not in response.headers


# -- stores -------------------------------------------------------------------------------------

class BrokenStore:
    def get(self, key):
        raise ConnectionError("cache store down")

    def set(self, key, entry, keep_s):
        raise ConnectionError("cache store down")


def test_a_failing_store_never_fails_the_request(make_cache, request_for, downstream) -> None:
    cache, hooks, _ = make_cache(store=BrokenStore())
    down = downstream(answer("a"), answer("b"))
    first = ask(cache, request_for, down)
    second = ask(cache, request_for, down)
    assert (first.status, second.status) == (200, 200)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "MISS")
    assert hooks.errors == ["get", "set", "get", "set"]


def test_a_failing_store_during_an_outage_returns_the_error(make_cache, request_for, downstream) -> None:
    cache, hooks, _ = make_cache(store=BrokenStore())
    down = downstream(upstream_failure(503, upstream_error="connect_error"))
    response = ask(cache, request_for, down)
    assert response.status == 503
    assert "get" in hooks.errors


def test_redis_store_round_trip(redis_client, redis_prefix) -> None:
    store = RedisCacheStore(redis_client, prefix=redis_prefix)
    entry = {"stored_at": 1.5, "body": '{"output": "é"}', "content_type": "application/json"}
    assert store.get("k") is None
    store.set("k", entry, keep_s=30)
    assert store.get("k") == entry
    assert 0 < redis_client.pttl(redis_prefix + "k") <= 30_000


def test_redis_store_shared_between_ambassadors(make_cache, request_for, downstream, redis_client,
                                                redis_prefix) -> None:
    a, _, _ = make_cache(store=RedisCacheStore(redis_client, prefix=redis_prefix))
    b, _, _ = make_cache(store=RedisCacheStore(redis_client, prefix=redis_prefix))
    down = downstream(answer("from-a"), answer("from-b"))
    assert ask(a, request_for, down).headers["X-Cache"] == "MISS"
    hit = ask(b, request_for, down)
    assert hit.headers["X-Cache"] == "HIT" and hit.json() == {"output": "from-a"}
    key = next(iter(redis_client.scan_iter(match=redis_prefix + "*")))
    assert redis_client.pttl(key) > 300_000  # kept for TTL + stale window (360 s)


def test_memory_store_evicts_the_least_recently_used(clock) -> None:
    store = MemoryCacheStore(2, clock=clock)
    store.set("a", {"v": "a"}, 100)
    store.set("b", {"v": "b"}, 100)
    assert store.get("a") == {"v": "a"}  # a is now the most recently used
    store.set("c", {"v": "c"}, 100)
    assert store.get("b") is None
    assert store.get("a") == {"v": "a"} and store.get("c") == {"v": "c"}


def test_memory_store_expires_entries(clock) -> None:
    store = MemoryCacheStore(10, clock=clock)
    store.set("a", {"v": 1}, 10)
    clock.advance(9.9)
    assert store.get("a") == {"v": 1}
    clock.advance(0.1)
    assert store.get("a") is None


# -- memory bounded by bytes (issue #11) ---------------------------------------------------------

def sized(n: int) -> dict[str, Any]:
    return {"stored_at": 1.0, "body": "x" * n, "content_type": "application/json"}


def test_entry_size_counts_the_body(clock) -> None:
    small, large = entry_bytes("k", sized(10)), entry_bytes("k", sized(10_010))
    assert large - small == 10_000
    assert small > 100  # the key, the dict and the LRU's bookkeeping count too


def test_memory_store_is_bounded_by_bytes(clock) -> None:
    one = entry_bytes("a", sized(1000))
    sizes: list[tuple[int, int]] = []
    store = MemoryCacheStore(1000, max_bytes=3 * one, clock=clock,
                             on_size=lambda held, n: sizes.append((held, n)))
    for key in "abc":
        store.set(key, sized(1000), 100)
    assert store.get("a") is not None  # a is now the most recently used
    store.set("d", sized(1000), 100)  # over the bytes bound: b (least recently used) goes

    assert store.get("b") is None
    assert all(store.get(k) is not None for k in "acd")
    assert store.bytes == 3 * one and len(store) == 3
    assert sizes[0] == (0, 0) and sizes[-1] == (3 * one, 3)
    assert max(held for held, _ in sizes) <= 3 * one


def test_one_large_entry_evicts_as_many_small_ones_as_it_needs(clock) -> None:
    small = entry_bytes("s0", sized(100))
    store = MemoryCacheStore(1000, max_bytes=10 * small, clock=clock)
    for i in range(10):
        store.set(f"s{i}", sized(100), 100)
    store.set("bg", sized(100 + 4 * small), 100)  # five smalls' worth
    assert [store.get(f"s{i}") is None for i in range(10)] == [True] * 5 + [False] * 5
    assert store.get("bg") is not None and store.bytes == 10 * small


def test_an_entry_larger_than_max_bytes_is_not_kept(clock) -> None:
    store = MemoryCacheStore(10, max_bytes=5000, clock=clock)
    store.set("k", sized(100), 100)
    store.set("k", sized(10_000), 100)  # a newer answer too large: the older one goes too
    assert store.get("k") is None and store.bytes == 0 and len(store) == 0


def test_replacing_an_entry_counts_its_bytes_once(clock) -> None:
    store = MemoryCacheStore(10, clock=clock)
    for _ in range(5):
        store.set("k", sized(1000), 100)
    assert store.bytes == entry_bytes("k", sized(1000)) and len(store) == 1


def test_expired_entries_give_their_bytes_back(clock) -> None:
    store = MemoryCacheStore(10, clock=clock)
    store.set("old", sized(1000), 10)
    clock.advance(11)
    store.set("new", sized(10), 100)  # expired entries at the cold end go on a set
    assert len(store) == 1 and store.bytes == entry_bytes("new", sized(10))
    store.set("short", sized(10), 1)
    clock.advance(2)
    assert store.get("short") is None  # ... and on a get
    assert store.bytes == entry_bytes("new", sized(10))


def test_max_bytes_default_and_validation(settings_with) -> None:
    assert settings_with().cache.max_bytes == 64 * 1_048_576
    with pytest.raises(ValueError, match=r"cache\.max_bytes"):
        settings_with(**{"cache.max_bytes": 10})


# -- Redis with a local fallback (issue #11) -----------------------------------------------------

@pytest.fixture
def dead_redis(dead_port):
    client = redis.Redis.from_url(f"redis://127.0.0.1:{dead_port}/0", socket_connect_timeout=0.2,
                                  socket_timeout=0.2, decode_responses=True)
    yield client
    client.close()


def test_redis_down_the_cache_keeps_its_hits_in_memory(make_cache, request_for, downstream,
                                                       dead_redis, clock) -> None:
    fallbacks: list[str] = []
    store = RedisCacheStore(dead_redis, MemoryCacheStore(10, clock=clock),
                            pause=RedisPause(5.0, clock), on_fallback=fallbacks.append)
    cache, hooks, _ = make_cache(store=store)
    down = downstream(answer("first"), answer("second"))

    first = ask(cache, request_for, down)
    second = ask(cache, request_for, down)

    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.json() == {"output": "first"} and down.count == 1
    assert fallbacks == ["get", "set", "get"]
    assert hooks.errors == []  # the store coped: the filter saw no failure
    assert store.pause.failures == 1  # Redis was called once, then left alone


def test_stale_answers_survive_a_redis_outage_too(make_cache, request_for, downstream,
                                                  dead_redis, clock) -> None:
    store = RedisCacheStore(dead_redis, MemoryCacheStore(10, clock=clock),
                            pause=RedisPause(3600, clock))
    cache, _, _ = make_cache(store=store)
    down = downstream(answer("cached"), upstream_failure(503, upstream_error="connect_error"))
    ask(cache, request_for, down)
    clock.advance(61)
    response = ask(cache, request_for, down)
    assert response.headers["X-Cache"] == "STALE" and response.json() == {"output": "cached"}


def test_redis_back_after_the_pause_is_used_again(make_cache, request_for, downstream,
                                                  redis_client, redis_prefix, clock) -> None:
    pause = RedisPause(5.0, clock)
    fallbacks: list[str] = []
    store = RedisCacheStore(redis_client, MemoryCacheStore(10, clock=clock), prefix=redis_prefix,
                            pause=pause, on_fallback=fallbacks.append)
    cache, _, _ = make_cache(store=store)
    with pytest.raises(ConnectionError):
        pause.call(lambda: (_ for _ in ()).throw(ConnectionError("a failure a moment ago")))
    down = downstream(answer("during"), answer("after"))

    assert ask(cache, request_for, down).headers["X-Cache"] == "MISS"  # stored in memory
    assert list(redis_client.scan_iter(match=redis_prefix + "*")) == []
    clock.advance(5)
    after = ask(cache, request_for, down)  # Redis again: not in it yet

    assert after.headers["X-Cache"] == "MISS" and after.json() == {"output": "after"}
    assert len(list(redis_client.scan_iter(match=redis_prefix + "*"))) == 1
    assert fallbacks == ["get", "set"]


def test_without_a_fallback_a_redis_failure_is_the_filters_to_count(make_cache, request_for,
                                                                     downstream, dead_redis,
                                                                     clock) -> None:
    cache, hooks, _ = make_cache(store=RedisCacheStore(dead_redis, pause=RedisPause(5.0, clock)))
    down = downstream(answer("a"), answer("b"))
    assert [ask(cache, request_for, down).headers["X-Cache"] for _ in range(2)] == ["MISS"] * 2
    assert hooks.errors == ["get", "set", "get", "set"]


# -- the cache follows routing ---------------------------------------------------------------


def test_a_publish_is_never_answered_from_the_old_version(make_cache, request_for, downstream,
                                                          engine, clock) -> None:
    cache, _, _ = make_cache()
    engine.route("faq", live=1)
    down = downstream(answer("v1", 1), answer("v2", 2), answer("v1 again", 1))
    assert ask(cache, request_for, down).headers["X-Cache"] == "MISS"
    hit = ask(cache, request_for, down)
    assert (hit.headers["X-Cache"], hit.headers["X-Flow-Version"]) == ("HIT", "1")

    engine.route("faq", live=2)  # published
    cache.routing.forget("faq")  # the engine's signal (or the 2 s re-check)
    fresh = ask(cache, request_for, down)
    assert (fresh.headers["X-Cache"], fresh.json()) == ("MISS", {"output": "v2"})
    assert ask(cache, request_for, down).json() == {"output": "v2"}  # v2's own entry

    engine.route("faq", live=1)  # rolled back: v1's answer is right again
    clock.advance(2)  # no signal this time: the view is re-read after 2 s
    back = ask(cache, request_for, down)
    assert (back.headers["X-Cache"], back.json()) == ("HIT", {"output": "v1"})
    assert down.count == 2


def test_a_non_sticky_canary_is_never_looked_up(make_cache, request_for, downstream,
                                                engine) -> None:
    cache, _, _ = make_cache()
    engine.route("faq", live=1)
    down = downstream(answer("v1", 1), answer("v2", 2), answer("v1", 1), answer("v1", 1))
    ask(cache, request_for, down)  # cached from live
    engine.route("faq", live=1, canary=2, percent=50)
    cache.routing.forget("faq")
    results = [ask(cache, request_for, down).headers["X-Cache"] for _ in range(3)]
    assert results == ["BYPASS"] * 3  # the engine draws per request: never a cached answer
    assert down.count == 4


def test_a_sticky_canary_session_gets_only_its_version(make_cache, request_for, downstream,
                                                       engine) -> None:
    from flow_engine.routing import choose_version
    from flow_engine.store.base import FlowRecord

    cache, _, _ = make_cache(**{"flows.faq.cache": {"ttl_s": 60, "session_in_key": False}})
    engine.route("faq", live=1, canary=2, percent=50, sticky=True)
    record = FlowRecord("faq", "faq", "", 2, 1, (), engine.flows["faq"]["routing"], None, None)
    sessions = {v: [s for s in (f"s{i}" for i in range(40))
                    if choose_version(record, sticky_value=s) == v] for v in (1, 2)}
    live_session, canary_session = sessions[1][0], sessions[2][0]
    for session in (live_session, canary_session):  # the ambassador decides as the engine
        assert cache.routing.version_for("faq", {"session_id": session}) == choose_version(
            record, sticky_value=session)

    down = downstream(answer("live", 1), answer("canary", 2))
    assert ask(cache, request_for, down, req_body=body(session_id=live_session)).json() == {
        "output": "live"}
    canary = ask(cache, request_for, down, req_body=body(session_id=canary_session))
    assert (canary.headers["X-Cache"], canary.json()) == ("MISS", {"output": "canary"})
    again = ask(cache, request_for, down, req_body=body(session_id=canary_session))
    assert (again.headers["X-Cache"], again.json()) == ("HIT", {"output": "canary"})


def test_an_answer_is_stored_under_the_version_that_served_it(make_cache, request_for,
                                                              downstream, engine) -> None:
    """Routing changed between the lookup and the answer: the answer (v2) is not stored
    where requests routed to v1 would find it."""
    cache, _, _ = make_cache()
    engine.route("faq", live=1)
    down = downstream(answer("v2", 2), answer("v1", 1))
    ask(cache, request_for, down)
    assert ask(cache, request_for, down).json() == {"output": "v1"}


def test_an_answer_without_its_version_is_not_stored(make_cache, request_for, downstream) -> None:
    cache, _, store = make_cache()
    down = downstream(answer("old engine", version=None), answer("old engine", version=None))
    assert [ask(cache, request_for, down).headers["X-Cache"] for _ in range(2)] == ["MISS"] * 2
    assert len(store._data) == 0


def test_an_unknown_routing_still_serves_stale_from_the_last_view(make_cache, request_for,
                                                                  downstream, engine,
                                                                  clock) -> None:
    cache, hooks, _ = make_cache()
    down = downstream(answer("cached"), upstream_failure(503, upstream_error="connect_error"))
    ask(cache, request_for, down)
    clock.advance(120)
    engine.down = True  # the routing cannot be read either: the last view stands
    stale = ask(cache, request_for, down)
    assert (stale.headers["X-Cache"], stale.json()) == ("STALE", {"output": "cached"})
    assert hooks.results == ["miss", "stale"]  # each request counted once


def test_a_view_older_than_stale_if_error_serves_nothing_stale(make_cache, request_for,
                                                                downstream, engine,
                                                                clock) -> None:
    """A publish the ambassador could not learn of may have happened since: the last view's
    version is served stale only while that view is younger than stale_if_error_s."""
    cache, hooks, _ = make_cache(**{"flows.faq.cache": {"ttl_s": 60, "stale_if_error_s": 600}})
    ask(cache, request_for, downstream(answer("cached")))
    engine.down = True
    clock.advance(601)  # the entry is still kept (ttl + stale_if_error), the view is too old
    failed = ask(cache, request_for, downstream(upstream_failure(503,
                                                                 upstream_error="connect_error")))
    assert failed.status == 503 and failed.headers["X-Cache"] == "BYPASS"
    assert hooks.results == ["miss", "bypass"]
