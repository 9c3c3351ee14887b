"""Which version of a flow serves a run request.

Precedence: an explicit ``version`` pin in the request; else the canary, for ``percent`` % of
requests; else the live version. With ``sticky_key`` (``session_id``), the canary decision is
a hash of the flow id and the key's value, so one session always sees one version; without
it, each request is an independent draw. Routing is data on the flow row: moving it never
touches a compiled graph.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

from flow_engine.errors import BadRequest, Conflict
from flow_engine.store.base import FlowRecord

STICKY_KEYS = ("session_id",)


def choose_version(
    flow: FlowRecord,
    *,
    pinned: int | None = None,
    sticky_value: str | None = None,
    draw: Callable[[], float] = random.random,
) -> int:
    if pinned is not None:
        return pinned
    routing = flow.routing or {}
    canary = routing.get("canary")
    if canary and canary.get("percent", 0) > 0:
        if routing.get("sticky_key") and sticky_value is not None:
            digest = hashlib.sha256(f"{flow.id}\0{sticky_value}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
        else:
            point = draw()
        if point * 100 < canary["percent"]:
            return canary["version"]
    if flow.live_version is None:
        raise Conflict(f"flow '{flow.id}' has no live version; publish one first")
    return flow.live_version


def parse_routing(body: Any, latest_version: int) -> tuple[int | None, dict[str, Any] | None]:
    """Validate a ``PUT /routing`` body; returns ``(new live version or None, routing)``."""
    if not isinstance(body, dict):
        raise BadRequest("routing must be a JSON object like "
                         '{"live": 3, "canary": {"version": 4, "percent": 10}, '
                         '"sticky_key": "session_id"}')
    unknown = set(body) - {"live", "canary", "sticky_key"}
    if unknown:
        raise BadRequest(f"unknown routing key(s): {', '.join(sorted(unknown))}")
    live = body.get("live")
    if live is not None:
        _check_version("live", live, latest_version)
    canary = body.get("canary")
    if canary is not None:
        if not isinstance(canary, dict) or set(canary) - {"version", "percent"}:
            raise BadRequest('canary must be {"version": N, "percent": 0-100}')
        _check_version("canary.version", canary.get("version"), latest_version)
        percent = canary.get("percent")
        if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
            raise BadRequest("canary.percent must be a number from 0 to 100")
        canary = {"version": canary["version"], "percent": percent}
    sticky = body.get("sticky_key")
    if sticky is not None and sticky not in STICKY_KEYS:
        raise BadRequest(f"sticky_key must be one of {', '.join(STICKY_KEYS)} or null")
    if canary is None and sticky is None:
        return live, None
    return live, {"canary": canary, "sticky_key": sticky}


def _check_version(name: str, value: Any, latest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= latest:
        raise BadRequest(f"{name} must be an existing version number (1..{latest})")
