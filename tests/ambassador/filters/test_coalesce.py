"""Request coalescing in the cache filter (issue #14): concurrent identical cacheable
requests make one upstream call; the others wait for it and answer with its answer
(``X-Cache: COALESCED``), each with its own trace; errors and exceptions are shared, never
retried by a follower; a follower's wait is bounded; ``no-cache`` never joins; requests of
other keys — another tenant above all — never share a flight; stale-if-error still works.

Real threads, made deterministic by events: the engine here holds every call until the
test releases it, and the test releases it only once ``Flights`` reports every follower
waiting (its ``on_change`` hook) — nothing is synchronised by sleeping.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ambassador.chain import Handler, Request, Response, build_chain, error_response
from ambassador.filters.auth import Identity
from ambassador.filters.cache import Cache, MemoryCacheStore, cache_key
from ambassador.filters.coalesce import SHARED_HEADERS, Flights, Landing, follower_response
from ambassador.routing_view import RoutingView
from flowgate.common import tracing

WAIT_S = 10  # a bound on every wait below; none is expected to come near it
FLOWS = {"flows.faq.cache": {"ttl_s": 60, "stale_if_error_s": 300}}
BODY = {"input_value": "what is flowgate?", "tweaks": None, "session_id": "s1"}


def answer(output: str = "shared", *, status: int = 200, run_id: str = "run-1") -> Response:
    """What the engine answers, with what is the leader's alone: the retry filter's
    X-Upstream-Attempts, the engine's Idempotent-Replayed (of the leader's key)."""
    return Response(status, {"Content-Type": "application/json", "X-Run-ID": run_id,
                             "X-Flow-Version": "1", "X-Upstream-Attempts": "1",
                             "Idempotent-Replayed": "true"},
                    json.dumps({"run_id": run_id, "output": output}).encode(),
                    meta={"engine_answered": True, "upstream_s": 1.5})


class HeldEngine:
    """A fake ``next`` that holds every call until ``release()``; ``arrived(n)`` waits (with
    a bound) until ``n`` calls have come in. ``reply(request, n)`` makes the n-th answer
    (0-based), or raises."""

    def __init__(self, reply: Callable[[Request, int], Response] | None = None) -> None:
        self.reply = reply or (lambda request, n: answer())
        self.calls: list[Request] = []
        self._cond = threading.Condition()
        self._released = threading.Event()

    def __call__(self, request: Request) -> Response:
        with self._cond:
            n = len(self.calls)
            self.calls.append(request)
            self._cond.notify_all()
        assert self._released.wait(WAIT_S), "the test never released the engine"
        return self.reply(request, n)

    def arrived(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= n, WAIT_S), (
                f"{n} calls expected at the engine, {len(self.calls)} came")

    def release(self) -> None:
        self._released.set()

    @property
    def count(self) -> int:
        return len(self.calls)


class Waiters:
    """``Flights(on_change=...)``: lets a test wait until ``n`` followers wait."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.in_flight = self.waiting = 0
        self.history: list[tuple[int, int]] = []

    def __call__(self, in_flight: int, waiting: int) -> None:
        with self._cond:
            self.in_flight, self.waiting = in_flight, waiting
            self.history.append((in_flight, waiting))
            self._cond.notify_all()

    def reach(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.waiting >= n, WAIT_S), (
                f"{n} followers expected to wait, {self.waiting} do")


class Outcomes:
    """Runs requests in threads; ``results[i]`` is the i-th answer or the exception."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.results: dict[int, Response | BaseException] = {}

    def start(self, handler: Handler, request: Request) -> int:
        i = len(self.threads)

        def run() -> None:
            try:
                self.results[i] = handler(request)
            except BaseException as exc:  # the test looks at it
                self.results[i] = exc

        thread = threading.Thread(target=run, name=f"request-{i}", daemon=True)
        self.threads.append(thread)
        thread.start()
        return i

    def join(self) -> list[Response | BaseException]:
        for thread in self.threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), f"{thread.name} is still waiting"
        return [self.results[i] for i in range(len(self.threads))]


@pytest.fixture
def outcomes() -> Iterator[Outcomes]:
    o = Outcomes()
    yield o
    for thread in o.threads:
        thread.join(WAIT_S)


def live_v1(ref: str) -> dict[str, Any]:
    return {"id": ref, "name": ref, "live_version": 1, "routing": None}


@pytest.fixture
def make_cache(settings_with, clock):
    def build(flights: Flights | None = None, **dotted: Any) -> tuple[Cache, list[str]]:
        settings = settings_with({**FLOWS, **dotted})
        results: list[str] = []
        store = MemoryCacheStore(settings.cache.max_entries, settings.cache.max_bytes, clock=clock)
        return Cache(settings, store, RoutingView(live_v1, clock=clock),
                     on_result=results.append, clock=clock, flights=flights), results

    return build


def stamp(request: Request, next: Handler) -> Response:
    """What the outermost filter does after the cache: the request's own trace headers,
    with ``setdefault`` — a leader's trace id copied into a follower would stay there."""
    response = next(request)
    trace = request.ctx["trace"]
    for name, value in (("X-Trace-ID", trace.trace_id), ("traceparent", trace.traceparent),
                        ("X-Request-ID", trace.request_id)):
        response.headers.setdefault(name, value)
    response.headers["X-Ambassador-Overhead-Ms"] = "0.100"
    return response


def chain(cache: Cache, engine: Handler) -> Handler:
    return build_chain([stamp, cache], engine)


def run_request(tenant: str | None = "shop", identity: str = "orders-app",
                headers: dict[str, str] | None = None, **body: Any) -> Request:
    ctx: dict[str, Any] = {"trace": tracing.from_headers(None, None)}
    if tenant is not False:
        ctx["identity"] = Identity(identity, tenant)
    return Request("POST", "/api/v1/run/faq", {k.lower(): v for k, v in (headers or {}).items()},
                   "/run-flow", {**BODY, **body}, flow_id="faq", ctx=ctx)


def key_of(request: Request) -> str:
    return cache_key(request, False, 1)


# -- the happy path: 50 → 1 --------------------------------------------------------------------


def test_fifty_concurrent_identical_requests_make_one_call(make_cache, outcomes) -> None:
    waiters = Waiters()
    flights = Flights(on_change=waiters)
    cache, results = make_cache(flights)
    engine = HeldEngine()
    handler = chain(cache, engine)
    requests = [run_request() for _ in range(50)]

    for request in requests:
        outcomes.start(handler, request)
    engine.arrived(1)
    waiters.reach(49)
    assert flights.waiting(key_of(requests[0])) == 49 and len(flights) == 1
    engine.release()
    answers = outcomes.join()

    assert engine.count == 1
    assert all(isinstance(a, Response) and a.status == 200 for a in answers)
    assert len({a.body for a in answers}) == 1
    assert sorted(a.headers["X-Cache"] for a in answers) == ["COALESCED"] * 49 + ["MISS"]
    assert sorted(results) == ["coalesced"] * 49 + ["miss"]
    # every answer has its own trace, none the leader's (nor the engine's made-up ones)
    for request, a in zip(requests, answers, strict=True):
        assert a.headers["X-Trace-ID"] == request.ctx["trace"].trace_id
        assert a.headers["traceparent"] == request.ctx["trace"].traceparent
        assert a.headers["X-Request-ID"] == request.ctx["trace"].request_id
    followers = [a for a in answers if a.headers["X-Cache"] == "COALESCED"]
    assert len({a.headers["X-Trace-ID"] for a in followers}) == 49
    for a in followers:
        assert a.headers["X-Run-ID"] == "run-1"  # the run that produced the answer
        assert a.headers["X-Flow-Version"] == "1"
        assert "X-Upstream-Attempts" not in a.headers  # a follower made no attempt
        assert "Idempotent-Replayed" not in a.headers
        assert a.meta["coalesced"] is True and "engine_answered" not in a.meta
    # the flight is gone: bounded by what is in the air
    assert len(flights) == 0 and flights.waiting(key_of(requests[0])) == 0
    assert waiters.history[-1] == (0, 0)
    # the leader stored before it landed: the next identical request is a hit
    assert handler(run_request()).headers["X-Cache"] == "HIT" and engine.count == 1


def test_a_follower_does_not_keep_the_leaders_headers_after_the_leader_answered(
        make_cache, outcomes) -> None:
    """What a follower copies is taken when the leader lands, before filters outside the
    cache stamp the leader's own answer."""
    waiters = Waiters()
    cache, _ = make_cache(Flights(on_change=waiters))
    engine = HeldEngine()
    handler = chain(cache, engine)
    leader, follower = run_request(), run_request()
    outcomes.start(handler, leader)
    engine.arrived(1)
    outcomes.start(handler, follower)
    waiters.reach(1)
    engine.release()
    led, followed = outcomes.join()
    assert led.headers["X-Trace-ID"] == leader.ctx["trace"].trace_id
    assert followed.headers["X-Trace-ID"] == follower.ctx["trace"].trace_id
    assert followed.headers["X-Trace-ID"] != led.headers["X-Trace-ID"]
    assert set(followed.headers) == {*(h for h in SHARED_HEADERS if h in led.headers),
                                     "X-Cache", "X-Trace-ID", "traceparent", "X-Request-ID",
                                     "X-Ambassador-Overhead-Ms"}
    assert followed.headers is not led.headers


# -- the leader fails ---------------------------------------------------------------------------


def test_a_leaders_error_is_every_followers_answer_without_a_second_call(make_cache,
                                                                         outcomes) -> None:
    waiters = Waiters()
    flights = Flights(on_change=waiters)
    cache, results = make_cache(flights)

    def failed(request: Request, n: int) -> Response:
        response = error_response(429, "tenant_limit", "the tenant runs too many flows",
                                  request, headers={"Retry-After": "3"})
        response.headers["X-Run-ID"] = "run-refused"
        return response

    engine = HeldEngine(failed)
    handler = chain(cache, engine)
    requests = [run_request() for _ in range(10)]
    for request in requests:
        outcomes.start(handler, request)
    engine.arrived(1)
    waiters.reach(9)
    engine.release()
    answers = outcomes.join()

    assert engine.count == 1
    assert [a.status for a in answers] == [429] * 10
    assert sorted(a.headers["X-Cache"] for a in answers) == ["COALESCED"] * 9 + ["MISS"]
    for request, a in zip(requests, answers, strict=True):
        error = a.json()["error"]
        assert (error["code"], error["message"]) == ("tenant_limit",
                                                     "the tenant runs too many flows")
        # the error contract: the body's trace id is the answer's own
        assert error["trace_id"] == a.headers["X-Trace-ID"] == request.ctx["trace"].trace_id
        assert a.headers["Retry-After"] == "3"
    assert sorted(results) == ["coalesced"] * 9 + ["miss"]
    assert len(flights) == 0
    # an error is not stored: the next request calls the engine again (released already)
    assert handler(run_request()).headers["X-Cache"] == "MISS" and engine.count == 2


def test_a_leaders_exception_fails_its_followers_and_frees_the_key(make_cache, outcomes) -> None:
    waiters = Waiters()
    flights = Flights(on_change=waiters)
    cache, _ = make_cache(flights)

    def explode(request: Request, n: int) -> Response:
        if n == 0:
            raise RuntimeError("a bug below the cache")
        return answer("after the bug", run_id="run-2")

    engine = HeldEngine(explode)
    handler = chain(cache, engine)
    requests = [run_request() for _ in range(5)]
    for request in requests:
        outcomes.start(handler, request)
    engine.arrived(1)
    waiters.reach(4)
    engine.release()
    answers = outcomes.join()

    raised = [a for a in answers if isinstance(a, BaseException)]
    assert len(raised) == 1 and str(raised[0]) == "a bug below the cache"  # the leader's own
    failed = [(r, a) for r, a in zip(requests, answers, strict=True) if isinstance(a, Response)]
    assert len(failed) == 4
    for request, a in failed:
        assert a.status == 500 and a.headers["X-Cache"] == "COALESCED"
        assert a.json()["error"]["code"] == "internal"
        assert a.json()["error"]["trace_id"] == request.ctx["trace"].trace_id
    assert engine.count == 1
    assert len(flights) == 0 and flights.waiting(key_of(requests[0])) == 0
    again = handler(run_request())
    assert (again.status, again.headers["X-Cache"], again.json()["output"]) == (
        200, "MISS", "after the bug")


def test_a_leader_ended_by_a_base_exception_still_lands(make_cache, outcomes) -> None:
    """Whatever ends the leader — a BaseException such as a gevent Timeout or a killed
    greenlet included — its followers are answered, not left waiting."""
    waiters = Waiters()
    flights = Flights(on_change=waiters)
    cache, _ = make_cache(flights)

    class Killed(BaseException):
        pass

    def killed(request: Request, n: int) -> Response:
        raise Killed()

    engine = HeldEngine(killed)
    handler = chain(cache, engine)
    outcomes.start(handler, run_request())
    engine.arrived(1)
    outcomes.start(handler, run_request())
    waiters.reach(1)
    engine.release()
    led, followed = outcomes.join()
    assert isinstance(led, Killed)
    assert followed.status == 500 and len(flights) == 0


# -- a follower's wait is bounded ----------------------------------------------------------------


def test_a_follower_gives_up_at_its_deadline_with_a_504_not_a_second_call(make_cache,
                                                                          outcomes) -> None:
    waiters = Waiters()
    flights = Flights(on_change=waiters)
    cache, results = make_cache(flights)
    engine = HeldEngine()
    handler = chain(cache, engine)
    leader = run_request()
    outcomes.start(handler, leader)
    engine.arrived(1)

    follower = run_request()
    follower.ctx["deadline"] = time.monotonic() + 0.05  # e.g. set by a filter before
    response = handler(follower)  # in this thread: it returns only once it gave up

    assert response.status == 504 and response.headers["X-Cache"] == "COALESCED"
    error = response.json()["error"]
    assert error["code"] == "timeout" and error["trace_id"] == follower.ctx["trace"].trace_id
    assert engine.count == 1
    assert flights.waiting(key_of(leader)) == 0 and len(flights) == 1  # the leader goes on
    engine.release()
    [led] = outcomes.join()
    assert led.status == 200 and engine.count == 1
    assert results == ["coalesced", "miss"]


def test_without_a_deadline_a_follower_waits_at_most_the_upstream_total_timeout(
        make_cache, outcomes) -> None:
    cache, _ = make_cache(**{"upstream.timeouts.total_s": 0.05,
                             "upstream.timeouts.per_try_s": 0.05})
    engine = HeldEngine()
    handler = chain(cache, engine)
    outcomes.start(handler, run_request())
    engine.arrived(1)
    response = handler(run_request())
    assert response.status == 504 and response.json()["error"]["code"] == "timeout"
    assert "0.05 s" in response.json()["error"]["message"]
    assert engine.count == 1
    engine.release()
    outcomes.join()


def test_a_follower_whose_deadline_passed_does_not_wait(make_cache, outcomes) -> None:
    cache, _ = make_cache()
    engine = HeldEngine()
    handler = chain(cache, engine)
    outcomes.start(handler, run_request())
    engine.arrived(1)
    late = run_request()
    late.ctx["deadline"] = time.monotonic() - 1
    response = handler(late)
    assert response.status == 504 and engine.count == 1
    assert cache.flights.waiting(key_of(late)) == 0
    engine.release()
    outcomes.join()


# -- Cache-Control ---------------------------------------------------------------------------


def test_no_cache_never_joins_a_flight(make_cache, outcomes) -> None:
    cache, _ = make_cache()
    engine = HeldEngine(lambda request, n: answer(f"answer {n}", run_id=f"run-{n}"))
    handler = chain(cache, engine)
    outcomes.start(handler, run_request())
    engine.arrived(1)
    fresh = run_request(headers={"Cache-Control": "no-cache"})
    outcomes.start(handler, fresh)
    engine.arrived(2)  # it called the engine itself: it did not wait for the flight
    assert cache.flights.waiting(key_of(fresh)) == 0
    engine.release()
    led, own = outcomes.join()
    assert (led.headers["X-Cache"], led.json()["output"]) == ("MISS", "answer 0")
    assert (own.headers["X-Cache"], own.json()["output"]) == ("BYPASS", "answer 1")
    assert own.headers["X-Run-ID"] == "run-1"


def test_a_no_cache_request_may_lead_a_flight(make_cache, outcomes) -> None:
    waiters = Waiters()
    cache, _ = make_cache(Flights(on_change=waiters))
    engine = HeldEngine()
    handler = chain(cache, engine)
    outcomes.start(handler, run_request(headers={"Cache-Control": "no-cache"}))
    engine.arrived(1)
    for _ in range(3):
        outcomes.start(handler, run_request())
    waiters.reach(3)
    engine.release()
    answers = outcomes.join()
    assert [a.headers["X-Cache"] for a in answers] == ["BYPASS"] + ["COALESCED"] * 3
    assert len({a.body for a in answers}) == 1 and engine.count == 1


@pytest.mark.parametrize("cache_control", ["no-store", "private, no-store"])
def test_no_store_coalesces_but_is_not_stored(make_cache, outcomes, cache_control) -> None:
    waiters = Waiters()
    cache, _ = make_cache(Flights(on_change=waiters))
    engine = HeldEngine()
    handler = chain(cache, engine)
    outcomes.start(handler, run_request(headers={"Cache-Control": cache_control}))
    engine.arrived(1)
    outcomes.start(handler, run_request(headers={"Cache-Control": cache_control}))
    waiters.reach(1)
    engine.release()
    assert [a.headers["X-Cache"] for a in outcomes.join()] == ["MISS", "COALESCED"]
    assert handler(run_request()).headers["X-Cache"] == "MISS" and engine.count == 2


# -- other keys never share a flight (the tenant above all) -------------------------------------


@pytest.mark.parametrize("other", [
    pytest.param({"tenant": "bank"}, id="another-tenant"),
    pytest.param({"tenant": None, "identity": "mallory"}, id="an-identity-without-tenant"),
    pytest.param({"tenant": False}, id="no-identity"),
    pytest.param({"input_value": "something else"}, id="another-input"),
    pytest.param({"tweaks": {"llm": {"temperature": 1}}}, id="other-tweaks"),
    pytest.param({"version": 2}, id="another-version"),
])
def test_requests_of_another_key_never_join(make_cache, outcomes, other) -> None:
    """The attack: a request of another tenant, sent while the first is in flight, must
    not get its answer. It reaches the engine itself — had it joined the first flight, the
    engine would never see it and ``arrived(2)`` would fail."""
    cache, _ = make_cache()

    def output_for(request: Request) -> str:
        identity = request.ctx.get("identity")
        who = (identity.tenant or identity.name) if identity else "anonymous"
        body = request.body
        return f"for {who}: {body['input_value']} {body['tweaks']} v{body.get('version', 1)}"

    def per_caller(request: Request, n: int) -> Response:
        return answer(output_for(request), run_id=f"run-{n}")

    engine = HeldEngine(per_caller)
    handler = chain(cache, engine)
    victim = run_request(tenant="shop", identity="orders-app")
    attacker = run_request(**other)
    assert key_of(victim) != cache_key(attacker, False, attacker.body.get("version", 1))
    outcomes.start(handler, victim)
    engine.arrived(1)
    outcomes.start(handler, attacker)
    engine.arrived(2)
    assert cache.flights.waiting(key_of(victim)) == 0 and len(cache.flights) == 2
    engine.release()
    mine, theirs = outcomes.join()
    assert mine.headers["X-Cache"] == theirs.headers["X-Cache"] == "MISS"
    assert mine.json()["output"] == output_for(victim) == "for shop: what is flowgate? None v1"
    assert theirs.json()["output"] == output_for(attacker) != mine.json()["output"]
    assert theirs.headers["X-Run-ID"] != mine.headers["X-Run-ID"]


def test_two_callers_of_one_tenant_share_a_flight(make_cache, outcomes) -> None:
    """As they share cache entries (the engine keeps their runs under the tenant)."""
    waiters = Waiters()
    cache, _ = make_cache(Flights(on_change=waiters))
    engine = HeldEngine()
    handler = chain(cache, engine)
    outcomes.start(handler, run_request(tenant="shop", identity="orders-app"))
    engine.arrived(1)
    outcomes.start(handler, run_request(tenant="shop", identity="reports-app"))
    waiters.reach(1)
    engine.release()
    assert [a.headers["X-Cache"] for a in outcomes.join()] == ["MISS", "COALESCED"]


def test_requests_whose_version_is_unknown_are_not_coalesced(settings_with, clock,
                                                            outcomes) -> None:
    """A non-sticky canary: the engine draws each request's version."""
    routing = RoutingView(lambda ref: {"id": ref, "name": ref, "live_version": 1, "routing": {
        "canary": {"version": 2, "percent": 50}, "sticky_key": None}}, clock=clock)
    settings = settings_with(FLOWS)
    cache = Cache(settings, MemoryCacheStore(100, clock=clock), routing, clock=clock)
    engine = HeldEngine()
    handler = chain(cache, engine)
    outcomes.start(handler, run_request())
    outcomes.start(handler, run_request())
    engine.arrived(2)
    assert len(cache.flights) == 0
    engine.release()
    assert [a.headers["X-Cache"] for a in outcomes.join()] == ["BYPASS", "BYPASS"]


# -- the cache around it -----------------------------------------------------------------------


def test_stale_if_error_still_serves_stale_and_followers_get_it(make_cache, clock,
                                                                outcomes) -> None:
    waiters = Waiters()
    cache, results = make_cache(Flights(on_change=waiters))
    handler = chain(cache, lambda request: answer("cached"))
    assert handler(run_request()).headers["X-Cache"] == "MISS"
    clock.advance(61)  # past the TTL, inside the stale window

    def down(request: Request, n: int) -> Response:
        response = error_response(503, "unavailable", "engine unreachable", request)
        response.meta["upstream_error"] = "connect_error"
        return response

    engine = HeldEngine(down)
    handler = chain(cache, engine)
    outcomes.start(handler, run_request())
    engine.arrived(1)
    for _ in range(3):
        outcomes.start(handler, run_request())
    waiters.reach(3)
    engine.release()
    answers = outcomes.join()
    assert engine.count == 1
    for a in answers:
        assert (a.status, a.json()["output"], a.headers["X-Cache"]) == (200, "cached", "STALE")
        assert a.headers["Warning"].startswith("110")
    assert results == ["miss"] + ["stale"] * 4


def test_a_follower_that_gives_up_serves_a_stale_entry(make_cache, clock, outcomes) -> None:
    cache, _ = make_cache()
    handler = chain(cache, lambda request: answer("cached"))
    handler(run_request())
    clock.advance(61)
    engine = HeldEngine(lambda request, n: answer("fresh", run_id="run-2"))
    handler = chain(cache, engine)
    outcomes.start(handler, run_request())
    engine.arrived(1)
    late = run_request()
    late.ctx["deadline"] = time.monotonic() + 0.02
    response = handler(late)
    assert (response.status, response.headers["X-Cache"]) == (200, "STALE")
    assert response.json()["output"] == "cached"
    engine.release()
    [led] = outcomes.join()
    assert led.json()["output"] == "fresh" and engine.count == 1


class PausingStore(MemoryCacheStore):
    """``get`` of the thread named ``pause_in`` stops after reading, until ``resume``."""

    def __init__(self, *args: Any, pause_in: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pause_in = pause_in
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.gets = 0

    def get(self, key: str) -> dict[str, Any] | None:
        self.gets += 1
        entry = super().get(key)
        if threading.current_thread().name == self.pause_in and not self.resume.is_set():
            self.paused.set()
            assert self.resume.wait(WAIT_S)
        return entry


def test_a_flight_landing_between_a_miss_and_a_claim_is_no_second_call(settings_with, clock,
                                                                         outcomes) -> None:
    """A request misses, then — before it claims a flight — the leader stores its answer
    and lands: the request finds no flight and leads, but it looks again first (a flight
    landed since its lookup) and answers from the store."""
    settings = settings_with(FLOWS)
    store = PausingStore(100, clock=clock, pause_in="request-1")
    cache = Cache(settings, store, RoutingView(live_v1, clock=clock), clock=clock)
    engine = HeldEngine()
    handler = chain(cache, engine)
    outcomes.start(handler, run_request())  # request-0 leads
    engine.arrived(1)
    outcomes.start(handler, run_request())  # request-1 misses, paused before it claims
    assert store.paused.wait(WAIT_S)
    engine.release()
    outcomes.threads[0].join(WAIT_S)  # the leader stored and landed
    assert len(cache.flights) == 0
    store.resume.set()
    led, late = outcomes.join()
    assert (led.headers["X-Cache"], late.headers["X-Cache"]) == ("MISS", "HIT")
    assert engine.count == 1 and late.body == led.body


def test_an_answer_that_cannot_be_shared_lets_followers_call(make_cache, outcomes) -> None:
    """A stream (never for a non-stream request in practice) is read once: followers
    make their own calls rather than share it."""
    waiters = Waiters()
    cache, _ = make_cache(Flights(on_change=waiters))
    engine = HeldEngine(lambda request, n: Response(200, {}, chunks=iter([b"data: 1\n\n"])))
    handler = chain(cache, engine)
    outcomes.start(handler, run_request())
    engine.arrived(1)
    outcomes.start(handler, run_request())
    waiters.reach(1)
    engine.release()
    answers = outcomes.join()
    assert all(a.streamed for a in answers) and engine.count == 2


def test_one_flights_outlives_a_rebuilt_cache_filter(make_cache, outcomes) -> None:
    """The app passes one Flights to every Cache it builds: a request after a config reload
    joins a flight started before it."""
    waiters = Waiters()
    flights = Flights(on_change=waiters)
    before, _ = make_cache(flights)
    after, _ = make_cache(flights)
    assert after.flights is flights
    engine = HeldEngine()
    outcomes.start(chain(before, engine), run_request())
    engine.arrived(1)
    outcomes.start(chain(after, engine), run_request())
    waiters.reach(1)
    engine.release()
    assert [a.headers["X-Cache"] for a in outcomes.join()] == ["MISS", "COALESCED"]
    assert engine.count == 1


def test_a_cache_filter_without_flights_makes_its_own(make_cache) -> None:
    a, _ = make_cache()
    b, _ = make_cache()
    assert isinstance(a.flights, Flights) and a.flights is not b.flights


# -- Flights on its own ------------------------------------------------------------------------


def test_flights_claim_join_wait_and_land() -> None:
    changes: list[tuple[int, int]] = []
    flights = Flights(on_change=lambda in_flight, waiting: changes.append((in_flight, waiting)))
    lead, leads = flights.claim("k", leader_trace_id="t-leader")
    assert leads and lead is not None and lead.leader_trace_id == "t-leader"
    follow, leads = flights.claim("k", leader_trace_id="t-other")
    assert not leads and follow is lead
    assert flights.claim("k", join=False) == (None, False)
    assert flights.waiting("k") == 1 and flights.waiting("other") == 0 and len(flights) == 1

    landing = Landing.of(answer())
    flights.land(lead, landing)
    assert flights.wait(follow, WAIT_S) is landing  # landed already: no wait at all
    assert len(flights) == 0 and flights.waiting("k") == 0 and flights.landed == 1
    assert changes == [(1, 0), (1, 1), (0, 1), (0, 0)]
    again, leads = flights.claim("k")
    assert leads and again is not lead


def test_flights_wait_times_out_and_stops_counting_the_follower() -> None:
    flights = Flights()
    lead, _ = flights.claim("k")
    follow, _ = flights.claim("k")
    assert flights.wait(follow, 0.01) is None
    assert flights.waiting("k") == 0 and len(flights) == 1
    flights.land(lead, Landing.of(answer()))
    assert len(flights) == 0


def test_a_landing_copies_only_the_answers_own_headers() -> None:
    response = answer()
    response.headers["Warning"] = '110 - "Response is Stale"'
    response.headers["X-Cache"] = "STALE"
    landing = Landing.of(response)
    assert set(landing.headers) == {"Content-Type", "X-Run-ID", "X-Flow-Version", "Warning"}
    assert landing.result == "STALE"
    response.headers["X-Trace-ID"] = "stamped later"
    assert "X-Trace-ID" not in landing.headers


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param(b'{"error": {"code": "x", "message": "m", "trace_id": "leader"}}',
                 {"error": {"code": "x", "message": "m", "trace_id": "mine"}}, id="contract"),
    pytest.param(b'{"error": {"code": "x", "message": "m"}}',
                 {"error": {"code": "x", "message": "m"}}, id="no-trace-id"),
    pytest.param(b'{"detail": "not the contract"}', {"detail": "not the contract"}, id="other"),
    pytest.param(b"[1, 2]", [1, 2], id="a-list"),
])
def test_a_followers_error_body_carries_its_own_trace_id(body, expected) -> None:
    request = run_request()
    request.ctx["trace"] = tracing.from_headers(None, None)
    landing = Landing("answer", 502, {"Content-Type": "application/json"}, body, "MISS")
    got = json.loads(follower_response(landing, request).body)
    if isinstance(expected, dict) and expected.get("error", {}).get("trace_id") == "mine":
        expected["error"]["trace_id"] = request.ctx["trace"].trace_id
    assert got == expected


def test_a_body_that_is_not_json_is_shared_as_it_is() -> None:
    landing = Landing("answer", 502, {"Content-Type": "text/plain"}, b"Bad Gateway", "MISS")
    assert follower_response(landing, run_request()).body == b"Bad Gateway"


# -- answers that are one request's own are never shared (security review) ---------------------


@pytest.mark.parametrize("own", [
    pytest.param({"X-Flowgate-Fault": "abort=503"}, id="a-fault-drill-header"),
    pytest.param({"Idempotency-Key": "order-1001"}, id="the-callers-idempotency-key"),
])
@pytest.mark.parametrize("first", ["own", "plain"])
def test_a_request_whose_answer_is_its_own_neither_leads_nor_joins(make_cache, outcomes, own,
                                                                   first) -> None:
    """The attack: a caller sends a fault header it may not send (refused 403 further in),
    or an Idempotency-Key it used before for another input (the engine's 409), while an
    identical request of another app of its tenant is in flight — or the other way round.
    Had they shared one flight, one would get the other's refusal. Each reaches the engine
    (here: its own call) and gets its own answer."""
    waiters = Waiters()
    flights = Flights(on_change=waiters)
    cache, _ = make_cache(flights)

    def reply(request: Request, n: int) -> Response:
        if request.header("x-flowgate-fault") or request.header("idempotency-key"):
            return error_response(409, "conflict", "this one's own refusal", request)
        return answer()

    engine = HeldEngine(reply)
    handler = chain(cache, engine)
    requests = {"own": run_request(headers=own), "plain": run_request(identity="billing-app")}
    second = "plain" if first == "own" else "own"
    outcomes.start(handler, requests[first])
    engine.arrived(1)
    outcomes.start(handler, requests[second])
    engine.arrived(2)  # a call of its own: it did not join the first
    assert waiters.waiting == 0
    engine.release()
    answers = dict(zip((first, second), outcomes.join(), strict=True))
    assert answers["own"].status == 409
    assert answers["plain"].status == 200 and answers["plain"].headers["X-Cache"] != "COALESCED"
    assert len(flights) == 0


def test_a_fault_drill_request_is_never_answered_from_the_cache(make_cache) -> None:
    cache, _ = make_cache()
    engine = HeldEngine()
    engine.release()
    handler = chain(cache, engine)
    assert handler(run_request()).headers["X-Cache"] == "MISS"
    assert handler(run_request()).headers["X-Cache"] == "HIT"
    drill = handler(run_request(headers={"X-Flowgate-Fault": "delay=1"}))
    assert drill.headers["X-Cache"] == "BYPASS" and engine.count == 2
