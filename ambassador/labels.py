"""Bounded ``flow`` label values for the ambassador's metrics.

A flow id in a request is the caller's string: used as a label value as it is, a caller
(or a bug) sending random ids would create a new time series per id until Prometheus (and
this process's memory) gives out. A flow id becomes a label value only when

- the config names it (a ``flows:`` entry or an API key's ``flows`` allowlist), or
- the engine has answered a run of it with a success: such ids are real flows, and at most
  ``limit`` (1000) of them are remembered per process;

every other id is counted as ``other``. A request without a flow (``/runs/<id>/events``,
WebSocket handshakes) keeps the empty label.
"""

from __future__ import annotations

import threading

from ambassador.config import Settings

OTHER = "other"


class FlowLabels:
    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._named: frozenset[str] = frozenset()
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def configure(self, settings: Settings) -> None:
        """The flows the config names (called on start and on every reload)."""
        named = set(settings.flows)
        for key in settings.inbound_auth.api_keys:
            named.update(key.flows or ())
        self._named = frozenset(named)

    def succeeded(self, flow_id: str | None) -> None:
        """The engine answered a run of ``flow_id`` with a success: a real flow."""
        if not flow_id or flow_id in self._seen or flow_id in self._named:
            return
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(flow_id)

    def of(self, flow_id: str | None) -> str:
        if not flow_id:
            return ""
        if flow_id in self._named or flow_id in self._seen:
            return flow_id
        return OTHER
