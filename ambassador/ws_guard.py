"""What the app may send on ``WS /ws/run-flow``: every message gets the checks its HTTP
twin gets, and the connection lives only as long as the caller's credential does.

- ``run``: the flow must be one the caller may run, and the run passes the rate limits
  (the same filters and buckets as ``POST /run-flow``: per identity, per flow);
- ``watch``, and a ``cancel`` naming a ``run_id``: the run's flow must be one the caller
  may run (looked up as the caller, like ``GET /runs/{id}/events``); a watch passes the
  rate limits like that GET, a cancel does not;
- a refused message is answered ``{"type": "error", "code", "message", "trace_id"}``
  (``forbidden``, ``run_not_found``, ``rate_limited`` with ``retry_after_s``,
  ``bad_request``) and nothing goes upstream; a message that is not JSON or nests deeper
  than 64 levels is refused the same way;
- the credential is checked again against the auth settings in force — each second and
  before each message — so a JWT past its ``exp`` (plus leeway) or an API key removed by a
  config reload closes the connection with 1008 (policy violation) and a reason.

Without these, a caller limited to some flows, or over its rate limit, or whose key was
revoked, could do over one long-lived WebSocket what HTTP refuses it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ambassador import hygiene
from ambassador.chain import Request, Response, build_chain
from ambassador.filters.auth import Identity
from flowgate.common.run_request import flow_id_problem
from flowgate.common.tracing import TraceContext

if TYPE_CHECKING:
    from ambassador.app import Ambassador

ROUTE = "/ws/run-flow"
UPSTREAM_PATH = "/api/v1/ws/runs"
POLICY_VIOLATION = 1008


@dataclass(frozen=True)
class Close:
    """Close the app's connection with ``code`` and ``reason``."""

    code: int
    reason: str


class Guard:
    """The checks of one app connection, admitted at the handshake as ``identity`` with
    the forwardable handshake ``headers`` (its credentials among them)."""

    def __init__(self, amb: Ambassador, headers: dict[str, str], identity: Identity | None,
                 trace: TraceContext, *, clock: Callable[[], float] = time.time,
                 admitted_with: Any = None) -> None:
        self.amb = amb
        self.headers = headers
        self.identity = identity
        self.trace = trace
        self._clock = clock
        # the settings whose auth admitted the caller — not the ones in force by now: a
        # reload that landed during the handshake is checked at the first tick
        self._checked_with = admitted_with if admitted_with is not None else amb.settings

    def tick(self) -> Close | None:
        """Is the credential still good? Checked in full only when the config changed or
        the credential's own expiry passed: cheap enough for every second."""
        self.amb.holder.maybe_reload()
        expires_at = self.identity.expires_at if self.identity is not None else None
        if self.amb.settings is self._checked_with and (
                expires_at is None or self._clock() <= expires_at):
            return None
        self._checked_with = self.amb.settings
        auth = self.amb.auth if "auth" in self.amb.settings.filters else None
        if auth is None or auth.settings.mode == "none":
            now = None
        else:
            request = Request("GET", UPSTREAM_PATH, dict(self.headers), ROUTE)
            request.ctx["trace"] = self.trace
            answer = build_chain([auth], lambda r: Response(200))(request)
            if answer.status != 200:
                return Close(POLICY_VIOLATION, _error(answer)["message"])
            now = request.ctx.get("identity")
        if _who(now) != _who(self.identity):
            return Close(POLICY_VIOLATION, "the caller's identity changed with the config; "
                                           "connect again")
        self.identity = now
        return None

    def check(self, message: str | bytes) -> str | bytes | dict[str, Any] | Close:
        """What to do with one app message: the text to send upstream, an error message to
        answer the app with, or a Close."""
        closing = self.tick()
        if closing is not None:
            return closing
        try:
            body = hygiene.loads(message)
        except hygiene.BadJson as exc:
            return self._refusal("bad_request", f"a message must be a JSON object: {exc}")
        kind = body.get("type") if isinstance(body, dict) else None
        if kind == "run":
            return self._run(body)
        if kind == "watch" or (kind == "cancel" and "run_id" in body):
            return self._about_run(body, message, rate_limited=kind == "watch")
        return message  # the engine answers the rest (unknown types, a plain cancel...)

    def _run(self, body: dict[str, Any]) -> str | dict[str, Any] | Close:
        flow_id = body.get("flow_id")
        problem = flow_id_problem(flow_id)
        if problem:
            return self._refusal("bad_request", problem)
        if "input" in body and "input_value" not in body:
            body["input_value"] = body.pop("input")
        request = Request("POST", f"/api/v1/run/{flow_id}", dict(self.headers), ROUTE,
                          flow_id=flow_id)
        verdict = self._through(request, self.amb.handshake_filters)
        return json.dumps(body) if verdict is None else verdict

    def _about_run(self, body: dict[str, Any], message: str | bytes, *, rate_limited: bool
                   ) -> str | bytes | dict[str, Any] | Close:
        run_id = body.get("run_id")
        if not hygiene.valid_id(run_id):
            return self._refusal("bad_request", "run_id must be the id of a run")
        request = Request("GET", f"/api/v1/runs/{run_id}/events", dict(self.headers), ROUTE)
        request.ctx["flow_of_run"] = lambda: self.amb.upstream.flow_of_run(run_id, request)
        filters = [f for f in self.amb.handshake_filters
                   if rate_limited or getattr(f, "name", "") != "ratelimit"]
        verdict = self._through(request, filters)
        return message if verdict is None else verdict

    def _through(self, request: Request, filters: list) -> dict[str, Any] | Close | None:
        """None when ``filters`` let ``request`` through; else the refusal or a Close."""
        request.ctx["trace"] = self.trace
        answer = build_chain(filters, lambda r: Response(200))(request)
        if answer.status == 200:
            return None
        error = _error(answer)
        if answer.status == 401:
            return Close(POLICY_VIOLATION, error["message"])
        refusal = self._refusal(error["code"], error["message"])
        if answer.status == 429:
            refusal["retry_after_s"] = int(answer.headers.get("Retry-After", "1"))
        return refusal

    def _refusal(self, code: str, message: str) -> dict[str, Any]:
        return {"type": "error", "code": code, "message": message, "trace_id": self.trace.trace_id}


def _who(identity: Identity | None) -> tuple[str, str | None] | None:
    return (identity.name, identity.tenant) if identity is not None else None


def _error(answer: Response) -> dict[str, Any]:
    try:
        error = answer.json()["error"]
        return {"code": str(error["code"]), "message": str(error["message"])}
    except (ValueError, KeyError, TypeError):
        return {"code": f"http_{answer.status}", "message": f"refused ({answer.status})"}
