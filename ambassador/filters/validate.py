"""Validate: the second filter of every proxied route, right inside observe.

It refuses what the route cannot take — a method it does not serve (405 with ``Allow``),
a header no upstream may get (400), a body of the wrong type, size or shape (415, 413,
400), a bad run id, a WebSocket handshake from a foreign page or not a handshake at all
(403, 400, 426) — each in the error contract, with the trace, before any filter that
spends something (a rate-limit token, a cache lookup, an upstream attempt) runs. What it
lets through is the engine's call: ``request.path``, ``body``, ``flow_id`` and ``stream``
set from what the app sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ambassador import hygiene, run_flow, ws
from ambassador.chain import Handler, Request, Response, error_response
from ambassador.config import Settings
from ambassador.upstream import Upstream
from ambassador.ws_guard import ROUTE as WS_ROUTE

EVENTS_ROUTE = "/runs/<id>/events"


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    parse: Callable[[Request, Settings, Upstream], Response | None]


def _run(request: Request, settings: Settings, _upstream: Upstream) -> Response | None:
    problem = hygiene.header_problem(request.headers)
    if problem:
        return error_response(400, "bad_request", problem, request)
    return run_flow.parse(request, settings)


def _events(request: Request, _settings: Settings, upstream: Upstream) -> Response | None:
    run_id = request.ctx["run_id"]
    if not hygiene.valid_id(run_id):
        return error_response(400, "bad_request", "invalid run id", request)
    last = _query(request.ctx["environ"]).get("last_event_id")
    if last is not None and not hygiene.valid_last_event_id(last):
        return error_response(400, "bad_request",
                              "last_event_id must be a non-negative integer (ASCII digits)",
                              request)
    problem = hygiene.header_problem(request.headers)
    if problem:
        return error_response(400, "bad_request", problem, request)
    request.path = f"/api/v1/runs/{run_id}/events" + (f"?last_event_id={last}" if last else "")
    request.stream = True
    # callers limited to some flows may only watch runs of those flows
    request.ctx["flow_of_run"] = lambda: upstream.flow_of_run(run_id, request)
    return None


def _query(environ) -> dict[str, str]:
    """The query's parameters, the first of each name (as Flask's ``request.args.get``)."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True):
        params.setdefault(name, value)
    return params


ROUTES = {
    "/run-flow": Route(("POST",), _run),
    EVENTS_ROUTE: Route(("GET",), _events),
    WS_ROUTE: Route(("GET", "HEAD"), ws.parse),
}


class Validate:
    name = "validate"

    def __init__(self, settings: Settings, upstream: Upstream) -> None:
        self.settings, self.upstream = settings, upstream

    def __call__(self, request: Request, next: Handler) -> Response:
        route = ROUTES[request.route]
        if request.method not in route.methods:
            allowed = ", ".join(route.methods)
            return error_response(405, "method_not_allowed",
                                  f"{request.method} is not allowed here; use {route.methods[0]}",
                                  request, headers={"Allow": allowed})
        refusal = route.parse(request, self.settings, self.upstream)
        return refusal if refusal is not None else next(request)
