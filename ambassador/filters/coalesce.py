"""Request coalescing for the cache filter (issue #14): concurrent identical cacheable
requests make one upstream call.

A *flight* is one upstream call under way for a cache key. The request that misses the
cache for a key and finds no flight claims one and *leads*: it calls the engine, stores the
answer, and only then *lands* the flight with a copy of what it answers. Requests for the
same key arriving meanwhile *join* the flight as *followers* and wait for the landing,
bounded by a timeout, instead of calling the engine themselves. The key is the cache key
(ambassador/filters/cache.py: flow, version, input, tweaks, types, tenant, session when
configured), so only requests the cache would answer alike share a flight: never two
tenants.

What a follower gets (:func:`follower_response`) is the leader's answer — status, body and
the headers that describe the answer (:data:`SHARED_HEADERS`: the engine's ``X-Run-ID`` of
the run that produced it, ``X-Flow-Version``, ``Retry-After``, a stale answer's
``Warning``) — never the leader's per-request headers: trace ids, ``X-Request-ID``,
``X-Upstream-Attempts`` (a follower made none), ``Idempotent-Replayed``, overhead. An error
body's ``trace_id`` is the follower's own, so the error contract holds for it.

:class:`Flights` holds one entry per key in flight, removed when it lands, so it is
bounded by the requests being answered; it is safe across threads and greenlets (under
gunicorn's gevent workers ``threading`` is gevent's). Its lock is never held across a
wait; each flight's event is made when the flight is claimed, on the request's own thread.
Coalescing is per process: see docs/design.md for why not across sidecars.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ambassador.chain import Request, Response

# what describes the answer itself; everything else on the leader's response is its own
SHARED_HEADERS = ("Content-Type", "X-Run-ID", "X-Flow-Version", "Retry-After",
                  "Cache-Control", "Location", "Warning")
_SHARED = {name.lower() for name in SHARED_HEADERS}


@dataclass(frozen=True)
class Landing:
    """How a flight ended. ``kind``: ``answer`` (a copy of the leader's answer, with the
    leader's ``X-Cache`` in ``result``), ``failed`` (the leader raised: there is no answer)
    or ``unshared`` (an answer that cannot be shared, a stream: followers call themselves)."""

    kind: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    result: str = ""

    @classmethod
    def of(cls, response: Response) -> Landing:
        """A copy of ``response`` taken now, before filters outside the cache add the
        leader's own headers to it."""
        if response.streamed:
            return UNSHARED
        headers = {name: value for name, value in response.headers.items()
                   if name.lower() in _SHARED}
        return cls("answer", response.status, headers, response.body,
                   response.headers.get("X-Cache", ""))


FAILED = Landing("failed")
UNSHARED = Landing("unshared")


class Flight:
    """One upstream call under way for ``key``; ``leader_trace_id`` links followers to it."""

    __slots__ = ("_landed", "key", "landing", "leader_trace_id", "waiters")

    def __init__(self, key: str, leader_trace_id: str | None) -> None:
        self.key = key
        self.leader_trace_id = leader_trace_id
        self.waiters = 0
        self.landing: Landing | None = None
        self._landed = threading.Event()


class Flights:
    """The flights in the air, one per key.

    - ``claim(key, join=True)`` → ``(flight, leads)``: a new flight this request leads, or
      the key's flight in the air to follow (``leads`` False; the follower is counted as
      waiting from this moment). With ``join=False`` (a ``Cache-Control: no-cache``
      request) an existing flight is not joined: ``(None, False)``.
    - ``wait(flight, timeout_s)`` → its :class:`Landing`, or None when ``timeout_s`` passed
      first (the follower stops waiting; the flight goes on).
    - ``land(flight, landing)``: the leader's, exactly once, in a ``finally``. The key is
      free again at once and every follower wakes.
    - ``waiting(key)``: followers waiting on the key's flight now (0 without one);
      ``len(flights)``: keys in flight; ``landed``: flights landed so far, any key.

    ``on_change(in_flight, waiting)`` (for gauges) is called, under the lock, with the keys
    in flight and the followers waiting whenever either changes.
    """

    def __init__(self, *, on_change: Callable[[int, int], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        self._waiting = 0
        self._landed = 0
        self._on_change = on_change or (lambda in_flight, waiting: None)

    def __len__(self) -> int:
        return len(self._flights)

    @property
    def landed(self) -> int:
        return self._landed

    def waiting(self, key: str) -> int:
        with self._lock:
            flight = self._flights.get(key)
            return flight.waiters if flight is not None else 0

    def claim(self, key: str, *, join: bool = True,
              leader_trace_id: str | None = None) -> tuple[Flight | None, bool]:
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = Flight(key, leader_trace_id)
                self._changed()
                return flight, True
            if not join:
                return None, False
            flight.waiters += 1
            self._waiting += 1
            self._changed()
            return flight, False

    def wait(self, flight: Flight, timeout_s: float) -> Landing | None:
        try:
            if timeout_s > 0:
                flight._landed.wait(timeout_s)
            return flight.landing
        finally:
            with self._lock:
                flight.waiters -= 1
                self._waiting -= 1
                self._changed()

    def land(self, flight: Flight, landing: Landing) -> None:
        flight.landing = landing  # before the event: a follower woken by it reads this
        with self._lock:
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]
            self._landed += 1
            self._changed()
        flight._landed.set()

    def _changed(self) -> None:
        self._on_change(len(self._flights), self._waiting)


def follower_response(landing: Landing, request: Request) -> Response:
    """The leader's answer for a follower: its own copy of the headers, and an error body's
    ``trace_id`` made the follower's (its ``X-Trace-ID`` is added outside the cache)."""
    body = landing.body
    if landing.status >= 400:
        trace = request.ctx.get("trace")
        body = _with_trace_id(body, trace.trace_id if trace is not None else None)
    return Response(landing.status, dict(landing.headers), body, meta={"coalesced": True})


def _with_trace_id(body: bytes, trace_id: str | None) -> bytes:
    try:
        data: Any = json.loads(body)
    except ValueError:
        return body
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or "trace_id" not in error:
        return body
    return json.dumps({**data, "error": {**error, "trace_id": trace_id}}).encode()
