"""Which version of a flow will answer a run request, known before it is sent: the cache
keys answers by it, so it never serves an answer of a version that routing would no longer
send the request to (a canary's answer to a request routed to live, or an answer of the
version live was before a publish or rollback).

The view of a flow (its id, live version, canary and sticky key) is the engine's
``GET /api/v1/flows/{ref}``, kept at most ``check_s`` (2 s). With Redis the engine's
``flow_changed`` signal (channel ``flowgate:signals``, flowgate/common/signals.py) drops it at
once, so the next request reads the new routing. When the engine cannot be asked, the last
view stands (a cached answer may still be served stale-if-error).

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
        self._views: dict[str, tuple[float, FlowView | None]] = {}  # ref → (read at, view)
        self._generation = 0  # bumped by every forget: a read that began before is dropped
        self._lock = threading.Lock()

    def version_for(self, flow_ref: str, body: dict[str, Any]) -> int | None:
        pinned = body.get("version")
        if isinstance(pinned, float) and pinned.is_integer():
            pinned = int(pinned)
        if isinstance(pinned, int) and not isinstance(pinned, bool):
            return pinned
        view = self.view(flow_ref)
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

    def view(self, flow_ref: str) -> FlowView | None:
        """The flow's routing as the engine last said (None: no such flow, or never
        known); asked again once it is ``check_s`` old or its flow changed."""
        now = self._clock()
        with self._lock:
            hit = self._views.get(flow_ref)
            generation = self._generation
        if hit is not None and now - hit[0] < self.check_s:
            return hit[1]
        try:
            flow = self._fetch(flow_ref)
            fresh = FlowView.parse(flow) if flow else None
        except Exception:
            # not asked (or no sense made of the answer): the last view stands, and the
            # engine is asked again after check_s, not on every request meanwhile
            fresh = hit[1] if hit is not None else None
        with self._lock:
            if generation == self._generation:  # no change was signalled while we asked
                if len(self._views) >= MAX_FLOWS:
                    self._views.clear()
                self._views[flow_ref] = (now, fresh)
        return fresh

    def forget(self, flow_id: str | None, name: str | None = None) -> None:
        """A flow changed (the engine's signal): its views go."""
        with self._lock:
            self._generation += 1
            for ref, (_, view) in list(self._views.items()):
                if ref in (flow_id, name) or (view is not None and view.flow_id == flow_id):
                    del self._views[ref]

    def forget_all(self) -> None:
        """Signals may have been missed (the subscription was lost): every view goes."""
        with self._lock:
            self._generation += 1
            self._views.clear()
