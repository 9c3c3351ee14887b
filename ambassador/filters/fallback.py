"""Fallback answers: when the engine cannot answer a run (unreachable, circuit open, 5xx,
timeout) and the flow's config has ``fallback``, answer 200 with that body instead of the
error — e.g. ``{"output": "Our assistant is unavailable; a human will reply by email."}`` —
marked ``X-Fallback: true`` and ``"fallback": true`` so callers and dashboards can tell.
Placed before the cache, a stale cached answer is preferred to the fallback."""

from __future__ import annotations

import json
from collections.abc import Callable

from ambassador.chain import Handler, Request, Response
from ambassador.config import Settings

FAILED = frozenset({500, 502, 503, 504})


class Fallback:
    name = "fallback"

    def __init__(self, settings: Settings, *, on_fallback: Callable[[str], None] | None = None):
        self.settings = settings
        self._on_fallback = on_fallback or (lambda flow: None)

    def __call__(self, request: Request, next: Handler) -> Response:
        response = next(request)
        if request.route != "/run-flow" or response.streamed or response.status not in FAILED:
            return response
        policy = self.settings.flows.get(request.flow_id or "")
        if policy is None or policy.fallback is None:
            return response
        body = {"flow_id": request.flow_id, "run_id": None, "output": None, **policy.fallback,
                "fallback": True, "fallback_reason": _reason(response)}
        self._on_fallback(request.flow_id or "")
        answer = Response(200, {"Content-Type": "application/json", "X-Fallback": "true"},
                          json.dumps(body).encode(), meta={**response.meta, "fallback": True})
        for name in ("X-Upstream-Attempts", "X-Cache"):
            if name in response.headers:
                answer.headers[name] = response.headers[name]
        return answer


def _reason(response: Response) -> str:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status}"
