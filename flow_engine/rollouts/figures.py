"""Recent figures of a flow's versions for people (the console's flows list and flow page):
runs, failures and p95 over the last hour, from the same shared window canary analysis
reads (flow_engine/rollouts/outcomes.py).

Reading a window costs one read per 5-second slot and version (720 for an hour), so the
figures of a flow are computed for its live, canary and latest versions only and kept
:data:`FRESH_S` seconds per (flow, window) in this process (at most :data:`MAX_ENTRIES`):
a page of 50 flows reloaded by many people reads the window once per flow every few
seconds, not once per viewer.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from flow_engine.errors import FlowgateError

FRESH_S = 10.0
MAX_ENTRIES = 2_000


class FiguresUnavailable(FlowgateError):
    status, code = 503, "figures_unavailable"


class RecentFigures:
    def __init__(self, outcomes: Any, clock=time.monotonic, wall=time.time) -> None:
        self.outcomes = outcomes  # an OutcomeRecorder
        self.clock = clock
        self.wall = wall
        self._kept: OrderedDict[tuple[str, int], tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, flow: Any, window_s: int) -> dict[str, Any]:
        key = (flow.id, window_s)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept[0] > self.clock():
                return kept[1]
        figures = self._read(flow, window_s)
        with self._lock:
            self._kept[key] = (self.clock() + FRESH_S, figures)
            self._kept.move_to_end(key)
            while len(self._kept) > MAX_ENTRIES:
                self._kept.popitem(last=False)
        return figures

    def _read(self, flow: Any, window_s: int) -> dict[str, Any]:
        canary = ((flow.routing or {}).get("canary") or {}).get("version")
        wanted = sorted({v for v in (flow.live_version, canary, flow.latest_version) if v},
                        reverse=True)
        now = self.wall()
        versions = []
        for version in wanted:
            try:
                seen = self.outcomes.window(flow.id, version, now - window_s, now)
            except Exception as exc:  # the shared window (Redis, the store) does not answer
                raise FiguresUnavailable("the run figures are unavailable for now (the shared "
                                         "outcome window does not answer); try again") from exc
            p95 = seen.p95()
            versions.append({
                "version": version, "live": version == flow.live_version,
                "canary": version == canary, "runs": seen.runs, "failed": seen.failed,
                "failure_rate": round(seen.error_rate, 4),
                "p95_ms": None if p95 is None or p95 == float("inf") else round(p95 * 1000)})
        return {"flow_id": flow.id, "window_s": window_s, "versions": versions}
