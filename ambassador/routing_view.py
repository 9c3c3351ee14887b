"""Which version of a flow will answer a run request, known before it is sent: the cache
keys answers by it, so it never serves an answer of a version that routing would no longer
send the request to (a canary's answer to a request routed to live, or an answer of the
version live was before a publish or rollback).

The view of a flow (its id, live version, canary and sticky key) is the engine's
``GET /api/v1/flows/{ref}``, kept at most ``check_s`` (2 s). With Redis the engine's
``flow_changed`` signal (channel ``flowgate:signals``, flowgate/common/signals.py) drops it at
once, so the next request reads the new routing. When the engine cannot be asked, the view
keeps the time it was read: once that is ``check_s`` old the routing is unknown — the
version is None (``X-Cache: BYPASS``, never a guess), and the engine is asked again
``check_s`` after the failed try, not on every request meanwhile. Without Redis nothing else
would tell the ambassador of a publish made meanwhile, so serving hits by an old view could
serve the old version's answers for as long as the engine's flow record cannot be read.
``last_version_for`` still answers from the last view while it is younger than the flow's
``stale_if_error_s``: for a stale answer when the engine fails (stale-if-error), never for a
hit.

``version_for(request)`` repeats the engine's choice (flow_engine/routing.py):

- a ``version`` pin in the body is that version;
- a canary with a sticky key and a ``session_id`` is decided by the same hash of the flow
  id and the session as the engine's, so one session keeps its version;
- any other canary is a draw per request in the engine: the version is not known before
  the answer (None), and the cache does not look up — it still stores the answer under the
  version the engine says served it (``X-Flow-Version``);
- else the live version.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CHECK_S = 2.0
MAX_FLOWS = 10_000


@dataclass(frozen=True)
class FlowView:
    flow_id: str
    name: str | None
    live: int | None
    canary: int | None
    percent: float
    sticky_key: str | None

    @classmethod
    def parse(cls, flow: dict[str, Any]) -> FlowView:
        routing = flow.get("routing") or {}
        canary = routing.get("canary") or {}
        return cls(flow["id"], flow.get("name"), flow.get("live_version"),
                   canary.get("version"), float(canary.get("percent") or 0),
                   routing.get("sticky_key"))


class RoutingView:
    def __init__(self, fetch: Callable[[str], dict[str, Any] | None], *,
                 check_s: float = CHECK_S, clock: Callable[[], float] = time.monotonic) -> None:
        """``fetch(ref)``: the engine's flow record, None when it has no such flow; it
        raises when the engine could not be asked."""
        self._fetch = fetch
        self.check_s = check_s
        self._clock = clock
        self._views: dict[str, _Seen] = {}
        self._generation = 0  # bumped by every forget: a read that began before is dropped
        self._lock = threading.Lock()

    def version_for(self, flow_ref: str, body: dict[str, Any]) -> int | None:
        """The version that will answer; None when that is not known now."""
        pinned = _pin(body)
        return pinned if pinned is not None else _choose(self.view(flow_ref), body)

    def last_version_for(self, flow_ref: str, body: dict[str, Any], *,
                         max_age_s: float) -> int | None:
        """The version the last view of the flow, read at most ``max_age_s`` ago, chose (for
        stale-if-error: what was served then may be served stale, never older)."""
        pinned = _pin(body)
        if pinned is not None:
            return pinned
        with self._lock:
            hit = self._views.get(flow_ref)
        if hit is None or self._clock() - hit.read_at > max_age_s:
            return None
        return _choose(hit.view, body)

    def view(self, flow_ref: str) -> FlowView | None:
        """The flow's routing as the engine said at most ``check_s`` ago (None: no such
        flow, or not known now); asked again once it is ``check_s`` old or its flow changed,
        or ``check_s`` after a failed try."""
        now = self._clock()
        with self._lock:
            hit = self._views.get(flow_ref)
            generation = self._generation
        if hit is not None and now - hit.read_at < self.check_s:
            return hit.view
        if hit is not None and now - hit.asked_at < self.check_s:
            return None  # the last re-check failed: unknown until the next one
        try:
            flow = self._fetch(flow_ref)
            seen = _Seen(now, FlowView.parse(flow) if flow else None, now)
            known = seen.view
        except Exception:
            # not asked (or no sense made of the answer): unknown; the last view is kept
            # with its own time (for stale-if-error), and the engine asked after check_s
            seen = _Seen(hit.read_at, hit.view, now) if hit is not None else _Seen(
                -math.inf, None, now)
            known = None
        with self._lock:
            if generation == self._generation:  # no change was signalled while we asked
                if len(self._views) >= MAX_FLOWS:
                    self._views.clear()
                self._views[flow_ref] = seen
        return known

    def forget(self, flow_id: str | None, name: str | None = None) -> None:
        """A flow changed (the engine's signal): its views go."""
        with self._lock:
            self._generation += 1
            for ref, seen in list(self._views.items()):
                if ref in (flow_id, name) or (seen.view is not None
                                              and seen.view.flow_id == flow_id):
                    del self._views[ref]

    def forget_all(self) -> None:
        """Signals may have been missed (the subscription was lost): every view goes."""
        with self._lock:
            self._generation += 1
            self._views.clear()


@dataclass(frozen=True)
class _Seen:
    read_at: float  # when the engine last answered (-inf: never)
    view: FlowView | None
    asked_at: float  # when it was last asked


def _pin(body: dict[str, Any]) -> int | None:
    pinned = body.get("version")
    if isinstance(pinned, float) and pinned.is_integer():
        pinned = int(pinned)
    if isinstance(pinned, int) and not isinstance(pinned, bool):
        return pinned
    return None


def _choose(view: FlowView | None, body: dict[str, Any]) -> int | None:
    """The engine's choice (flow_engine/routing.py) by ``view``; None when not known."""
    if view is None or view.live is None:
        return None
    if view.canary is None or view.percent <= 0:
        return view.live
    session = body.get("session_id")
    if not view.sticky_key or not isinstance(session, str):
        return None  # the engine draws: unknown until it answers
    digest = hashlib.sha256(f"{view.flow_id}\0{session}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    return view.canary if point * 100 < view.percent else view.live
