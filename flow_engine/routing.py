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
    """Validate a ``PUT /routing`` body; returns ``(new live version or None, routing)``.

    A canary may carry a ``guard`` (flow_engine/rollouts/analysis.py) and ``steps``
    (``[5, 25, 50, 100]``, increasing, ending at 100) with ``step_after_s``: the engine then
    walks the steps by itself and promotes the canary at 100 %, or aborts it on a breach.
    ``percent`` defaults to the first step."""
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
        canary = _parse_canary(canary, latest_version)
    sticky = body.get("sticky_key")
    if sticky is not None and sticky not in STICKY_KEYS:
        raise BadRequest(f"sticky_key must be one of {', '.join(STICKY_KEYS)} or null")
    if canary is None and sticky is None:
        return live, None
    return live, {"canary": canary, "sticky_key": sticky}


_CANARY_KEYS = {"version", "percent", "guard", "steps", "step_after_s"}


def _parse_canary(raw: Any, latest_version: int) -> dict[str, Any]:
    from flow_engine.rollouts.analysis import Guard

    if not isinstance(raw, dict) or set(raw) - _CANARY_KEYS:
        raise BadRequest('canary must be {"version": N, "percent": 0-100} (optionally with '
                         '"guard", "steps" and "step_after_s")')
    _check_version("canary.version", raw.get("version"), latest_version)
    canary: dict[str, Any] = {"version": raw["version"]}
    steps = raw.get("steps")
    if steps is not None:
        if (not isinstance(steps, list) or not steps or len(steps) > 20
                or any(isinstance(x, bool) or not isinstance(x, int | float) for x in steps)
                or any(not 0 < x <= 100 for x in steps) or steps != sorted(set(steps))
                or steps[-1] != 100):
            raise BadRequest("canary.steps must be increasing percents ending at 100, like "
                             "[5, 25, 50, 100]")
        after = raw.get("step_after_s", 60)
        if isinstance(after, bool) or not isinstance(after, int | float) or not 1 <= after <= 86_400:
            raise BadRequest("canary.step_after_s must be a number of seconds from 1 to 86400")
        canary.update(steps=steps, step_after_s=after)
    elif "step_after_s" in raw:
        raise BadRequest("canary.step_after_s needs canary.steps")
    percent = raw.get("percent", steps[0] if steps else None)
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
        raise BadRequest("canary.percent must be a number from 0 to 100")
    canary["percent"] = percent
    if "guard" in raw:
        try:
            canary["guard"] = Guard.parse(raw["guard"], "canary.guard").as_dict()
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    elif steps is not None:
        canary["guard"] = Guard().as_dict()  # steps walk only while someone watches them
    return canary


def _check_version(name: str, value: Any, latest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= latest:
        raise BadRequest(f"{name} must be an existing version number (1..{latest})")
